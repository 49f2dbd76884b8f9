"""PMM's two label jobs on `wsss_jax.pseudo.engine`.

  base mask      device: SEAM's multi-scale (+ flip) CAM (cam_rv), the
                 image's own classes;  host: Eq. (1), the CRF over
                 [(1 − max v)^24; v] and the pixels whose marginal exceeds
                 0.9 (the rest 255): what multi-crop training reads its
                 crop labels from (Sec. 3.5; docs/pmm.md)
  pseudo-masks   device: the multi-crop CAM (the same windows as multi-crop
                 training, each with its flip);  host: Eq. (1) and
                 Algorithm 1 (CVS + PPMG), the label FSSS trains on; on the
                 first `compare_images` images also Table 2's other rows
                 (CRF, CRF + CVS, PPMG without CVS) and the CAM's mIoU over
                 the background thresholds 0.05…0.19.

The engine overlaps the device passes of the next batch with the CRFs of the
previous ones, compiles once per image size, and skips images whose PNGs
exist, so both jobs resume.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from wsss_jax.data import schema
from wsss_jax.evaluation import metrics as metrics_lib
from wsss_jax.methods.pmm import masks
from wsss_jax.methods.pmm import multicrop
from wsss_jax.methods.pmm.objective import PMMOptions
from wsss_jax.ops import image as image_ops
from wsss_jax.pseudo import cam as cam_lib
from wsss_jax.pseudo import engine

BASE = 'base'
CRF, CRF_CVS, PPMG_NO_CVS, PPMG = 'crf', 'crf_cvs', 'ppmg_no_cvs', 'ppmg'
TABLE2_ROWS = (CRF, CRF_CVS, PPMG_NO_CVS, PPMG)
IGNORE = schema.IGNORE_LABEL


@dataclasses.dataclass(frozen=True)
class HostOptions:
  """What the host functions read (picklable, no config)."""
  normalisation: str
  eps: float
  t: float
  s: float
  zero_below_t: bool
  min_exponent: float
  ppmg_alpha: float
  ppmg_crf: Any
  fg_threshold: float
  colour_order: str
  crf_alpha: float
  base_alpha: float
  base_crf: Any
  base_prob_threshold: float
  thresholds: tuple[float, ...]
  crf_backend: str

  @classmethod
  def from_options(cls, options: PMMOptions, crf_backend: str) -> HostOptions:
    return cls(normalisation=options.cam_normalisation, eps=options.cam_eps,
               t=options.cv_threshold, s=options.cv_scale,
               zero_below_t=options.cvs_zero_below_t,
               min_exponent=options.cvs_min_exponent,
               ppmg_alpha=options.ppmg_alpha, ppmg_crf=options.ppmg_crf,
               fg_threshold=options.ppmg_fg_threshold,
               colour_order=options.ppmg_crf_colour_order,
               crf_alpha=options.crf_alpha, base_alpha=options.base_alpha,
               base_crf=options.base_crf,
               base_prob_threshold=options.base_prob_threshold,
               thresholds=options.cam_thresholds, crf_backend=crf_backend)


# ----------------------------------------------------------------------------
# Device passes
# ----------------------------------------------------------------------------
def _present(batch) -> jax.Array:
  return jnp.asarray(batch[schema.IMAGE_LABELS]) > 0


def base_cam_pass(model, normalization: str, options: PMMOptions):
  """Jitted `(variables, batch) -> {'cam' (B, H, W, K)}`: the sum over
  `base_scales` (and flips) of the fg channels of cam_rv at the image size,
  zero for the classes the image does not carry (reference code: summed,
  AC-False resizes)."""
  @jax.jit
  def first(variables, batch):
    images = image_ops.normalize_images(batch[schema.IMAGE], normalization)
    cam_fn = functools.partial(model.apply, variables,
                               method='inference_cam')
    cam = cam_lib.aggregate_multiscale(
        cam_fn, images, options.base_scales, options.base_flip,
        images.shape[1:3], align_corners=False, reduction='sum')
    return {'cam': cam * _present(batch)[:, None, None, :]}
  return first


def multicrop_cam_pass(model, normalization: str, options: PMMOptions):
  """Jitted `(variables, batch) -> {'cam' (B, H, W, K)}`: the multi-crop
  CAM (`multicrop.multicrop_cam`) with the windows of `options` for the
  batch's image size (static per compilation), zero for absent classes."""
  @jax.jit
  def first(variables, batch):
    images = image_ops.normalize_images(batch[schema.IMAGE], normalization)
    batch_size, height, width = images.shape[:3]
    boxes = multicrop.window_layout(
        height, width, options.multicrop_scales, options.multicrop_window,
        options.multicrop_stride, layout=options.multicrop_layout)[:, 1:]
    boxes = jnp.broadcast_to(jnp.asarray(boxes, jnp.float32),
                             (batch_size,) + boxes.shape)
    valid = jnp.ones(boxes.shape[:2], bool)
    cam_fn = functools.partial(model.apply, variables,
                               method='inference_cam')
    cam = multicrop.multicrop_cam(
        cam_fn, images, boxes, valid, options.multicrop_window,
        flip=options.multicrop_flip, chunk=options.multicrop_chunk)
    return {'cam': cam * _present(batch)[:, None, None, :]}
  return first


# ----------------------------------------------------------------------------
# Host functions (worker processes)
# ----------------------------------------------------------------------------
def _normalised(item: Mapping[str, Any], options: HostOptions, path: str):
  present = np.asarray(item[schema.IMAGE_LABELS]) > 0
  mode = ('eq1' if options.normalisation == 'eq1'
          else f'pmm_code_{path}')
  cam = masks.normalize_cam(np.asarray(item['cam'], np.float32), present,
                            mode=mode, eps=options.eps)
  return cam, present


def base_mask(item: Mapping[str, Any], options: HostOptions) -> np.ndarray:
  """The base mask of one image, uint8 (H, W): class k + 1 where the CRF
  marginal of class k (Eqs. 1–4 with α = `base_alpha`) exceeds
  `base_prob_threshold`, 0 where the background's does, 255 elsewhere."""
  cam, present = _normalised(item, options, 'multiscale')
  marginals = masks.crf_marginals(
      item[schema.IMAGE], cam, present, alpha=options.base_alpha,
      crf_params=options.base_crf, crf_backend=options.crf_backend)
  label = np.argmax(marginals, axis=-1).astype(np.uint8)
  sure = np.max(marginals, axis=-1) > options.base_prob_threshold
  return np.where(sure, label, IGNORE).astype(np.uint8)


def _cam_counts(cam: np.ndarray, present: np.ndarray, mask: np.ndarray,
                thresholds) -> dict[str, int]:
  """Per threshold τ: the confusion of argmax [τ, cam of the present
  classes] against the ground truth, as counts 'cam/<i>/<t>/<p>' (i the
  threshold index, t the true, p the predicted class) summed by the
  engine."""
  num_classes = cam.shape[-1] + 1
  scores = np.where(present[None, None, :], cam, -np.inf)
  best = np.argmax(scores, axis=-1) + 1
  peak = np.max(scores, axis=-1)
  keep = mask != IGNORE
  truth = mask[keep].astype(np.int64)
  counts = {}
  for index, tau in enumerate(thresholds):
    predicted = np.where(peak > tau, best, 0)[keep]
    confusion = np.bincount(truth * num_classes + predicted,
                            minlength=num_classes * num_classes)
    for flat in np.flatnonzero(confusion):
      t, p = divmod(int(flat), num_classes)
      counts[f'cam/{index}/{t}/{p}'] = int(confusion[flat])
  return counts


def pseudo_masks(item: Mapping[str, Any], options: HostOptions,
                 compare: bool) -> tuple[dict[str, np.ndarray], dict]:
  """One image's pseudo-masks: {'ppmg'} (Algorithm 1), and with `compare`
  also Table 2's other rows and the CAM threshold counts."""
  cam, present = _normalised(item, options, 'multicrop')
  image = item[schema.IMAGE]
  common = dict(crf_backend=options.crf_backend)
  ppmg = functools.partial(
      masks.ppmg_label, image, cam, present, alpha=options.ppmg_alpha,
      t=options.t, s=options.s, cvs_zero_below_t=options.zero_below_t,
      min_exponent=options.min_exponent,
      fg_threshold=options.fg_threshold, crf_params=options.ppmg_crf,
      colour_order=options.colour_order, **common)
  out = {PPMG: ppmg(use_cvs=True)}
  if not compare:
    return out, {}
  cv = masks.coefficient_of_variation(cam, present, t=options.t)
  smoothed = masks.cv_smoothing(cam, cv, s=options.s,
                                zero_below_t=options.zero_below_t,
                                t=options.t,
                                min_exponent=options.min_exponent)
  crf = functools.partial(masks.crf_label, image, present=present,
                          alpha=options.crf_alpha,
                          crf_params=options.ppmg_crf, **common)
  out[CRF] = crf(cam)
  out[CRF_CVS] = crf(smoothed)
  out[PPMG_NO_CVS] = ppmg(use_cvs=False)
  counts = _cam_counts(cam, present, np.asarray(item[schema.MASK]),
                       options.thresholds)
  # Classes the image carries whose CAM is 0 everywhere: the classifier did
  # not recognise them in any window, so no post-processing can find them.
  counts['present_classes'] = int(np.sum(present))
  counts['empty_cams'] = int(np.sum(present & (cam.max(axis=(0, 1)) <= 0)))
  return out, counts


def _identity_maps(value, second):
  del second
  return value


def base_mask_job(variables, first, options: HostOptions,
                  batch_size: int) -> engine.LabelJob:
  return engine.LabelJob(
      outputs=(BASE,), first_pass=functools.partial(first, variables),
      host_fn=functools.partial(base_mask, options=options),
      batch_size=batch_size, desc='pmm base mask')


def pseudo_mask_job(variables, first, options: HostOptions, batch_size: int,
                    compare: bool) -> engine.LabelJob:
  return engine.LabelJob(
      outputs=TABLE2_ROWS if compare else (PPMG,),
      first_pass=functools.partial(first, variables),
      host_fn=functools.partial(pseudo_masks, options=options,
                                compare=compare),
      label_maps=_identity_maps, batch_size=batch_size,
      desc='pmm pseudo-masks' + (' (Table 2 rows)' if compare else ''))


def cam_sweep(counts: Mapping[str, int], thresholds, num_classes: int
              ) -> dict[str, Any]:
  """The CAM's mIoU at every background threshold (from `_cam_counts`'
  summed counts) and the best one."""
  curve = []
  for index, tau in enumerate(thresholds):
    confusion = np.zeros((num_classes, num_classes), np.int64)
    prefix = f'cam/{index}/'
    for key, value in counts.items():
      if key.startswith(prefix):
        t, p = map(int, key[len(prefix):].split('/'))
        confusion[t, p] += int(value)
    miou = (metrics_lib.scores(confusion)['miou'] if confusion.sum()
            else float('nan'))
    curve.append({'threshold': float(tau), 'miou': miou})
  scored = [row for row in curve if row['miou'] == row['miou']]
  if not scored:
    return {'miou': None, 'threshold': None, 'curve': curve}
  best = max(scored, key=lambda row: row['miou'])
  return {'miou': best['miou'], 'threshold': best['threshold'],
          'curve': curve}
