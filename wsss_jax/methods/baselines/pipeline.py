"""The two reference points every WSSS paper reports.

supervised:    train on ground-truth masks (the upper bound).
box_baseline:  train with plain cross-entropy on box-filled masks, smaller
               box on top (the lower bound: "Box" = 59.3 in Box2Seg Table 3;
               62.2 pseudo-mask val mIoU in BANA Table 1).

Each is a plain list of the shared stages of `wsss_jax.common_stages`.
"""

from __future__ import annotations

from wsss_jax import common_stages as cs
from wsss_jax import segmentation
from wsss_jax.data import schema
from wsss_jax.runtime import Runtime
from wsss_jax.stages import MethodPipeline, PseudoLabels

PSEUDO_KEY = 'pseudo'


def supervised(rt: Runtime) -> MethodPipeline:
  """Fully supervised training on the ground-truth masks."""
  stages = [
      cs.train_stage(rt, 'train',
                     loss_fn=segmentation.cross_entropy_on(schema.MASK),
                     description='train on ground-truth masks'),
      cs.evaluate_stage(rt, 'train'),
  ]
  return MethodPipeline(stages, eval_stage='evaluate', train_stages=('train',))


def box_baseline(rt: Runtime) -> MethodPipeline:
  """Cross-entropy on box-filled masks (smaller box on top)."""
  stages = [
      cs.box_fill_stage(rt),
      cs.train_stage(rt, 'train',
                     loss_fn=segmentation.cross_entropy_on(PSEUDO_KEY),
                     label_folders={PSEUDO_KEY: cs.label_path('box_labels')},
                     description='train on the box-filled masks'),
      cs.evaluate_stage(rt, 'train'),
  ]
  return MethodPipeline(stages, eval_stage='evaluate', train_stages=('train',),
                        pseudo=PseudoLabels('box_labels',
                                            cs.label_path('box_labels')))
