"""Who is right on BANA's unreliable region ~S (Y_crf != Y_ret)?

  python experiments/bana_unreliable.py --workdir=runs/bana [--config=configs/bana.py]

Counts, over a run's stage-2 label pairs and the training ground truth, the
share of labelled pixels in ~S and, inside ~S, how often Y_crf, Y_ret or
neither matches the ground truth (experiments/RESULTS.md §8).
"""

from __future__ import annotations

import json
import os

from absl import app, flags

from wsss_jax import run
from wsss_jax.data import registry, schema
from wsss_jax.data.label_png import LabelFolder
from wsss_jax.methods.bana import generate as bana_generate

_WORKDIR = flags.DEFINE_string('workdir', 'runs/bana', 'A BANA run.')
_CONFIG = flags.DEFINE_string('config', 'configs/bana.py', 'Its config.')


def main(argv):
  del argv
  config = run.load_config_file(_CONFIG.value, '')
  dataset = registry.open_dataset(config.data)
  source = dataset.source(config.data.train_split, decode_images=False)
  folders = [LabelFolder(os.path.join(_WORKDIR.value, 'labels', key))
             for key in (bana_generate.Y_CRF, bana_generate.Y_RET)]
  labelled = unreliable = crf_right = ret_right = 0
  for i in range(len(source)):
    example = source[i]
    truth = example[schema.MASK]
    y_crf, y_ret = (f.read(example[schema.IMAGE_ID]) for f in folders)
    known = truth != schema.IGNORE_LABEL
    region = (known & (y_crf != y_ret) & (y_crf != schema.IGNORE_LABEL)
              & (y_ret != schema.IGNORE_LABEL))
    labelled += int(known.sum())
    unreliable += int(region.sum())
    crf_right += int((region & (y_crf == truth)).sum())
    ret_right += int((region & (y_ret == truth)).sum())
  share = lambda n, d: round(100.0 * n / d, 1) if d else None  # pylint: disable=unnecessary-lambda-assignment
  print(json.dumps({
      'images': len(source),
      'unreliable_pct_of_labelled': share(unreliable, labelled),
      'y_crf_right_pct': share(crf_right, unreliable),
      'y_ret_right_pct': share(ret_right, unreliable),
      'neither_pct': share(unreliable - crf_right - ret_right, unreliable),
  }, indent=2))


if __name__ == '__main__':
  app.run(main)
