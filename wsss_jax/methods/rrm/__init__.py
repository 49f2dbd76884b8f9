"""RRM (Zhang et al., AAAI 2020): one-step WSSS from image labels."""
