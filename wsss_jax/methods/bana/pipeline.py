"""BANA (Oh, Kim, Ham, CVPR 2021) as a pipeline of stages.

    classifier      stage 1 (Sect. 3.1): the Labeler, a classification
                    network trained on boxes with background-aware pooling
                    (`bana_bap`; `pooling='gap'` for Table 1's GAP)
    labels          stage 2 (Sect. 3.2): Y_crf and Y_ret for every training
                    image (`bana_labels`, orchestrated by `bana_generate`)
    gap_classifier, gap_labels
                    the same with GAP, to report Table 1's comparison
                    (`bana.compare_gap`); side stages, run beside the
                    next ones
    semi_labels     (`semi` variant) ground-truth masks for a share of images
    train           stage 3 (Sect. 3.3): DeepLab with the cosine classifier
                    and the noise-aware loss (`bana_losses`; Table 3 rows and
                    the Table 4 label choices via `bana.loss`)
    evaluate        4 scales × flip, averaged cosines, DenseCRF; scored with
                    and without the CRF

Paper first, the official code where the paper is silent, the code's other
behaviours behind the switches of configs/bana.py (docs/bana.md, "Defaults
and switches").
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any

from wsss_jax import common_stages as cs
from wsss_jax import segmentation
from wsss_jax.atomic import json_safe
from wsss_jax.data.label_png import LabelFolder
from wsss_jax.methods.bana import objective
from wsss_jax.methods.bana import generate as bana_generate
from wsss_jax.methods.bana import report as bana_report
from wsss_jax.reporting import figures
from wsss_jax.runtime import Runtime
from wsss_jax.stages import MethodPipeline, PseudoLabels, Stage
from wsss_jax.training import mesh as mesh_lib

Y_CRF, Y_RET = bana_generate.Y_CRF, bana_generate.Y_RET
SEMI_KEY = cs.SEMI_KEY


# ----------------------------------------------------------------------------
# Stages
# ----------------------------------------------------------------------------
def _classifier_stages(rt: Runtime, prefix: str, pooling: str, *,
                       label_images: int = 0, compare_images: int = 0,
                       with_figures: bool = False) -> list[Stage]:
  """Stage 1 and stage 2 for one pooling ('bap' or 'gap').

  Stage 2 labels the first `label_images` training images (0: all); with
  `compare_images` it also scores its labels on the first that many images
  ('quality_on_first', the images a subset-labelled GAP run has).  With
  `with_figures` stage 2 also writes the report's Figs. 4-5 images.
  """
  config = objective.classifier_config(rt.config, pooling)
  rt1 = rt.with_config(config)
  model = segmentation.build_segmenter(rt1)
  name = f'{prefix}classifier'

  def labels(context, stage_dir, variables):
    options = bana_generate.LabelOptions.from_config(config)
    folders = {key: LabelFolder(os.path.join(stage_dir, key))
               for key in (Y_CRF, Y_RET, bana_generate.AGREEMENT)}
    generation = {}
    if mesh_lib.is_primary():
      index = rt.dataset.index(rt.train_split)
      count = label_images or len(index.image_ids)
      generation = bana_generate.generate(
          rt.dataset.source(rt.train_split), index.image_ids[:count],
          index.heights[:count], index.widths[:count], variables,
          bana_generate.make_passes(model, rt.normalization, options),
          options, folders, workers=int(rt.config.eval.crf_workers))
    mesh_lib.barrier(f'bana-labels-{stage_dir}')
    result = {'generation': json_safe(generation), 'quality': {
        key: segmentation.label_quality(rt, folder.root, label_images)
        for key, folder in folders.items()}}
    if compare_images:
      result['quality_on_first'] = {
          key: segmentation.label_quality(rt, folder.root, compare_images)
          for key, folder in folders.items()}
    if with_figures and mesh_lib.is_primary():
      result[figures.FIGURES_KEY] = bana_report.write_figures(
          rt, context.workdir, os.path.join(stage_dir, 'figures'), model,
          variables, options, folders, rt.config.report.num_examples)
    return result

  return [
      cs.train_stage(
          rt1, name, model=model, validate=False,
          loss_fn=objective.classifier_loss(
              objective.BapOptions.from_config(config.bana)),
          description=f'stage 1: the Labeler with {pooling.upper()}'),
      cs.model_label_stage(
          rt1, f'{prefix}labels', name, model, labels,
          outputs=(Y_CRF, Y_RET, bana_generate.AGREEMENT),
          description=f'stage 2: Y_crf and Y_ret from the {pooling.upper()} '
          'Labeler'),
  ]


def pipeline(rt: Runtime) -> MethodPipeline:
  """The stages of `config.bana.variant`."""
  cfg = rt.config.bana
  # Options are resolved (and bad values refused, naming the field) before
  # any stage is built; bana.pooling is checked by BapOptions.
  nal_options = objective.NoiseAwareOptions.from_config(cfg)
  compare = bool(cfg.compare_gap) and cfg.pooling == 'bap'
  gap_images = int(cfg.gap_label_images) if compare else 0
  stages = _classifier_stages(rt, '', cfg.pooling, compare_images=gap_images,
                              with_figures=True)
  if compare:
    # Nothing after reads the GAP Labeler's outputs but the final results:
    # it trains beside stage 3 (`Stage.side`).
    stages += [dataclasses.replace(stage, side=True) for stage in
               _classifier_stages(rt, 'gap_', 'gap', label_images=gap_images)]
  folders = {Y_CRF: os.path.join('labels', Y_CRF),
             Y_RET: os.path.join('labels', Y_RET)}
  semi = cfg.variant == 'semi'
  if semi:
    stages.append(cs.partial_labels_stage(
        rt, cfg.semi_fraction, workers=int(rt.config.eval.crf_workers)))
    folders[SEMI_KEY] = cs.label_path('semi_labels')
  model = segmentation.build_segmenter(rt)
  num_steps = int(rt.config.train.num_steps)
  stages.append(cs.train_stage(
      rt, 'train', model=model, label_folders=folders,
      loss_fn=objective.segmentation_loss(nal_options, num_steps,
                                          SEMI_KEY if semi else None),
      description=f'stage 3: segmentation with {cfg.loss}'))
  # With the CRF on, the scores include 'without_crf' (same forward pass).
  stages.append(cs.evaluate_stage(
      rt, 'train', model=model,
      description='multi-scale + flip, with and without CRF'))

  return MethodPipeline(
      stages, eval_stage='evaluate', train_stages=tuple(
          s.name for s in stages if s.name.endswith('classifier')
          or s.name == 'train'),
      pseudo=PseudoLabels('labels', folders[Y_CRF], key=Y_CRF),
      extra_results=functools.partial(_extra_results, cfg.pooling),
      report_section=bana_report.label_table)


def _extra_results(pooling: str, by_stage: dict[str, dict[str, Any]]
                   ) -> dict[str, Any]:
  """Table 1's pseudo-label rows ({'bap'|'gap': {'y_crf', 'y_ret',
  'agreement' mIoU, 'agreement_coverage_pct'}}) and stage-2 throughput."""
  out: dict[str, Any] = {'pseudo_labels': {}}

  def row(quality):
    values = {key: scores['miou'] for key, scores in quality.items()}
    if bana_generate.AGREEMENT in quality:
      values['agreement_coverage_pct'] = 100.0 - float(
          quality[bana_generate.AGREEMENT].get('unlabeled_pct', 0.0))
    values['images'] = quality.get(Y_CRF, {}).get('num_images')
    return values

  for stage, name in (('labels', pooling), ('gap_labels', 'gap')):
    result = by_stage.get(stage)
    if not result:
      continue
    out['pseudo_labels'][name] = row(result.get('quality', {}))
    if 'quality_on_first' in result:
      # The same images as the GAP labels: Table 1's comparison.
      out['pseudo_labels'][f'{name}_on_gap_images'] = row(
          result['quality_on_first'])
    if stage == 'labels':
      out['label_generation'] = result.get('generation', {})
  evaluation = by_stage.get('evaluate', {})
  if 'without_crf' in evaluation:
    out['val_miou_without_crf'] = evaluation['without_crf']['miou']
  return out

