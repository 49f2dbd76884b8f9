"""Box2Seg (Kulharia et al., ECCV 2020) as a pipeline of stages.

    box_labels  B filled into PNGs (only to report its quality; training
                rasterises the augmented boxes on the output grid)
    grabcut     M: one GrabCut per box, smaller box on top, cached as PNGs
    pretrain    phase 1 (Sect. 4.1): embeddings trained with L_A using M in
                place of y; the y and α branches are frozen
    train       phase 2: Eq. (11) end to end, from the phase-1 weights
    evaluate    y branch only, full image (+ optional multi-scale/flip/CRF)
    finetune    (`semi` variant, Table 5) CE on a fraction of pixel-labelled
                images + Eq. (11) on the rest, from the phase-2 weights

The official code was never released: every choice the paper leaves open is a
field of `config.box2seg` (see configs/box2seg.py and docs/box2seg.md).
"""

from __future__ import annotations

import functools
import os
from typing import Any

from wsss_jax import common_stages as cs
from wsss_jax.data import schema
from wsss_jax.host import grabcut
from wsss_jax.methods.box2seg import model as box2seg_model
from wsss_jax.methods.box2seg import objective
from wsss_jax.methods.box2seg import report as box2seg_report
from wsss_jax.methods.box2seg.objective import GRABCUT_KEY
from wsss_jax.runtime import Runtime
from wsss_jax.stages import MethodPipeline, PseudoLabels

SEMI_KEY = cs.SEMI_KEY


# ----------------------------------------------------------------------------
# Stages
# ----------------------------------------------------------------------------
def pipeline(rt: Runtime) -> MethodPipeline:
  """The stages of `config.box2seg.variant` (Table 3–5 rows)."""
  cfg = rt.config.box2seg
  loss_options = objective.Box2SegLossOptions.from_config(cfg)
  host_workers = int(rt.config.eval.crf_workers)
  model = box2seg_model.build_box2seg_model(rt.config, rt.num_classes,
                                            rt.compute_dtype)
  supervised_awl = cfg.variant == 'supervised_awl'
  mask_key = schema.MASK if supervised_awl else GRABCUT_KEY
  labels = ({} if supervised_awl
            else {GRABCUT_KEY: cs.label_path('grabcut')})
  stages = [cs.box_fill_stage(rt, description='box-filled masks B (quality '
                              'report)')]
  if not supervised_awl:
    stages.append(cs.label_folder_stage(
        rt, 'grabcut', functools.partial(
            grabcut.grabcut_example, iterations=int(cfg.grabcut_iterations)),
        workers=host_workers, description='GrabCut masks M, one per box'))

  pretrain = bool(cfg.weights.affinity) and cfg.pretrain_steps > 0
  if pretrain:
    stages.append(cs.train_stage(
        rt, 'pretrain', model=model, label_folders=labels,
        loss_fn=objective.pretrain_loss(loss_options, rt.num_classes),
        num_steps=cfg.pretrain_steps,
        frozen_modules=('head', 'attention_head'), validate=False,
        description='phase 1: affinity pre-training on M'))
  stages.append(cs.train_stage(
      rt, 'train', model=model, label_folders=labels,
      loss_fn=objective.train_loss(loss_options, rt.num_classes, mask_key),
      init_stage='pretrain' if pretrain else None,
      description='phase 2: Eq. (11) end to end'))
  final = 'train'

  if cfg.variant == 'semi':
    stages.append(cs.partial_labels_stage(rt, cfg.semi_fraction,
                                          workers=host_workers))
    stages.append(cs.train_stage(
        rt, 'finetune', model=model,
        label_folders=dict(labels, **{SEMI_KEY: cs.label_path('semi_labels')}),
        loss_fn=objective.train_loss(loss_options, rt.num_classes, mask_key,
                                     SEMI_KEY),
        init_stage='train', num_steps=cfg.finetune_steps,
        description='Table 5: fine-tune with pixel labels'))
    final = 'finetune'

  def attention_figures(context, stage_dir, net, variables):
    return box2seg_report.write_figures(
        rt, context.workdir, os.path.join(stage_dir, 'figures'), net,
        variables, rt.config.report.num_examples)
  stages.append(cs.evaluate_stage(rt, final, model=model,
                                  description='y branch on val',
                                  figures_fn=attention_figures))

  train_stages = tuple(s.name for s in stages
                       if s.name in ('pretrain', 'train', 'finetune'))
  return MethodPipeline(
      stages, eval_stage='evaluate', train_stages=train_stages,
      pseudo=(None if supervised_awl
              else PseudoLabels('grabcut', cs.label_path('grabcut'))),
      extra_results=_extra_results)


def _extra_results(by_stage: dict[str, dict[str, Any]]) -> dict[str, Any]:
  """Pseudo-mask quality of B and M (the paper's Box / GrabCut rows)."""
  out = {}
  for stage, name in (('box_labels', 'box_miou'),
                      ('grabcut', 'grabcut_miou')):
    quality = by_stage.get(stage, {}).get('quality')
    if quality:
      out[name] = quality['miou']
  generation = by_stage.get('grabcut', {}).get('generation')
  if generation:
    out['grabcut_generation'] = generation
  return out
