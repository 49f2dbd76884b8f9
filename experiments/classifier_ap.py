"""How well an image-label method's classifier recognises each class.

  python experiments/classifier_ap.py --workdir=experiments/out/rrm/rrm-seed0 \\
      [--stages=classify,train] [--split=val] [--max_images=0]

For every named training stage of a finished run whose network returns
'class_logits' (RRM's classification branch; any GAP classifier), the
per-class average precision of those scores against the image labels of the
split, one image at a time at its own size (inference mode), with the chance
level (the class's frequency) beside it.  A class the classifier cannot
recognise cannot get a CAM: this separates "not recognised" from "recognised
but not localised".  Prints a table; JSON to <workdir>/classifier_ap.json.
"""

from __future__ import annotations

import json
import os
from typing import Sequence

from absl import app, flags
import jax
import numpy as np

from wsss_jax import config_io, methods, prediction, pretraining, run
from wsss_jax import runtime, segmentation
from wsss_jax.data import schema
from wsss_jax.ops import image as image_ops


def average_precision(scores: np.ndarray, labels: np.ndarray) -> float:
  """AP of `scores` (N,) for binary `labels` (N,): the mean of the precision
  at the rank of every positive (ties broken by order).  NaN without
  positives."""
  positives = int(np.sum(labels))
  if not positives:
    return float('nan')
  ranked = np.asarray(labels, bool)[np.argsort(-scores, kind='stable')]
  precision = np.cumsum(ranked) / np.arange(1, len(ranked) + 1)
  return float(np.sum(precision[ranked]) / positives)


def class_scores(workdir: str, stage: str, split: str | None,
                 max_images: int) -> tuple[np.ndarray, np.ndarray, list]:
  """(scores (N, K), image labels (N, K), class names) of `stage`'s network
  on `split` (default: the run's val split)."""
  config = config_io.load_run_config(workdir)
  rt = runtime.make_runtime(config,
                            builtin_weights=pretraining.builtin_weights)
  network = prediction.select_network(
      methods.build_pipeline(config.method, rt), stage)
  model, variables = segmentation.load_trained(
      network.runtime, os.path.join(workdir, network.stage,
                                    segmentation.MODEL_FILE), network.model)
  normalization = network.runtime.normalization

  @jax.jit
  def forward(variables, image):
    x = image_ops.normalize_images(image, normalization)
    return model.apply(variables, x, train=False)['class_logits'][0]

  source = rt.dataset.source(split or rt.val_split)
  count = min(len(source), max_images or len(source))
  scores, labels = [], []
  for i in range(count):
    example = source[i]
    scores.append(np.asarray(forward(
        variables, np.asarray(example[schema.IMAGE])[None])))
    labels.append(np.asarray(example[schema.IMAGE_LABELS], bool))
  return np.stack(scores), np.stack(labels), list(rt.class_names[1:])


def main(argv: Sequence[str]) -> None:
  del argv
  run.configure_logging()
  report = {}
  for stage in FLAGS.stages:
    scores, labels, names = class_scores(FLAGS.workdir, stage, FLAGS.split,
                                         FLAGS.max_images)
    per_class = {name: {'ap': 100 * average_precision(scores[:, c],
                                                      labels[:, c]),
                        'chance': 100 * float(np.mean(labels[:, c]))}
                 for c, name in enumerate(names)}
    report[stage] = {'map': float(np.nanmean([v['ap'] for v in
                                              per_class.values()])),
                     'images': int(len(labels)), 'per_class': per_class}
  names = list(next(iter(report.values()))['per_class'])
  print('| stage | mAP | ' + ' | '.join(names) + ' |')
  print('| --- ' * (len(names) + 2) + '|')
  for stage, result in report.items():
    cells = [f"{v['ap']:.0f} ({v['chance']:.0f})"
             for v in result['per_class'].values()]
    print(f"| {stage} | {result['map']:.1f} | " + ' | '.join(cells) + ' |')
  print('(AP, chance level in brackets)')
  with open(os.path.join(FLAGS.workdir, 'classifier_ap.json'), 'w') as f:
    json.dump(report, f, indent=2)


if __name__ == '__main__':
  flags.DEFINE_string('workdir', None, 'A finished run.', required=True)
  flags.DEFINE_list('stages', ['classify', 'train'], 'Training stages.')
  flags.DEFINE_string('split', None, 'Split (default: the val split).')
  flags.DEFINE_integer('max_images', 0, 'First N images (0: all).')
  FLAGS = flags.FLAGS
  app.run(main)
