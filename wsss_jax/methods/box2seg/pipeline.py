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


from wsss_jax import segmentation
from wsss_jax.data import schema
from wsss_jax.host import grabcut
from wsss_jax.methods.box2seg import model as box2seg_model
from wsss_jax.methods.box2seg import objective
from wsss_jax.methods.box2seg import report as box2seg_report
from wsss_jax.methods.box2seg.objective import GRABCUT_KEY
from wsss_jax.reporting import figures
from wsss_jax.runtime import Runtime
from wsss_jax.stages import MethodPipeline, PseudoLabels, Stage
from wsss_jax.training import mesh as mesh_lib

SEMI_KEY = 'semi_mask'


# ----------------------------------------------------------------------------
# Stages
# ----------------------------------------------------------------------------
def pipeline(rt: Runtime) -> MethodPipeline:
  """The stages of `config.box2seg.variant` (Table 3–5 rows)."""
  cfg = rt.config.box2seg
  host_workers = int(rt.config.eval.crf_workers)
  model = box2seg_model.build_box2seg_model(rt.config, rt.num_classes,
                                            rt.compute_dtype)
  supervised_awl = cfg.variant == 'supervised_awl'
  mask_key = schema.MASK if supervised_awl else GRABCUT_KEY
  folders = {} if supervised_awl else {
      GRABCUT_KEY: os.path.join('grabcut', 'labels')}
  stages: list[Stage] = []

  def box_labels(context, stage_dir):
    # Inline: filling boxes is cheaper than sending images to workers.
    return segmentation.make_label_folder(
        rt, os.path.join(stage_dir, 'labels'), grabcut.box_fill_example)
  stages.append(Stage('box_labels', box_labels, outputs=('labels',),
                      description='box-filled masks B (quality report)'))

  if not supervised_awl:
    def grabcut_labels(context, stage_dir):
      fn = functools.partial(grabcut.grabcut_example,
                             iterations=int(cfg.grabcut_iterations))
      return segmentation.make_label_folder(
          rt, os.path.join(stage_dir, 'labels'), fn, workers=host_workers)
    stages.append(Stage('grabcut', grabcut_labels, outputs=('labels',),
                        description='GrabCut masks M, one per box'))

  def joined(context):
    return {key: os.path.join(context.workdir, path)
            for key, path in folders.items()}

  pretrain = bool(cfg.weights.affinity) and cfg.pretrain_steps > 0
  if pretrain:
    def run_pretrain(context, stage_dir):
      return segmentation.train_segmenter(
          rt, stage_dir, model=model, name='pretrain',
          loss_fn=objective.pretrain_loss(cfg, rt.num_classes),
          label_folders=joined(context), num_steps=cfg.pretrain_steps,
          frozen_modules=('head', 'attention_head'), validate=False)
    stages.append(Stage('pretrain', run_pretrain,
                        outputs=(segmentation.MODEL_FILE,),
                        description='phase 1: affinity pre-training on M'))

  def run_train(context, stage_dir):
    init = (os.path.join(context.workdir, 'pretrain', segmentation.MODEL_FILE)
            if pretrain else None)
    return segmentation.train_segmenter(
        rt, stage_dir, model=model, name='train',
        loss_fn=objective.train_loss(cfg, rt.num_classes, mask_key),
        label_folders=joined(context), init_from=init)
  stages.append(Stage('train', run_train, outputs=(segmentation.MODEL_FILE,),
                      description='phase 2: Eq. (11) end to end'))
  final = 'train'

  if cfg.variant == 'semi':
    def semi_labels(context, stage_dir):
      return segmentation.make_partial_label_folder(
          rt, os.path.join(stage_dir, 'labels'), cfg.semi_fraction,
          workers=host_workers)
    stages.append(Stage('semi_labels', semi_labels, outputs=('labels',),
                        description='pixel labels for the labelled share'))

    def finetune(context, stage_dir):
      return segmentation.train_segmenter(
          rt, stage_dir, model=model, name='finetune',
          loss_fn=objective.train_loss(cfg, rt.num_classes, mask_key, SEMI_KEY),
          label_folders=dict(joined(context), **{SEMI_KEY: os.path.join(
              context.workdir, 'semi_labels', 'labels')}),
          init_from=os.path.join(context.workdir, 'train',
                                 segmentation.MODEL_FILE),
          num_steps=cfg.finetune_steps)
    stages.append(Stage('finetune', finetune,
                        outputs=(segmentation.MODEL_FILE,),
                        description='Table 5: fine-tune with pixel labels'))
    final = 'finetune'

  def evaluate(context, stage_dir):
    _, variables = segmentation.load_trained(
        rt, os.path.join(context.workdir, final, segmentation.MODEL_FILE),
        model)
    scores = segmentation.evaluate_model(
        rt, stage_dir, model, variables,
        num_train_examples=rt.config.report.num_examples)
    if mesh_lib.is_primary():
      scores[figures.FIGURES_KEY] = box2seg_report.write_figures(
          rt, context.workdir, os.path.join(stage_dir, 'figures'), model,
          variables, rt.config.report.num_examples)
    return scores
  stages.append(Stage('evaluate', evaluate, description='y branch on val'))

  train_stages = tuple(s.name for s in stages
                       if s.name in ('pretrain', 'train', 'finetune'))
  return MethodPipeline(
      stages, eval_stage='evaluate', train_stages=train_stages,
      pseudo=(None if supervised_awl
              else PseudoLabels('grabcut', folders[GRABCUT_KEY])),
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
