"""RRM (Zhang et al., AAAI 2020) as a pipeline of stages.

    classify    the classification network RRM starts from (the official
                code's res38_cls.pth, a PSA classifier): the multi-label
                soft-margin loss alone, on the same image labels
    train       one-step RRM (Algorithm 1): every step makes the reliable
                labels of Eqs. 2–7 (multi-scale CAM, DenseCRF on
                `config.crf.backend`, top-40 % rule, agreement) and updates
                the whole network with L_class + L_ce + λ·L_energy
    cam_quality the final network's CAM labels (argmax of [P_bg, P_fg],
                Eqs. 2–4) on the first training images, scored against the
                ground truth: the "CAM mIoU" of results.json
    evaluate    the segmentation branch, single scale, scored with and
                without the test CRF (with Fig. 3's rows for the report)

The two-step variant (`:two_step`, Table 5) names the last stage
`one_step_evaluate` and continues:

    one_step_labels  the one-step network's predictions on the training
                     split (single scale, the test CRF): the labels
    deeplab          the benchmark's segmenter (`config.model`) trained on
                     them from its own initialisation, with its own recipe
                     (`rrm.second_step`)
    evaluate         the segmenter, scored like the one-step network

Paper first, the official code where the paper is silent (docs/rrm.md).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from wsss_jax import common_stages as cs
from wsss_jax import config_checks
from wsss_jax import segmentation
from wsss_jax.crf import dense_crf as jax_crf
from wsss_jax.crf import lattice
from wsss_jax.crf.backend import JaxCrfBackend
from wsss_jax.atomic import json_safe
from wsss_jax.data import schema
from wsss_jax.data.label_png import LabelFolder
from wsss_jax.host.crf import CrfParams
from wsss_jax.methods.rrm import hparams
from wsss_jax.methods.rrm import labels as labels_lib
from wsss_jax.methods.rrm import model as rrm_model
from wsss_jax.methods.rrm import objective
from wsss_jax.methods.rrm import report as rrm_report
from wsss_jax.ops import image as image_ops
from wsss_jax.ops.resize import resize_bilinear
from wsss_jax.pseudo import engine
from wsss_jax.runtime import Runtime
from wsss_jax.stages import MethodPipeline, PseudoLabels
from wsss_jax.training import mesh as mesh_lib

CAM_FOLDER = 'cam'
PSEUDO_KEY = 'pseudo'

# Batches whose lattices size the in-step CRF's table, and the margin over
# the largest: a batch that still overflows is recomputed with a full table.
_CAPACITY_BATCHES = 4
_CAPACITY_MARGIN = 1.25


def crf_capacity(rt: Runtime, params: CrfParams) -> tuple[int, ...] | None:
  """Lattice capacities for the 'jax' backend from the first training
  batches (None on a host backend)."""
  if rt.config.crf.backend != JaxCrfBackend.name:
    return None
  batches = segmentation.training_batches(rt)
  counts = None
  for _ in range(_CAPACITY_BATCHES):
    found = jax_crf.lattice_capacity(
        jnp.asarray(next(batches)[schema.IMAGE]), params)
    counts = found if counts is None else tuple(map(max, counts, found))
  return tuple(lattice.capacity_for(int(c * _CAPACITY_MARGIN))
               for c in counts)


def classify_config(config):
  """The run config as the classification stage sees it: its own learning
  rate and batch size (`rrm.classify_lr`, `rrm.classify_batch_size`; the
  official code starts from a classifier trained beforehand with its own
  settings)."""
  config = config.copy_and_resolve_references()
  config.optim.lr = float(config.rrm.classify_lr)
  config.input.batch_size = int(config.rrm.classify_batch_size)
  return config


def second_step_config(config):
  """The run config as the two-step variant's segmenter sees it: its model
  (`rrm.second_step.model`, a `config.model` section) and recipe
  (`rrm.second_step.lr`, `.batch_size`, `.steps`), the segmenter's head
  group, validated at the end only."""
  config = config.copy_and_resolve_references()
  second = config.rrm.second_step
  config.model = second.model
  config.optim.lr = float(second.lr)
  config.optim.head_modules = ('head',)
  config.input.batch_size = int(second.batch_size)
  config.train.update(num_steps=int(second.steps), eval_every=0)
  return config


def label_eval_config(config):
  """How the one-step network labels the training split for the second
  step: `config.eval` at one scale, without flip, with the CRF of
  `rrm.second_step.crf` / `.crf_params` (the fields the label stage owns; it
  ignores `config.eval`)."""
  eval_config = config.eval.copy_and_resolve_references()
  eval_config.update(scales=(1.0,), flip=False,
                     crf=bool(config.rrm.second_step.crf))
  eval_config.crf_params = config.rrm.second_step.crf_params
  return eval_config


def pipeline(rt: Runtime) -> MethodPipeline:
  """The stages of `config.rrm.variant` (Table 2 rows, Table 5)."""
  rt = rt.with_config(hparams.apply_hparam_preset(rt.config))
  cfg = rt.config.rrm
  options = objective.RRMOptions.from_config(cfg)
  model = rrm_model.build_rrm_model(rt.config, rt.num_classes,
                                    rt.compute_dtype)
  classify_steps = int(config_checks.number('rrm.classify_steps',
                                            cfg.classify_steps, 0))
  stages = []
  if classify_steps:
    stages.append(cs.train_stage(
        rt.with_config(classify_config(rt.config)), 'classify', model=model,
        loss_fn=objective.classification_loss(), num_steps=classify_steps,
        validate=False,
        description='the classification network (image labels only)'))

  def train_loss():
    capacity = (crf_capacity(rt, options.label_crf)
                if options.label_source == 'rrm' else None)
    return objective.rrm_loss(options, rt.num_classes, rt.config.crf.backend,
                              capacity, int(rt.config.eval.crf_workers))
  # Without a classify stage, training starts from model.init_weights (a
  # converted res38_cls.pth, the official code's start).
  train = cs.train_stage(
      rt, 'train', model=model, loss_fn=_Deferred(train_loss),
      init_stage='classify' if classify_steps else None,
      description='one-step RRM: online reliable labels, CE + energy')
  # The in-step CRF's backend changes the labels the step trains on.
  train = dataclasses.replace(train, ignores=tuple(
      field for field in train.ignores if field != 'crf'))
  cam_quality = cs.model_label_stage(
      rt, 'cam_quality', 'train', model,
      functools.partial(_cam_labels, rt, model, options,
                        int(cfg.cam_quality_images)),
      outputs=(CAM_FOLDER,),
      description='CAM labels of the final network on training images')
  two_step = cfg.variant == 'two_step'

  def fig3(context, stage_dir, net, variables):
    return rrm_report.write_figures(
        rt, context.workdir, os.path.join(stage_dir, 'figures'), net,
        variables, options, rt.config.report.num_examples)
  one_step_evaluate = cs.evaluate_stage(
      rt, 'train', model=model, figures_fn=fig3,
      name='one_step_evaluate' if two_step else 'evaluate',
      description='segmentation branch on val')
  stages += [train, cam_quality, one_step_evaluate]
  # The one-step stages do not read the second step's settings.
  stages = [dataclasses.replace(stage, ignores=tuple(stage.ignores) + (
      'rrm.second_step',)) for stage in stages]
  train_stages = tuple(stage.name for stage in stages
                       if stage.name in ('classify', 'train'))
  pseudo = None
  if two_step:
    stages += _second_step(rt, model)
    train_stages += ('deeplab',)
    pseudo = PseudoLabels('one_step_labels',
                          cs.label_path('one_step_labels'))
  return MethodPipeline(stages, eval_stage='evaluate',
                        train_stages=train_stages, pseudo=pseudo,
                        extra_results=functools.partial(_extra_results, rt))


def _second_step(rt: Runtime, one_step_model) -> list:
  """Table 5's second step: label the training split with the one-step
  network, train the benchmark's segmenter on the labels, score it."""
  rt2 = rt.with_config(second_step_config(rt.config))
  segmenter = segmentation.build_segmenter(rt2)
  return [
      cs.prediction_label_stage(
          rt, 'one_step_labels', 'train', label_eval_config(rt.config),
          model=one_step_model,
          description='the one-step network labels the training split'),
      cs.train_stage(
          rt2, 'deeplab', model=segmenter,
          loss_fn=segmentation.cross_entropy_on(PSEUDO_KEY),
          label_folders={PSEUDO_KEY: cs.label_path('one_step_labels')},
          description='second step: the segmenter on the one-step labels'),
      cs.evaluate_stage(rt2, 'deeplab', model=segmenter,
                        description='the second-step segmenter on val'),
  ]


def _cam_label(example: dict[str, Any]) -> np.ndarray:
  """The first pass's CAM label map of one image (the engine's host step)."""
  return np.asarray(example['cam_label'], np.uint8)


def _cam_labels(rt: Runtime, model, options: objective.RRMOptions,
                max_images: int, context, stage_dir: str,
                variables) -> dict[str, Any]:
  """Writes argmax [P_bg, P_fg] (Eqs. 2–4, the image's own classes) of the
  first `max_images` training images (0: all) and scores them."""
  del context

  @jax.jit
  def first_pass(variables, batch):
    images = batch[schema.IMAGE]
    x = image_ops.normalize_images(images, rt.normalization)
    cam = model.apply(variables, x, method='multiscale_cam')
    cam = resize_bilinear(cam, images.shape[1:3])
    probs = labels_lib.foreground_background_probs(
        cam, batch[schema.IMAGE_LABELS] > 0, options.gamma, options.cam_eps)
    return {'cam_label': jnp.argmax(probs, axis=-1).astype(jnp.uint8)}

  folder = LabelFolder(os.path.join(stage_dir, CAM_FOLDER))
  index = rt.dataset.index(rt.train_split)
  count = max_images or len(index.image_ids)
  generation = {}
  if mesh_lib.is_primary():
    generation = engine.run(
        engine.LabelJob(outputs=(CAM_FOLDER,), host_fn=_cam_label,
                        first_pass=functools.partial(first_pass, variables),
                        batch_size=int(rt.config.eval.batch_size),
                        desc='CAM labels'),
        rt.dataset.source(rt.train_split), index.image_ids[:count],
        {CAM_FOLDER: folder},
        sizes=list(zip(index.heights[:count], index.widths[:count])))
  mesh_lib.barrier(f'rrm-cam-{stage_dir}')
  return {'generation': json_safe(generation),
          'quality': segmentation.label_quality(rt, folder.root, count)}


class _Deferred:
  """A loss function built on its first call: the in-step CRF's capacity
  reads training batches, which only the stage that trains needs to do."""

  def __init__(self, make):
    self._make = make

  @functools.cached_property
  def _fn(self):
    return self._make()

  def __call__(self, outputs, batch, context):
    return self._fn(outputs, batch, context)


def reliable_label_summary(history: list[dict[str, Any]], num_classes: int,
                           last_steps: int, class_names=None
                           ) -> dict[str, Any]:
  """Share of pixels labelled and precision against the ground truth of the
  reliable labels over the last `last_steps` training steps (per class and
  overall), from the 'labels/' counts of the training history (means over
  log windows, so ratios of means are ratios of sums)."""
  if not history or 'labels/valid' not in history[-1]:
    return {}
  end = history[-1]['step']
  rows = [h for h in history if h['step'] > end - last_steps] or history[-1:]
  mean = lambda key: float(np.mean([h[key] for h in rows]))
  valid = mean('labels/valid')
  per_class = {}
  labelled_total = judged_total = correct_total = 0.0
  for c in range(num_classes):
    labelled = mean(f'labels/labelled_{c}')
    judged = mean(f'labels/judged_{c}')
    correct = mean(f'labels/correct_{c}')
    labelled_total += labelled
    judged_total += judged
    correct_total += correct
    name = class_names[c] if class_names else str(c)
    per_class[name] = {
        'labelled_pct': 100.0 * labelled / max(valid, 1e-12),
        'precision': 100.0 * correct / judged if judged else None}
  return {'labelled_pct': 100.0 * labelled_total / max(valid, 1e-12),
          'precision': (100.0 * correct_total / judged_total
                        if judged_total else None),
          'steps': [rows[0]['step'], end], 'per_class': per_class}


def _extra_results(rt: Runtime, by_stage: dict[str, dict[str, Any]]
                   ) -> dict[str, Any]:
  """results.json['rrm']: the score without the test CRF, the CAM mIoU,
  the reliable labels' quality over the last training epoch and, in the
  two-step variant, the one-step network's scores ('one_step')."""
  out = {}
  evaluation = by_stage.get('evaluate', {})
  if 'without_crf' in evaluation:
    out['val_miou_without_crf'] = evaluation['without_crf']['miou']
  one_step = by_stage.get('one_step_evaluate')
  if one_step:
    # The two-step variant: the one-step network's own scores beside the
    # second step's (Table 5).
    out['one_step'] = {'val_miou': one_step.get('miou')}
    if 'without_crf' in one_step:
      out['one_step']['val_miou_without_crf'] = (
          one_step['without_crf']['miou'])
  quality = by_stage.get('cam_quality', {}).get('quality')
  if quality:
    out['cam_miou'] = quality['miou']
  history = (by_stage.get('train', {}).get('history') or {}).get('train', [])
  # Read here, not when the pipeline is built: prediction builds it without
  # the dataset's splits.
  epoch_steps = -(-len(rt.dataset.index(rt.train_split).image_ids)
                  // int(rt.config.input.batch_size))
  summary = reliable_label_summary(history, rt.num_classes, epoch_steps,
                                   tuple(rt.class_names))
  if summary:
    out['reliable_labels'] = summary
  return out
