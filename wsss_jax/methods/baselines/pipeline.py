"""The two reference points every WSSS paper reports.

supervised:    train on ground-truth masks (the upper bound).
box_baseline:  train with plain cross-entropy on box-filled masks, smaller
               box on top (the lower bound: "Box" = 59.3 in Box2Seg Table 3;
               62.2 pseudo-mask val mIoU in BANA Table 1).

Each is a plain list of stages over the shared parts in
`wsss_jax.segmentation`; the method files of the papers follow this shape.
"""

from __future__ import annotations

import os

from wsss_jax import segmentation
from wsss_jax.data import schema
from wsss_jax.host import grabcut
from wsss_jax.runtime import Runtime
from wsss_jax.stages import MethodPipeline, PseudoLabels, Stage

PSEUDO_KEY = 'pseudo'


def _evaluate_stage(rt: Runtime, train_stage: str) -> Stage:
  def run(context, stage_dir):
    model_file = os.path.join(context.workdir, train_stage,
                              segmentation.MODEL_FILE)
    model, variables = segmentation.load_trained(rt, model_file)
    return segmentation.evaluate_model(
        rt, stage_dir, model, variables,
        num_train_examples=rt.config.report.num_examples)
  return Stage('evaluate', run, description='score the final network on the '
               'validation split and write its predictions')


def supervised(rt: Runtime) -> MethodPipeline:
  """Fully supervised training on the ground-truth masks."""
  def train(context, stage_dir):  # pylint: disable=unused-argument
    return segmentation.train_segmenter(
        rt, stage_dir, loss_fn=segmentation.cross_entropy_on(schema.MASK))
  stages = [
      Stage('train', train, outputs=(segmentation.MODEL_FILE,),
            description='train on ground-truth masks'),
      _evaluate_stage(rt, 'train'),
  ]
  return MethodPipeline(stages, eval_stage='evaluate', train_stages=('train',))


def box_baseline(rt: Runtime) -> MethodPipeline:
  """Cross-entropy on box-filled masks (smaller box on top)."""
  labels = os.path.join('box_labels', 'labels')

  def make_labels(context, stage_dir):  # pylint: disable=unused-argument
    # Inline: filling boxes is cheaper than sending images to workers.
    return segmentation.make_label_folder(
        rt, os.path.join(stage_dir, 'labels'), grabcut.box_fill_example)

  def train(context, stage_dir):
    return segmentation.train_segmenter(
        rt, stage_dir, loss_fn=segmentation.cross_entropy_on(PSEUDO_KEY),
        label_folders={PSEUDO_KEY: os.path.join(context.workdir, labels)})

  stages = [
      Stage('box_labels', make_labels, outputs=('labels',),
            description='fill every training box (smaller box on top)'),
      Stage('train', train, outputs=(segmentation.MODEL_FILE,),
            description='train on the box-filled masks'),
      _evaluate_stage(rt, 'train'),
  ]
  return MethodPipeline(stages, eval_stage='evaluate', train_stages=('train',),
                        pseudo=PseudoLabels('box_labels', labels))
