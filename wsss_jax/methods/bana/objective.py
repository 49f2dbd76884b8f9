"""BANA's training objectives: the stage-1 Labeler configuration and loss
(background-aware pooling) and the stage-3 segmentation loss.

The loss fields of `config.bana` are read once, when the stages are built,
into `BapOptions` (stage 1) and `NoiseAwareOptions` (stage 3); the loss
functions close over the options and never see the config.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from wsss_jax import config_checks
from wsss_jax import defaults
from wsss_jax.data import schema
from wsss_jax.methods.bana import bap as bana_bap
from wsss_jax.methods.bana import losses as bana_losses
from wsss_jax.methods.bana.generate import Y_CRF, Y_RET
from wsss_jax.ops.resize import resize_bilinear
from wsss_jax.training.step import LossContext


# ----------------------------------------------------------------------------
# Options: `config.bana` resolved once
# ----------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class BapOptions:
  """The stage-1 fields of `config.bana` (BAP, Sect. 3.1) as plain values."""
  grid: int                        # N of the N×N query grid (Eq. 1)
  roi_grid: tuple[int, int]        # compat.bap_roi_grid: cells per box
  sampling: str                    # compat.bap_sampling
  pooling: str                     # 'bap' (Eq. 4) or 'gap'
  min_background_fraction: float   # the code's GAP fallback threshold
  balance_rows: bool               # mean of the box-row and query-row means

  @classmethod
  def from_config(cls, cfg) -> BapOptions:
    """From `config.bana`; a bad value raises ValueError naming its field."""
    check, choice = config_checks.number, config_checks.choice
    roi_grid = tuple(cfg.compat.bap_roi_grid)
    if len(roi_grid) != 2 or any(v not in (1, 2) for v in roi_grid):
      raise ValueError(f'bana.compat.bap_roi_grid={roi_grid!r}: expected '
                       '(rows, cols), each 1 or 2.')
    return cls(
        grid=check('bana.grid', cfg.grid, 1, integer=True),
        roi_grid=tuple(int(v) for v in roi_grid),
        sampling=choice('bana.compat.bap_sampling', cfg.compat.bap_sampling,
                        bana_bap.SAMPLING_MODES),
        pooling=choice('bana.pooling', cfg.pooling, bana_bap.POOLING_MODES),
        min_background_fraction=check('bana.min_background_fraction',
                                      cfg.min_background_fraction, 0.0, 1.0),
        balance_rows=bool(cfg.balance_rows))


@dataclasses.dataclass(frozen=True)
class NoiseAwareOptions:
  """The stage-3 fields of `config.bana` (Sect. 3.3) as plain values."""
  loss: str                        # bana_losses.LOSS_KINDS
  lam: float                       # λ, Eq. 14 (and supp. Eqs. 5, 8)
  gamma: float                     # γ, Eq. 12
  sigma_gradient: bool             # compat.nal_sigma_gradient

  @classmethod
  def from_config(cls, cfg) -> NoiseAwareOptions:
    """From `config.bana`; a bad value raises ValueError naming its field."""
    return cls(loss=config_checks.choice('bana.loss', cfg.loss,
                                         bana_losses.LOSS_KINDS),
               lam=config_checks.number('bana.lam', cfg.lam, 0.0),
               gamma=config_checks.number('bana.gamma', cfg.gamma, 0.0),
               sigma_gradient=bool(cfg.compat.nal_sigma_gradient))


# ----------------------------------------------------------------------------
# Stage 1: the Labeler
# ----------------------------------------------------------------------------
def classifier_config(config, pooling: str):
  """The run config as stage 1 sees it: BANA's stage-1 network (fc6 dilation
  1, 1×1 classifier without bias), `bana.classifier_steps` steps and, for the
  SGD settings, the learning rates of `bana.compat.stage1_lr_preset`
  (docs/bana.md, "Defaults and switches": 'paper' backbone 1e-4 / biases
  2e-4 / classifier 1e-3, ÷10 after 10 of 15 epochs; 'code' 10× those, ÷10
  at iteration 5000 of 8000) with the DeepLab 1×/2×/10×/20× groups."""
  config = config.copy_and_resolve_references()
  cfg = config.bana
  if config.model.backbone != 'vgg16_largefov':
    # The Labeler is always the VGG16 (Sect. 4.1); DeepLab-v2 runs use it
    # from `bana.classifier_init_weights`.
    model = defaults.largefov_model()
    model.init_weights = cfg.classifier_init_weights
    config.model = model
  config.model.update(fc6_dilation=int(cfg.classifier_fc6_dilation),
                      head='linear', head_bias=False)
  config.train.num_steps = int(cfg.classifier_steps)
  if config.optim.name == 'sgd':
    preset = cfg.compat.stage1_lr_preset
    if preset == 'paper':
      config.optim.update(lr=1e-4, schedule='step', step_boundaries=(10 / 15,))
    elif preset == 'code':
      config.optim.update(lr=1e-3, schedule='step',
                          step_boundaries=(5000 / 8000,))
      config.train.num_steps = 8000
    else:
      raise ValueError(f'bana.compat.stage1_lr_preset={preset!r}: expected '
                       "'paper' or 'code'.")
    config.optim.lr_mult.update(defaults.sgd_deeplab().lr_mult)
  config.bana.pooling = pooling
  return config


def classifier_loss(options: BapOptions):
  """Stage-1 loss: BAP (Eqs. 1-4) then one cross-entropy over the boxes'
  pooled features and the background queries (`bana_bap.bap_loss`)."""
  def loss_fn(outputs, batch, context: LossContext):
    kernel = context.params['head']['classifier']['kernel'][0, 0]
    out = bana_bap.bap_forward(
        outputs['features'], batch[schema.BOXES], batch[schema.BOX_LABELS],
        batch[schema.VALID], grid=options.grid, roi_grid=options.roi_grid,
        sampling=options.sampling, pooling=options.pooling,
        min_background_fraction=options.min_background_fraction)
    return bana_bap.bap_loss(out, kernel.astype(jnp.float32),
                             balance=options.balance_rows)
  return loss_fn


# ----------------------------------------------------------------------------
# Stage 3: segmentation with the noise-aware loss
# ----------------------------------------------------------------------------
def segmentation_loss(options: NoiseAwareOptions, total_steps: int,
                      semi_key: str | None = None):
  """Stage-3 loss (`options.loss`): as the official code, the logits and
  cosines are upsampled (bilinear, align_corners=True) to the crop and the
  loss is computed at full resolution (docs/bana.md, "Stage 3 at the crop
  resolution").  With `semi_key`, images that carry ground truth use it as
  both Y_crf and Y_ret."""
  def loss_fn(outputs, batch, context: LossContext):
    size = batch[schema.IMAGE].shape[1:3]
    logits = resize_bilinear(outputs['logits'], size, align_corners=True)
    cosines = resize_bilinear(outputs['cosines'], size, align_corners=True)
    y_crf = batch[Y_CRF].astype(jnp.int32)
    y_ret = batch[Y_RET].astype(jnp.int32)
    if semi_key is not None:
      truth = batch[semi_key].astype(jnp.int32)
      labelled = jnp.any(truth != schema.IGNORE_LABEL, axis=(1, 2))
      y_crf = jnp.where(labelled[:, None, None], truth, y_crf)
      y_ret = jnp.where(labelled[:, None, None], truth, y_ret)
    return bana_losses.baseline_loss(
        options.loss, logits, cosines, y_crf, y_ret, step=context.step,
        total_steps=total_steps, lam=options.lam, gamma=options.gamma,
        sigma_gradient=options.sigma_gradient)
  return loss_fn
