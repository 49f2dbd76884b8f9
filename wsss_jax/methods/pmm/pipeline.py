"""PMM (Li et al., ICCV 2021) as a pipeline of stages.

    classify            SEAM on the image labels (two views, ER, ECR, PCM):
                        the base network (the paper's "SEAM with ResNet-38")
    base_mask           its multi-scale CAM, CRF with α = 24, the pixels
                        whose marginal exceeds 0.9: the base mask that
                        labels the multi-crop training crops
    classify_multicrop  SEAM again, from the initial weights, on windows of
                        the multi-crop layout labelled by the 10 % / 10 %
                        rule (multi-crop training, Sec. 3.5 / 4.1)
    pseudo_masks        the multi-crop CAM of every training image ->
                        Eq. (1) -> CVS + PPMG (Algorithm 1): the labels; on
                        the first `compare_images` images also Table 2's
                        CRF, CRF + CVS and PPMG-without-CVS rows and the
                        CAM's mIoU over the background thresholds
    round1/fsss         PSPNet (+ auxiliary FCN head) on the PPMG labels
                        with PUS (Eqs. 10-13)
    round1/evaluate     scored on val, with and without the test CRF
    round2/relabel      cyclic pseudo-masks (Sec. 3.5): round 1's network
                        labels the training split (multi-scale + flip + CRF)
    round2/fsss         PSPNet from the initial weights on them, without PUS
    round2/evaluate     ... one round per `pmm.cycles`

With `multicrop_train=False` the two middle stages are skipped and the
pseudo-masks come from `classify`'s network ("multi-crop test" only).
Paper first, the official code where the paper is silent (docs/pmm.md).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import shutil
from typing import Any

import jax
import numpy as np

from wsss_jax import common_stages as cs
from wsss_jax import segmentation
from wsss_jax.atomic import json_safe
from wsss_jax.crf import backend as crf_backend_lib
from wsss_jax.data import schema
from wsss_jax.data.label_png import LabelFolder
from wsss_jax.methods.pmm import generate
from wsss_jax.methods.pmm import multicrop_sampler
from wsss_jax.methods.pmm import objective
from wsss_jax.methods.pmm import report as pmm_report
from wsss_jax.methods.pmm import seam
from wsss_jax.pseudo import engine
from wsss_jax.reporting import figures
from wsss_jax.runtime import Runtime
from wsss_jax.stages import MethodPipeline, PseudoLabels, round_name, rounds
from wsss_jax.training import mesh as mesh_lib

# What the stages before the segmenter never read: the segmenter's network,
# recipe and PUS, the cycles, the evaluation, and the variant's name (it only
# picks pus_mode).
SEGMENTER_FIELDS = (
    'model', 'train.num_steps', 'variant', 'pmm.pus_mode', 'pmm.pus_beta',
    'pmm.pus_kappa', 'pmm.pus_switch_scope', 'pmm.pus_group_size',
    'pmm.pus_ignore_inclusive', 'pmm.aux_weight', 'pmm.cycles',
    'pmm.cyclic_checkpoint', 'pmm.relabel')
# What the segmenter's stages never read: the CAM network's settings (a
# change there changes the labels, whose stage then reruns them anyway).
CAM_FIELDS = tuple(f'pmm.{name}' for name in (
    'cam_model', 'second_view_scale', 'pcm_levels', 'pcm_channels',
    'classifier_dropout',
    'ecr_top', 'rvmin_loss', 'classify_steps', 'classify_lr',
    'classify_head_lr_mult', 'classify_crop_size', 'classify_scale_range',
    'classify_batch_size', 'multicrop_steps'))


def classify_config(config, *, multicrop_window: int | None = None):
  """The run config as the classification stages see it: the CAM network
  (`pmm.cam_model`), its rate and batch (`pmm.classify_lr`,
  `.classify_batch_size`), its new layers as the head group at
  `pmm.classify_head_lr_mult` times the rate (biases twice that), its crop
  and scale range (`pmm.classify_crop_size`, `.classify_scale_range`; 0 and
  () keep `config.input`'s) and, for multi-crop training, the window as the
  crop."""
  config = config.copy_and_resolve_references()
  crop = int(config.pmm.get('classify_crop_size', 0) or 0)
  if crop:
    config.input.crop_size = crop
  scale_range = tuple(config.pmm.get('classify_scale_range', ()) or ())
  if scale_range:
    config.input.scale_range = scale_range
  config.model = config.pmm.cam_model
  config.optim.lr = float(config.pmm.classify_lr)
  config.optim.head_modules = ('classifier', 'pcm')
  mult = config.pmm.get('classify_head_lr_mult')
  if mult is not None:          # absent: the run's own groups
    config.optim.lr_mult.update(head_weight=float(mult),
                                head_bias=2.0 * float(mult))
  config.input.batch_size = int(config.pmm.classify_batch_size)
  if multicrop_window:
    config.input.crop_size = int(multicrop_window)
  return config


def relabel_eval_config(config):
  """How a round's network labels the training split for the next
  (`pmm.relabel`: scales, flip, CRF, sliding windows; the official code:
  6 scales × flip, windows 512 at stride 480, the test CRF)."""
  eval_config = config.eval.copy_and_resolve_references()
  relabel = config.pmm.relabel
  eval_config.update(scales=tuple(relabel.scales), flip=bool(relabel.flip),
                     crf=bool(relabel.crf),
                     window_size=int(relabel.get('window_size', 0)),
                     window_stride=int(relabel.get('window_stride', 0)))
  eval_config.crf_params = relabel.crf_params
  return eval_config


def _with_ignores(stage, fields):
  return dataclasses.replace(stage, ignores=tuple(stage.ignores)
                             + tuple(fields))


def pipeline(rt: Runtime) -> MethodPipeline:
  """The stages of `config.pmm`."""
  options = objective.PMMOptions.from_config(rt.config.pmm)
  crt = rt.with_config(classify_config(rt.config))
  cam_model = seam.build_seam_model(crt.config, rt.num_classes,
                                    rt.compute_dtype)
  classify_steps = int(rt.config.pmm.classify_steps)
  stages = [cs.train_stage(
      crt, 'classify', model=cam_model, num_steps=classify_steps,
      loss_fn=objective.classification_loss(options, multicrop=False),
      validate=False,
      description='SEAM on the image labels (the base network)')]
  cam_stage = 'classify'
  if options.multicrop_train:
    mrt = rt.with_config(classify_config(
        rt.config, multicrop_window=options.multicrop_window))
    stages.append(cs.model_label_stage(
        crt, 'base_mask', 'classify', cam_model,
        functools.partial(_base_mask, crt, cam_model, options),
        outputs=(generate.BASE,),
        description='multi-scale CAM + CRF (alpha 24): the base mask'))
    stages.append(_multicrop_train_stage(mrt, cam_model, options))
    cam_stage = 'classify_multicrop'
  stages.append(cs.model_label_stage(
      crt, 'pseudo_masks', cam_stage, cam_model,
      functools.partial(_pseudo_masks, crt, cam_model, options),
      outputs=generate.TABLE2_ROWS,
      description='multi-crop CAM -> CVS + PPMG (Algorithm 1)'))
  stages = [_with_ignores(stage, SEGMENTER_FIELDS) for stage in stages]

  round_count = options.cycles + 1
  best_val = options.cyclic_checkpoint == 'best_val'
  if best_val and options.cycles and int(rt.config.train.eval_every) <= 0:
    raise ValueError(
        "pmm.cyclic_checkpoint='best_val' relabels with the round's best "
        'periodic validation: set train.eval_every > 0 (the official code '
        'validates every 2,000 of 20,000 steps).')

  def build_round(k, name):
    if k == 1:
      labels = os.path.join('pseudo_masks', generate.PPMG)
      round_stages = []
    else:
      relabel = cs.prediction_label_stage(
          rt, name('relabel'), round_name_of(k - 1, 'fsss'),
          relabel_eval_config(rt.config), best=best_val,
          description='cyclic pseudo-masks: the '
          + ('best-val' if best_val else 'last') + ' network labels the '
          'training split')
      round_stages = [relabel]
      labels = cs.label_path(name('relabel'))
    round_stages += [
        cs.train_stage(
            rt, name('fsss'),
            loss_fn=objective.segmentation_loss(options, use_pus=(k == 1)),
            label_folders={objective.PSEUDO_KEY: labels},
            # The official cyclic step relabels with the checkpoint of the
            # best val mIoU under the test protocol (config.eval).
            keep_best=best_val and k < round_count,
            selection_eval=rt.config.eval if best_val else None,
            description=('PSPNet on the PPMG labels with PUS' if k == 1 else
                         'PSPNet on the cyclic pseudo-masks, without PUS')),
        cs.evaluate_stage(rt, name('fsss'), name=name('evaluate'),
                          figures_fn=functools.partial(_round_figures, rt, k),
                          description='the segmenter on val')]
    # A round does not depend on how many follow it; the first does not
    # relabel.
    own = CAM_FIELDS + ('pmm.cycles',) + (('pmm.relabel',) if k == 1 else ())
    return [_with_ignores(stage, own) for stage in round_stages]

  stages += rounds(round_count, build_round)
  last = round_name_of(round_count, '')
  train_stages = tuple(stage.name for stage in stages
                       if stage.name.endswith(('classify',
                                               'classify_multicrop', 'fsss')))
  return MethodPipeline(
      stages, eval_stage=last + 'evaluate', train_stages=train_stages,
      pseudo=PseudoLabels('pseudo_masks',
                          os.path.join('pseudo_masks', generate.PPMG),
                          key=generate.PPMG),
      extra_results=functools.partial(_extra_results, options, round_count),
      report_section=pmm_report.report_section)


def round_name_of(k: int, stage: str) -> str:
  """The name `stages.rounds` gives stage `stage` of round k."""
  return round_name(k, stage)


def _multicrop_train_stage(mrt: Runtime, cam_model,
                           options: objective.PMMOptions):
  """SEAM on multi-crop windows (crop labels from the base mask), from the
  initial weights (the paper trains its multi-crop network from ImageNet)."""
  config = mrt.config
  transform = multicrop_sampler.MultiCropTransform(
      crop_size=options.multicrop_window, scales=options.multicrop_scales,
      stride=options.multicrop_stride, layout=options.multicrop_layout,
      num_foreground=mrt.num_classes - 1, base_key=objective.BASE_KEY,
      ratio=options.crop_label_ratio, max_tries=options.crop_label_tries,
      flip=bool(config.input.flip),
      color_jitter=float(config.input.color_jitter),
      image_pad_value=mrt.pad_color, max_boxes=int(config.input.max_boxes))
  base = os.path.join('base_mask', generate.BASE)
  return cs.train_stage(
      mrt, 'classify_multicrop', model=cam_model,
      loss_fn=objective.classification_loss(options, multicrop=True),
      label_folders={objective.BASE_KEY: base},
      num_steps=int(config.pmm.multicrop_steps), validate=False,
      transform=transform, description='SEAM on multi-crop windows')


def _label_batch(rt: Runtime) -> int:
  return int(rt.config.eval.batch_size)


def _base_mask(rt: Runtime, model, options: objective.PMMOptions, context,
               stage_dir: str, variables) -> dict[str, Any]:
  """The base mask of every training image, scored on its sure pixels."""
  del context
  host = generate.HostOptions.from_options(options, rt.config.crf.backend)
  folder = LabelFolder(os.path.join(stage_dir, generate.BASE))
  index = rt.dataset.index(rt.train_split)
  counts = {}
  if mesh_lib.is_primary():
    first = generate.base_cam_pass(model, rt.normalization, options)
    counts = engine.run(
        generate.base_mask_job(variables, first, host, _label_batch(rt)),
        rt.dataset.source(rt.train_split), index.image_ids,
        {generate.BASE: folder},
        sizes=list(zip(index.heights, index.widths)),
        workers=_workers(rt))
  mesh_lib.barrier(f'pmm-base-{stage_dir}')
  return {'generation': json_safe(counts),
          'quality': segmentation.label_quality(rt, folder.root)}


def _workers(rt: Runtime) -> int:
  return crf_backend_lib.host_workers(rt.config.crf.backend,
                                      int(rt.config.eval.crf_workers))


def _pseudo_masks(rt: Runtime, model, options: objective.PMMOptions,
                  context, stage_dir: str, variables) -> dict[str, Any]:
  """PPMG labels of every training image; Table 2's rows and the CAM sweep
  on the first `compare_images` (0: all)."""
  host = generate.HostOptions.from_options(options, rt.config.crf.backend)
  folders = {name: LabelFolder(os.path.join(stage_dir, name))
             for name in generate.TABLE2_ROWS}
  index = rt.dataset.index(rt.train_split)
  count = options.compare_images or len(index.image_ids)
  count = min(count, len(index.image_ids))
  sizes = list(zip(index.heights, index.widths))
  source = rt.dataset.source(rt.train_split)
  first = generate.multicrop_cam_pass(model, rt.normalization, options)
  compared, labelled = {}, {}
  if mesh_lib.is_primary():
    # The CAM sweep and the empty-CAM share are counted while the compared
    # images' maps are made: a resumed stage makes all of them again (one
    # folder emptied is enough, the engine skips only complete images).
    shutil.rmtree(folders[generate.CRF].root, ignore_errors=True)
    # The compared images first: their PPMG maps are reused by the full
    # pass, which skips images whose PNG exists.
    compared = engine.run(
        generate.pseudo_mask_job(variables, first, host, _label_batch(rt),
                                 compare=True),
        source, index.image_ids[:count], folders, sizes=sizes[:count],
        workers=_workers(rt))
    labelled = engine.run(
        generate.pseudo_mask_job(variables, first, host, _label_batch(rt),
                                 compare=False),
        source, index.image_ids, {generate.PPMG: folders[generate.PPMG]},
        sizes=sizes, workers=_workers(rt))
  mesh_lib.barrier(f'pmm-pseudo-{stage_dir}')
  table = None
  if mesh_lib.is_primary():
    items = _figure_items(rt, first, variables,
                          min(4, int(rt.config.report.num_examples)))
    table = pmm_report.write_pseudo_mask_figures(
        context.workdir, os.path.join(stage_dir, 'figures'), items, host)
  cam_counts = {k: v for k, v in compared.items() if k.startswith('cam/')}
  sweep = generate.cam_sweep(cam_counts, options.cam_thresholds,
                             rt.num_classes)
  quality = {name: segmentation.label_quality(rt, folder.root, count)
             for name, folder in folders.items()}
  quality['ppmg_all_images'] = segmentation.label_quality(
      rt, folders[generate.PPMG].root)
  generation = {key: value for key, value in labelled.items()
                if key in engine.RUN_KEYS}
  if compared.get('present_classes'):
    sweep['empty_pct'] = (100.0 * compared.get('empty_cams', 0)
                          / compared['present_classes'])
  out = {'generation': json_safe(generation), 'compared_images': count,
         'cam': sweep, 'quality': json_safe(quality)}
  if table:
    out[figures.FIGURES_KEY] = table
  return out


def _round_figures(rt: Runtime, round_no: int, context, stage_dir: str, net,
                   variables):
  return pmm_report.write_prediction_figures(
      rt, context.workdir, os.path.join(stage_dir, 'figures'), net,
      variables, rt.config.report.num_examples, round_no)


def _figure_items(rt: Runtime, first, variables, count: int):
  """Host items (example + its multi-crop CAM) of the first `count`
  training images, for the pseudo-mask figure."""
  source = rt.dataset.source(rt.train_split)
  items = []
  for i in range(min(count, len(source))):
    example = dict(source[i])
    batch = {schema.IMAGE: np.asarray(example[schema.IMAGE])[None],
             schema.IMAGE_LABELS: np.asarray(
                 example[schema.IMAGE_LABELS])[None]}
    example['cam'] = np.asarray(jax.device_get(first(variables,
                                                     batch))['cam'])[0]
    items.append(example)
  return items


def _extra_results(options: objective.PMMOptions, round_count: int,
                   by_stage: dict[str, dict[str, Any]]) -> dict[str, Any]:
  """results.json['pmm']: the CAM's best threshold and mIoU, Table 2's
  pseudo-mask rows, every round's val mIoU with and without the CRF."""
  out: dict[str, Any] = {'cyclic_checkpoint': options.cyclic_checkpoint,
                         'cycles': options.cycles}
  labels = by_stage.get('pseudo_masks', {})
  if labels.get('cam'):
    out['cam_miou'] = labels['cam']['miou']
    out['cam_threshold'] = labels['cam']['threshold']
    out['cam_curve'] = labels['cam']['curve']
    if 'empty_pct' in labels['cam']:
      out['cam_empty_pct'] = labels['cam']['empty_pct']
  quality = labels.get('quality') or {}
  if quality:
    out['pseudo_masks'] = {name: quality[name]['miou']
                           for name in generate.TABLE2_ROWS
                           if name in quality}
    out['pseudo_masks']['images'] = labels.get('compared_images')
    out['pseudo_masks']['split'] = 'train'
    if 'ppmg_all_images' in quality:
      out['pseudo_masks']['ppmg_all_images'] = (
          quality['ppmg_all_images']['miou'])
  base = by_stage.get('base_mask', {}).get('quality')
  if base:
    out['base_mask'] = {'miou': base['miou'],
                        'unlabeled_pct': base.get('unlabeled_pct')}
  out['rounds'] = []
  for k in range(1, round_count + 1):
    scores = by_stage.get(round_name_of(k, 'evaluate'), {})
    row = {'round': k, 'pus': k == 1 and options.pus_mode != 'none',
           'val_miou': scores.get('miou')}
    if 'without_crf' in scores:
      row['val_miou_without_crf'] = scores['without_crf']['miou']
    best = by_stage.get(round_name_of(k, 'fsss'), {}).get('best')
    if best:
      # Which checkpoint labelled the next round; chosen on val.
      row['selected_checkpoint'] = {
          'step': best.get('step'), 'val_miou': best.get('score'),
          'split': (best.get('protocol') or {}).get('split'),
          'protocol': best.get('protocol'),
          'max_images': best.get('max_images')}
    relabel = by_stage.get(round_name_of(k, 'relabel'), {}).get('quality')
    if relabel:
      row['label_miou'] = relabel['miou']
    elif k == 1 and quality.get('ppmg_all_images'):
      row['label_miou'] = quality['ppmg_all_images']['miou']
    out['rounds'].append(row)
  return out
