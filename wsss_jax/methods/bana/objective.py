"""BANA's training objectives: the stage-1 Labeler configuration and loss
(background-aware pooling) and the stage-3 segmentation loss."""

from __future__ import annotations

import jax.numpy as jnp

from wsss_jax import defaults
from wsss_jax.data import schema
from wsss_jax.methods.bana import bap as bana_bap
from wsss_jax.methods.bana import losses as bana_losses
from wsss_jax.methods.bana.generate import Y_CRF, Y_RET
from wsss_jax.ops.resize import resize_bilinear
from wsss_jax.training.step import LossContext


# ----------------------------------------------------------------------------
# Stage 1: the Labeler
# ----------------------------------------------------------------------------
def classifier_config(config, pooling: str):
  """The run config as stage 1 sees it: BANA's stage-1 network (fc6 dilation
  1, 1×1 classifier without bias), `bana.classifier_steps` steps and, for the
  SGD settings, the learning rates of `bana.lr_preset` (reference/bana.md
  §9.3: 'paper' backbone 1e-4 / biases 2e-4 / classifier 1e-3, ÷10 after 10
  of 15 epochs; 'code' 10× those, ÷10 at iteration 5000 of 8000)."""
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
    config.optim.lr_mult.update(backbone_weight=1.0, backbone_bias=2.0,
                                head_weight=10.0, head_bias=20.0)
  config.bana.pooling = pooling
  return config


def classifier_loss(cfg):
  """Stage-1 loss: BAP (Eqs. 1-4) then one cross-entropy over the boxes'
  pooled features and the background queries (`bana_bap.bap_loss`)."""
  def loss_fn(outputs, batch, context: LossContext):
    kernel = context.params['head']['classifier']['kernel'][0, 0]
    out = bana_bap.bap_forward(
        outputs['features'], batch[schema.BOXES], batch[schema.BOX_LABELS],
        batch[schema.VALID], grid=int(cfg.grid),
        roi_grid=tuple(int(v) for v in cfg.compat.bap_roi_grid),
        sampling=cfg.compat.bap_sampling,
        pooling=cfg.pooling,
        min_background_fraction=float(cfg.min_background_fraction))
    return bana_bap.bap_loss(out, kernel.astype(jnp.float32),
                             balance=bool(cfg.balance_rows))
  return loss_fn


# ----------------------------------------------------------------------------
# Stage 3: segmentation with the noise-aware loss
# ----------------------------------------------------------------------------
def segmentation_loss(cfg, total_steps: int, semi_key: str | None = None):
  """Stage-3 loss (`bana.loss`): as the official code, the logits and cosines
  are upsampled (bilinear, align_corners=True) to the crop and the loss is
  computed at full resolution (reference/bana.md 5.6).  With `semi_key`,
  images that carry ground truth use it as both Y_crf and Y_ret."""
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
        cfg.loss, logits, cosines, y_crf, y_ret, step=context.step,
        total_steps=total_steps, lam=float(cfg.lam), gamma=float(cfg.gamma),
        sigma_gradient=bool(cfg.compat.nal_sigma_gradient))
  return loss_fn
