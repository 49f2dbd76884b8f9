"""Why one pseudo-mask beats another on the benchmark: the foreground's size.

  python experiments/pmm_mask_stats.py --workdir=experiments/out/pmm/pmm-seed0

For each of PMM's Table 2 label folders of a finished run (`pseudo_masks/crf`,
`crf_cvs`, `ppmg_no_cvs`, `ppmg`) on the images they share: the share of the
pixels labelled foreground against the ground truth's, the class-agnostic
foreground precision and recall, and the share of ground-truth foreground
given the right class.  Masks larger than the objects (share above the
ground truth's, low precision) are what an expanding step such as CVS
makes worse.  Prints a table; JSON to <workdir>/pmm_mask_stats.json.
"""

from __future__ import annotations

import json
import os
from typing import Any, Sequence

from absl import app, flags
import numpy as np

from wsss_jax import config_io, run
from wsss_jax import runtime
from wsss_jax.data import schema
from wsss_jax.data.label_png import LabelFolder

ROWS = ('crf', 'crf_cvs', 'ppmg_no_cvs', 'ppmg')


def _define_flags() -> None:
  flags.DEFINE_string('workdir', None, 'A finished PMM run.', required=True)


def foreground_stats(labels: Sequence[np.ndarray],
                     truths: Sequence[np.ndarray]) -> dict[str, float]:
  """Class-agnostic foreground statistics of label maps against the ground
  truth (pixels the ground truth ignores are left out), in percent."""
  fg_label = fg_truth = both = right = counted = 0
  for label, truth in zip(labels, truths):
    keep = truth != schema.IGNORE_LABEL
    lab, tru = label[keep].astype(np.int64), truth[keep].astype(np.int64)
    counted += lab.size
    fg_label += int(np.sum(lab > 0))
    fg_truth += int(np.sum(tru > 0))
    both += int(np.sum((lab > 0) & (tru > 0)))
    right += int(np.sum((lab == tru) & (tru > 0)))
  share = lambda a, b: 100.0 * a / b if b else float('nan')
  return {'foreground_share': share(fg_label, counted),
          'truth_share': share(fg_truth, counted),
          'precision': share(both, fg_label), 'recall': share(both, fg_truth),
          'right_class': share(right, fg_truth)}


def main(argv: Sequence[str]) -> None:
  del argv
  workdir = flags.FLAGS.workdir
  config = config_io.load_run_config(workdir)
  rt = runtime.make_runtime(config)
  source = rt.dataset.source(rt.train_split)
  ids = rt.dataset.index(rt.train_split).image_ids
  folders = {name: LabelFolder(os.path.join(workdir, 'pseudo_masks', name))
             for name in ROWS}
  shared = set.intersection(*[f.existing_ids() for f in folders.values()])
  picked = [i for i, image_id in enumerate(ids) if image_id in shared]
  truths = [np.asarray(source[i][schema.MASK]) for i in picked]
  out: dict[str, Any] = {'images': len(picked)}
  print(f'{len(picked)} images | foreground % (truth) | precision | recall '
        '| right class')
  for name, folder in folders.items():
    labels = [folder.read(ids[i], expected_hw=t.shape)
              for i, t in zip(picked, truths)]
    stats = foreground_stats(labels, truths)
    out[name] = stats
    print(f"{name:12s} | {stats['foreground_share']:.1f} "
          f"({stats['truth_share']:.1f}) | {stats['precision']:.1f} | "
          f"{stats['recall']:.1f} | {stats['right_class']:.1f}")
  with open(os.path.join(workdir, 'pmm_mask_stats.json'), 'w') as f:
    json.dump(out, f, indent=2)


if __name__ == '__main__':
  _define_flags()
  run.configure_logging()
  app.run(main)
