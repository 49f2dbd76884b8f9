"""Method-agnostic pseudo-label work: class activation maps and their
normalisations, region and box masks, feature means and cosine scores, and the
one label-generation engine (device passes -> host pool -> PNG folders) that
every method's label stage runs on."""
