"""PMM's training objectives: SEAM's classification losses (the CAM network)
and the segmentation cross-entropy under the pretended under-fitting strategy
(PUS, Eqs. 10–13) on PSPNet's two heads.

`config.pmm` is read once, into `PMMOptions`, when the stages are built; the
loss functions close over the options and never see the config.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from wsss_jax import config_checks
from wsss_jax import losses
from wsss_jax.data import schema
from wsss_jax.host.crf import CrfParams
from wsss_jax.methods.pmm import pus
from wsss_jax.methods.pmm import seam_losses
from wsss_jax.ops.resize import resize_bilinear
from wsss_jax.training.step import LossContext

PSEUDO_KEY = 'pseudo'            # batch key of the pseudo-masks
BASE_KEY = 'base_mask'           # batch key of the base mask (multi-crop)

PUS_MODES = ('clamp', 'pow', 'ignore', 'none')
PUS_SCOPES = ('per_image_valid', 'per_device_batch_all_pixels')
RVMIN_STAGES = ('multicrop', 'both', 'none')
LAYOUTS = ('paper', 'pmm_code')
NORMALISATIONS = ('eq1', 'pmm_code')
COLOUR_ORDERS = ('rgb', 'bgr')
CYCLIC_CHECKPOINTS = ('final', 'best_val')


@dataclasses.dataclass(frozen=True)
class PMMOptions:
  """Every field of `config.pmm` the stages read, as plain Python values
  (docs/pmm.md, "Defaults and switches")."""
  ecr_top: float
  rvmin_loss: str
  base_scales: tuple[float, ...]
  base_flip: bool
  base_alpha: float
  base_crf: CrfParams
  base_prob_threshold: float
  multicrop_train: bool
  multicrop_scales: tuple[float, ...]
  multicrop_window: int
  multicrop_stride: int
  multicrop_layout: str
  multicrop_flip: bool
  multicrop_chunk: int
  crop_label_ratio: float
  crop_label_tries: int
  cam_normalisation: str
  cam_eps: float
  cv_threshold: float
  cv_scale: float
  cvs_zero_below_t: bool
  cvs_min_exponent: float
  ppmg_alpha: float
  ppmg_crf: CrfParams
  ppmg_fg_threshold: float
  ppmg_crf_colour_order: str
  crf_alpha: float
  compare_images: int
  cam_thresholds: tuple[float, ...]
  pus_mode: str
  pus_beta: float
  pus_kappa: float
  pus_switch_scope: str
  pus_group_size: int
  pus_ignore_inclusive: bool
  aux_weight: float
  cycles: int
  cyclic_checkpoint: str

  @classmethod
  def from_config(cls, cfg) -> PMMOptions:
    """From `config.pmm`; a bad value raises ValueError naming its field."""
    number, choice = config_checks.number, config_checks.choice

    def scales(field):
      values = tuple(float(s) for s in cfg[field])
      if not values or min(values) <= 0:
        raise ValueError(
            f'pmm.{field}={values}: expected positive scales.')
      return values

    window = int(number('pmm.multicrop_window', cfg.multicrop_window, 8))
    return cls(
        ecr_top=number('pmm.ecr_top', cfg.ecr_top, 1e-6, 1.0),
        rvmin_loss=choice('pmm.rvmin_loss', cfg.rvmin_loss, RVMIN_STAGES),
        base_scales=scales('base_scales'),
        base_flip=bool(cfg.base_flip),
        base_alpha=number('pmm.base_alpha', cfg.base_alpha, 0.0),
        base_crf=CrfParams.from_config(cfg.base_crf),
        base_prob_threshold=number('pmm.base_prob_threshold',
                                   cfg.base_prob_threshold, 0.0, 1.0),
        multicrop_train=bool(cfg.multicrop_train),
        multicrop_scales=scales('multicrop_scales'),
        multicrop_window=window,
        multicrop_stride=int(number('pmm.multicrop_stride',
                                    cfg.multicrop_stride, 1, window)),
        multicrop_layout=choice('pmm.multicrop_layout', cfg.multicrop_layout,
                                LAYOUTS),
        multicrop_flip=bool(cfg.multicrop_flip),
        multicrop_chunk=int(number('pmm.multicrop_chunk', cfg.multicrop_chunk,
                                   1)),
        crop_label_ratio=number('pmm.crop_label_ratio', cfg.crop_label_ratio,
                                0.0, 1.0),
        crop_label_tries=int(number('pmm.crop_label_tries',
                                    cfg.crop_label_tries, 1)),
        cam_normalisation=choice('pmm.cam_normalisation',
                                 cfg.cam_normalisation, NORMALISATIONS),
        cam_eps=number('pmm.cam_eps', cfg.cam_eps, 0.0),
        cv_threshold=number('pmm.cv_threshold', cfg.cv_threshold, 0.0, 1.0),
        cv_scale=number('pmm.cv_scale', cfg.cv_scale, 0.0),
        cvs_zero_below_t=bool(cfg.cvs_zero_below_t),
        cvs_min_exponent=number('pmm.cvs_min_exponent', cfg.cvs_min_exponent,
                                1e-6, 1.0),
        ppmg_alpha=number('pmm.ppmg_alpha', cfg.ppmg_alpha, 0.0),
        ppmg_crf=CrfParams.from_config(cfg.ppmg_crf),
        ppmg_fg_threshold=number('pmm.ppmg_fg_threshold',
                                 cfg.ppmg_fg_threshold, 0.0, 1.0),
        ppmg_crf_colour_order=choice('pmm.ppmg_crf_colour_order',
                                     cfg.ppmg_crf_colour_order,
                                     COLOUR_ORDERS),
        crf_alpha=number('pmm.crf_alpha', cfg.crf_alpha, 0.0),
        compare_images=int(number('pmm.compare_images', cfg.compare_images,
                                  0)),
        cam_thresholds=tuple(float(t) for t in cfg.cam_thresholds),
        pus_mode=choice('pmm.pus_mode', cfg.pus_mode, PUS_MODES),
        pus_beta=number('pmm.pus_beta', cfg.pus_beta, 0.0),
        pus_kappa=number('pmm.pus_kappa', cfg.pus_kappa, 1e-6),
        pus_switch_scope=choice('pmm.pus_switch_scope', cfg.pus_switch_scope,
                                PUS_SCOPES),
        pus_group_size=int(number('pmm.pus_group_size', cfg.pus_group_size,
                                  1)),
        pus_ignore_inclusive=bool(cfg.pus_ignore_inclusive),
        aux_weight=number('pmm.aux_weight', cfg.aux_weight, 0.0),
        cycles=int(number('pmm.cycles', cfg.cycles, 0)),
        cyclic_checkpoint=choice('pmm.cyclic_checkpoint',
                                 cfg.cyclic_checkpoint, CYCLIC_CHECKPOINTS),
    )


def classification_loss(options: PMMOptions, *, multicrop: bool):
  """SEAM's loss on the network's two views (`seam_losses.seam_loss`):
  (cls1 + cls2)/2 + ER + ECR, plus the code's adaptive min-pooling term in
  the stages `options.rvmin_loss` names.  The image labels are
  `batch['image_labels']` (for multi-crop training, the crop's labels from
  the 10 % / 10 % rule)."""
  rvmin = (options.rvmin_loss == 'both'
           or (options.rvmin_loss == 'multicrop' and multicrop))

  def loss_fn(outputs, batch, context: LossContext):
    del context
    labels = jnp.asarray(batch[schema.IMAGE_LABELS], jnp.float32)
    return seam_losses.seam_loss(outputs, labels, ecr_top=options.ecr_top,
                                 rvmin=rvmin)
  return loss_fn


def head_cross_entropy(logits, labels):
  """Per-pixel CE of logits (B, h, w, C) resized bilinearly (align_corners
  False) to the labels' grid (B, H, W), as MMSegmentation's decode heads do;
  returns (ce (B, H, W) with 0 where ignored, valid (B, H, W) bool)."""
  logits = resize_bilinear(logits, labels.shape[1:3], align_corners=False)
  ce, valid = losses.softmax_cross_entropy(logits, labels)
  return jnp.where(valid, ce, 0.0), valid


def segmentation_loss(options: PMMOptions, *, use_pus: bool):
  """PSPNet's objective: ℓ(L_decode) + aux_weight · ℓ(L_aux), each head's
  per-pixel CE map reduced by PUS (Eq. 10 with Eqs. 11–13, `pus.pus_loss`)
  when `use_pus`, else by its plain valid-pixel mean (the cyclic round,
  Sec. 4.1: "PUS only in the 1st round")."""
  mode = options.pus_mode if use_pus else 'none'

  def loss_fn(outputs, batch, context: LossContext):
    del context
    labels = batch[PSEUDO_KEY]
    total, metrics = 0.0, {}
    for head, weight in (('logits', 1.0), ('aux_logits', options.aux_weight)):
      if weight == 0.0:
        continue
      ce, valid = head_cross_entropy(outputs[head], labels)
      loss, head_metrics = pus.pus_loss(
          ce, valid, mode=mode, beta=options.pus_beta,
          kappa=options.pus_kappa, scope=options.pus_switch_scope,
          group_size=options.pus_group_size,
          ignore_inclusive=options.pus_ignore_inclusive)
      name = 'decode' if head == 'logits' else 'aux'
      metrics[f'{name}_loss'] = loss
      metrics.update({f'{name}/{k.split("/")[-1]}': v
                      for k, v in head_metrics.items()})
      total = total + weight * loss
    return total, metrics
  return loss_fn
