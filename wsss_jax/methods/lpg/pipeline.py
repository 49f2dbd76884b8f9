"""LPG (Xie et al., CVPR 2021) as a pipeline of stages.

On the auxiliary set D_aux (pixel labels; classes disjoint from D's), the
stage-wise EM of Eq. (6) (Sec. 3.2, Fig. 2):

    aux/box_labels        D_aux's boxes filled (smaller box on top)
    aux/stage0/train      f_0 on them
    aux/stage1/generator  E-step: g_1 learns D_aux's ground truth from
                          [f_0's probability, box mask, image]
    aux/stage1/labels     g_1's masks of D_aux (fused, Eq. 7)
    aux/stage1/train      M-step: f_1 on them
    ...                   up to aux/stage<S>/generator (S = lpg.stages)

Deployment on D (boxes only; Sec. 3.3, Fig. 1):

    box_labels            D's boxes filled: f_0's labels and a reference
    dense_crf             the Box + DenseCRF reference masks
    stage0/train          f_0 on the box fills
    stage<s>/labels       g_s (g_S at every stage: `fixed`) on f_{s-1}'s
                          probabilities, fused by the overlap rate
    stage<s>/train        f_s on them; stage<s>/evaluate on val

f is the run's `config.model`; D's last f is the final model.  Paper first,
the official code where the paper is silent (docs/lpg.md).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any

import jax

from wsss_jax import common_stages as cs
from wsss_jax import segmentation
from wsss_jax.atomic import json_safe
from wsss_jax.crf import backend as crf_backend_lib
from wsss_jax.data.label_png import LabelFolder
from wsss_jax.host import box_crf
from wsss_jax.host.crf import CrfParams
from wsss_jax.methods.lpg import generate
from wsss_jax.methods.lpg import model as lpg_model
from wsss_jax.methods.lpg import objective
from wsss_jax.methods.lpg import report as lpg_report
from wsss_jax.models import weights as weights_lib
from wsss_jax.pseudo import engine
from wsss_jax.runtime import Runtime
from wsss_jax.stages import MethodPipeline, PseudoLabels, Stage
from wsss_jax.training import mesh as mesh_lib
from wsss_jax.training import state as state_lib

PSEUDO_KEY = objective.PSEUDO_KEY
# What the auxiliary EM never reads: deployment-only settings.
DEPLOYMENT_FIELDS = ('data', 'lpg.schedule', 'lpg.semi_fraction',
                     'lpg.box_crf', 'train.num_steps', 'variant')
# What the deployment's segmentation stages never read.
AUX_FIELDS = ('lpg.aux_data', 'lpg.aux_steps', 'lpg.generator')
# What D's box fills, its DenseCRF reference and f_0 never read: the
# generator's settings and the EM.
BEFORE_GENERATOR_FIELDS = AUX_FIELDS + (
    'variant', 'lpg.stages', 'lpg.schedule', 'lpg.fusion',
    'lpg.round1_input', 'lpg.padding_as_background', 'lpg.max_classes',
    'lpg.semi_fraction')


def generator_config(config):
  """The run config as an E-step sees it: `lpg.generator`'s optimiser,
  rate, batch, crop and steps; every layer at one rate (the paper's Adam
  has no parameter groups)."""
  config = config.copy_and_resolve_references()
  section = config.lpg.generator
  config.optim = section.optim
  config.optim.lr_mult.update(backbone_weight=1.0, backbone_bias=1.0,
                              head_weight=1.0, head_bias=1.0)
  config.optim.head_modules = ('generator',)
  config.input.update(batch_size=int(section.batch_size),
                      crop_size=int(section.crop_size))
  return config


def _stage(name: str, index: int, what: str) -> str:
  return f'{name}stage{index}/{what}'


def pipeline(rt: Runtime) -> MethodPipeline:
  """The stages of `config.lpg`."""
  config = rt.config
  options = objective.LPGOptions.from_config(config.lpg)
  aux = rt.with_data(config.lpg.aux_data)
  aux_config = aux.config.copy_and_resolve_references()
  aux_config.train.num_steps = int(config.lpg.aux_steps)
  aux = aux.with_config(aux_config)
  grt = aux.with_config(generator_config(aux.config))
  label_batch = int(config.lpg.label_batch_size)
  reference_images = int(config.lpg.reference_images)
  seg_loss = segmentation.cross_entropy_on(PSEUDO_KEY)

  def with_ignores(stage: Stage, fields) -> Stage:
    return dataclasses.replace(stage, ignores=tuple(stage.ignores)
                               + tuple(fields))

  # --- The stage-wise EM on the auxiliary set ---------------------------
  aux_stages = [
      cs.box_fill_stage(aux, 'aux/box_labels',
                        description="fill the auxiliary set's boxes"),
      cs.train_stage(aux, _stage('aux/', 0, 'train'), loss_fn=seg_loss,
                     label_folders={PSEUDO_KEY: cs.label_path(
                         'aux/box_labels')},
                     num_steps=int(config.lpg.aux_steps), validate=False,
                     description='f_0 on the auxiliary box fills')]
  for s in range(1, options.stages + 1):
    with_seg = options.uses_segmentation(s)
    net = lpg_model.build_lpg_model(grt.config, aux.num_classes,
                                    rt.compute_dtype,
                                    with_segmentation=with_seg)
    previous_f = _stage('aux/', s - 1, 'train')
    aux_stages.append(cs.train_stage(
        grt, _stage('aux/', s, 'generator'), model=net,
        loss_fn=objective.e_step_loss(options),
        model_inputs=('boxes', 'box_labels'), frozen_modules=('segmenter',),
        num_steps=int(config.lpg.generator.steps), validate=False,
        init_fn=functools.partial(_generator_init, grt,
                                  previous_f if with_seg else None),
        description=f'E-step {s}: g_{s} learns the ground truth of the '
        'auxiliary set'))
    if s < options.stages:
      labels = _stage('aux/', s, 'labels')
      aux_stages.append(_label_stage(
          aux, labels, net, options, generator_stage=_stage('aux/', s,
                                                            'generator'),
          segmenter_stage=previous_f if with_seg else None,
          batch_size=label_batch, compared=0))
      aux_stages.append(cs.train_stage(
          aux, _stage('aux/', s, 'train'), loss_fn=seg_loss,
          label_folders={PSEUDO_KEY: cs.label_path(labels)},
          num_steps=int(config.lpg.aux_steps), validate=False,
          description=f'M-step {s}: f_{s} on the masks of g_{s}'))
  aux_stages = [with_ignores(stage, DEPLOYMENT_FIELDS)
                for stage in aux_stages]

  # --- Deployment on D ----------------------------------------------------
  workers = crf_backend_lib.host_workers(config.crf.backend,
                                         int(config.eval.crf_workers))
  crf_params = CrfParams.from_config(config.lpg.box_crf.crf_params)
  stages = aux_stages + [with_ignores(stage, BEFORE_GENERATOR_FIELDS) for
                         stage in (
      cs.box_fill_stage(rt),
      _dense_crf_stage(rt, crf_params, workers, reference_images),
      cs.train_stage(rt, _stage('', 0, 'train'), loss_fn=seg_loss,
                     label_folders={PSEUDO_KEY: cs.label_path('box_labels')},
                     description='f_0 on the box fills'))]
  if options.semi_fraction > 0:
    stages.insert(len(aux_stages), cs.partial_labels_stage(
        rt, options.semi_fraction, name='semi_labels'))
  deploy = []
  for s in range(1, options.stages + 1):
    g = options.generator_stage(s)
    with_seg = options.uses_segmentation(g)
    net = lpg_model.build_lpg_model(rt.config, rt.num_classes,
                                    rt.compute_dtype,
                                    with_segmentation=with_seg)
    labels = _stage('', s, 'labels')
    folders = {PSEUDO_KEY: cs.label_path(labels)}
    loss = seg_loss
    if options.semi_fraction > 0:
      folders[objective.SEMI_KEY] = cs.label_path('semi_labels')
      loss = objective.semi_cross_entropy()
    deploy += [
        _label_stage(rt, labels, net, options,
                     generator_stage=_stage('aux/', g, 'generator'),
                     segmenter_stage=(_stage('', s - 1, 'train')
                                      if with_seg else None),
                     batch_size=label_batch, compared=reference_images),
        cs.train_stage(rt, _stage('', s, 'train'), loss_fn=loss,
                       label_folders=folders,
                       description=f'f_{s} on the masks of g_{g}'),
        cs.evaluate_stage(rt, _stage('', s, 'train'),
                          name=_stage('', s, 'evaluate'),
                          description=f'f_{s} on val')]
  stages += [with_ignores(stage, AUX_FIELDS) if stage.name.startswith(
      'stage') and stage.name.endswith(('train', 'evaluate')) else stage
             for stage in deploy]
  last = options.stages
  train_stages = tuple(stage.name for stage in stages
                       if stage.name.endswith(('train', 'generator')))
  return MethodPipeline(
      stages, eval_stage=_stage('', last, 'evaluate'),
      train_stages=train_stages,
      pseudo=PseudoLabels(_stage('', last, 'labels'),
                          cs.label_path(_stage('', last, 'labels'))),
      extra_results=functools.partial(_extra_results, options),
      report_section=lpg_report.report_section)


def _generator_init(rt: Runtime, segmenter_stage: str | None, context,
                    model, rng) -> tuple[dict[str, Any], dict[str, Any]]:
  """g at random (the paper trains it from scratch), f from the previous
  segmentation stage's weights."""
  crop = int(rt.config.input.crop_size)
  variables = jax.device_get(state_lib.random_variables(
      model, rng, (1, crop, crop, 3)))
  record: dict[str, Any] = {'generator': 'random'}
  if segmenter_stage:
    path = os.path.join(context.workdir, cs.model_path(segmenter_stage))
    variables = jax.device_get(generate.assemble_variables(
        variables, None, path))
    record.update(segmenter=os.path.abspath(path),
                  segmenter_sha256=weights_lib.file_sha256(path))
  return variables, record


def _dense_crf_stage(rt: Runtime, params: CrfParams, workers: int,
                     count: int) -> Stage:
  """The Box + DenseCRF reference masks of the first `count` training
  images (0: all), scored with the box fills of the same images."""
  def run(context, stage_dir):
    folder = LabelFolder(os.path.join(stage_dir, cs.LABELS))
    index = rt.dataset.index(rt.train_split)
    ids = index.image_ids[:count] if count else index.image_ids
    counts = {}
    if mesh_lib.is_primary():
      job = engine.LabelJob(
          outputs=(cs.LABELS,), host_fn=functools.partial(
              box_crf.box_crf_example, params=params,
              confidence=float(rt.config.lpg.box_crf.confidence),
              backend=rt.config.crf.backend), desc='Box + DenseCRF')
      counts = engine.run(job, rt.dataset.source(rt.train_split), ids,
                          {cs.LABELS: folder}, workers=workers)
    mesh_lib.barrier(f'lpg-dense-crf-{stage_dir}')
    box_fill = os.path.join(context.workdir, cs.label_path('box_labels'))
    return {'generation': json_safe(counts), 'images': len(ids),
            'quality': segmentation.label_quality(rt, folder.root,
                                                  len(ids)),
            'box_fill_quality': segmentation.label_quality(rt, box_fill,
                                                           len(ids))}
  return Stage('dense_crf', run, outputs=(cs.LABELS,),
               ignores=cs.LABEL_STAGE_IGNORES,
               description='Box + DenseCRF masks (the reference of Table 9)')


def _label_stage(rt: Runtime, name: str, net, options, *,
                 generator_stage: str, segmenter_stage: str | None,
                 batch_size: int, compared: int) -> Stage:
  """g's fused masks of every training image of `rt`'s dataset, scored
  against its ground truth (also on the first `compared` images, those of
  the references, when > 0)."""
  def run(context, stage_dir):
    folder = LabelFolder(os.path.join(stage_dir, cs.LABELS))
    index = rt.dataset.index(rt.train_split)
    counts = {}
    if mesh_lib.is_primary():
      variables = generate.assemble_variables(
          generate.abstract_variables(net),
          os.path.join(context.workdir, cs.model_path(generator_stage)),
          (os.path.join(context.workdir, cs.model_path(segmenter_stage))
           if segmenter_stage else None))
      first = generate.label_pass(net, rt.normalization, options.fusion,
                                  rt.compute_dtype)
      counts = engine.run(
          generate.label_job(variables, first, batch_size),
          rt.dataset.source(rt.train_split), index.image_ids,
          {generate.LABEL: folder},
          sizes=list(zip(index.heights, index.widths)))
    mesh_lib.barrier(f'lpg-labels-{stage_dir}')
    out = {'generation': json_safe(counts),
           'quality': segmentation.label_quality(rt, folder.root)}
    if compared:
      out['quality_compared'] = segmentation.label_quality(rt, folder.root,
                                                           compared)
    return out
  return Stage(name, run, outputs=(cs.LABELS,),
               ignores=cs.LABEL_STAGE_IGNORES,
               description=f'the masks of {generator_stage}')


def _extra_results(options: objective.LPGOptions,
                   by_stage: dict[str, dict[str, Any]]) -> dict[str, Any]:
  """results.json['lpg']: per deployment stage the masks' mIoU on D's
  training split and f's val mIoU; the references; the EM on D_aux."""
  def quality(name):
    return (by_stage.get(name, {}).get('quality') or {}).get('miou')

  crf = by_stage.get('dense_crf', {})
  out: dict[str, Any] = {
      'fusion': options.fusion, 'schedule': options.schedule,
      'round1_input': options.round1_input,
      # On the first `lpg.reference_images` training images of D.
      'references': {
          'box_fill': (crf.get('box_fill_quality') or {}).get('miou'),
          'dense_crf': quality('dense_crf'), 'images': crf.get('images'),
          'box_fill_all_images': quality('box_labels')}}
  rows = []
  for s in range(1, options.stages + 1):
    scores = by_stage.get(_stage('', s, 'evaluate'), {})
    generation = by_stage.get(_stage('', s, 'labels'), {}).get(
        'generation', {})
    row = {'stage': s, 'generator': options.generator_stage(s),
           'pseudo_miou': quality(_stage('', s, 'labels')),
           'pseudo_miou_compared': (by_stage.get(
               _stage('', s, 'labels'), {}).get('quality_compared')
                                    or {}).get('miou'),
           'val_miou': scores.get('miou'),
           'truncated_images': generation.get('truncated')}
    if 'without_crf' in scores:
      row['val_miou_without_crf'] = scores['without_crf']['miou']
    rows.append(row)
  out['stages'] = rows
  out['aux'] = [{'stage': s, 'pseudo_miou': quality(_stage('aux/', s,
                                                           'labels'))}
                for s in range(1, options.stages)]
  out['aux_box_fill'] = quality('aux/box_labels')
  return out
