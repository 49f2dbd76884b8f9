"""PMM's Pretended Under-fitting Strategy (PUS), Eqs. (10)–(13) of Li et
al., "Pseudo-mask Matters in Weakly-supervised Semantic Segmentation" (ICCV
2021), on the device.

    ℓ(L) = mean(L)          if mean(L) >= β                   Eq. (10)
           mean(pus(L))     if mean(L) <  β
    pus_clamp(L)  = min(L, κ)                                 Eq. (11)
    pus_pow(L)    = L^κ   (code: (L + 1e-9)^κ)                Eq. (12)
    pus_ignore(L) = L · [L < κ]   (code: [L <= κ])            Eq. (13)

L is the per-pixel cross-entropy map of the segmentation network.  The
switch is a decision, not a differentiable quantity: it is computed from
stop-gradient'ed means.  Two scopes for "mean(L)" (the `pus_switch_scope`
switch of docs/pmm.md): per image over its valid pixels (the paper,
default), or per group of `group_size` consecutive images over all pixels
with ignored pixels counted as zeros (the official code: one GPU's batch of
2 images).  Pure jax.numpy with static Python arguments: jit-friendly.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

PUS_MODES = ('clamp', 'pow', 'ignore', 'none')
PUS_SCOPES = ('per_image_valid', 'per_device_batch_all_pixels')

# The official code's epsilon in pus_pow: (ce + 1e-9)^κ.
POW_EPS = 1e-9


def _check_mode(mode: str) -> None:
  if mode not in PUS_MODES:
    raise ValueError(f'pmm.pus_mode must be one of {PUS_MODES}, got '
                     f'{mode!r}.')


def _check_positive(name: str, value: float) -> float:
  try:
    value = float(value)
  except (TypeError, ValueError):
    raise ValueError(f'{name} must be a number, got {value!r}.') from None
  if not (math.isfinite(value) and value > 0):
    raise ValueError(f'{name} must be a finite number > 0, got {value!r}.')
  return value


def pus_transform(ce: jax.Array, mode: str, kappa: float, *,
                  ignore_inclusive: bool = False) -> jax.Array:
  """pus(L), PMM Eqs. (11)–(13), elementwise.

  Modes:
    'clamp', Eq. (11): min(L, κ) (L·κ/L without stop-gradient is κ with
      zero gradient: jnp.minimum gives gradient 1 below κ and 0 above).
    'pow', Eq. (12): (L + 1e-9)^κ; the official code's 1e-9 keeps the value
      and the gradient κ(L + 1e-9)^(κ − 1) finite at L = 0 (κ < 1).
    'ignore', Eq. (13): L · [L < κ] (the paper drops L >= κ);
      `ignore_inclusive=True` keeps L <= κ, as the official code does.
    'none': L unchanged.

  Args:
    ce: float per-pixel cross-entropy (any shape), >= 0.
    mode: one of `PUS_MODES`.
    kappa: κ (> 0; 0.5 for VOC, 0.8 for COCO).
    ignore_inclusive: see 'ignore'.

  Returns:
    An array with the shape and dtype of `ce`.
  """
  _check_mode(mode)
  if mode == 'none':
    return ce
  kappa = _check_positive('pmm.pus_kappa', kappa)
  if mode == 'clamp':
    return jnp.minimum(ce, jnp.asarray(kappa, ce.dtype))
  if mode == 'pow':
    return jnp.power(ce + POW_EPS, kappa).astype(ce.dtype)
  keep = ce <= kappa if ignore_inclusive else ce < kappa
  return jnp.where(keep, ce, jnp.zeros_like(ce))


def pus_loss(ce: jax.Array, valid: jax.Array, *, mode: str, beta: float,
             kappa: float, scope: str = 'per_image_valid',
             group_size: int = 2, ignore_inclusive: bool = False
             ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """ℓ(L), PMM Eq. (10), reduced over a batch.

  Scopes:
    'per_image_valid' (default; Eq. (10) read per image): m_i = mean CE over
      image i's valid pixels; image i is switched on iff it has a valid pixel
      and m_i < β; its pixels then take pus(L).  The loss is the valid-pixel
      mean over the batch of the (switched) per-pixel values.  An image
      without a valid pixel contributes 0 and never switches.
    'per_device_batch_all_pixels' (the official code): the batch splits into
      groups of `group_size` consecutive images; m_g = mean of CE over ALL
      the group's pixels (ignored pixels count as zeros); a group switches
      on iff m_g < β; the loss is the mean over all pixels (= the mean of
      the equal-sized groups' means).  With 'pow' the ignored pixels of a
      switched group contribute (0 + 1e-9)^κ, as in the code.
  Mode 'none' never switches (plain valid-pixel / all-pixel mean).

  Args:
    ce: float (B, H, W) per-pixel cross-entropy (forced to 0 where invalid).
    valid: bool (B, H, W) pixels with a label (not ignore).
    mode: one of `PUS_MODES`.
    beta: the warm-up threshold β (0.5 VOC, 0.8 COCO); like `kappa`, a
      static Python number (a hyperparameter, not a traced value).
    kappa: κ of `pus_transform`.
    scope: one of `PUS_SCOPES`.
    group_size: images per group in scope 'per_device_batch_all_pixels'
      (the code's images per GPU, 2); B must be divisible by it.
    ignore_inclusive: see `pus_transform`.

  Returns:
    (loss, metrics): a float32 scalar, finite with finite gradients (also
    for an all-ignore batch), and {'pus/active': fraction of images (or
    groups) switched on, 'pus/mean_ce': valid-pixel mean CE} (float32
    scalars, no gradient).
  """
  _check_mode(mode)
  if scope not in PUS_SCOPES:
    raise ValueError(f'pmm.pus_switch_scope must be one of {PUS_SCOPES}, got '
                     f'{scope!r}.')
  ce = jnp.asarray(ce)
  valid = jnp.asarray(valid)
  if ce.ndim != 3:
    raise ValueError(f'ce must be a (B, H, W) per-pixel loss, got shape '
                     f'{ce.shape}.')
  if valid.shape != ce.shape:
    raise ValueError(f'valid must have the shape of ce {ce.shape}, got '
                     f'{valid.shape}.')
  try:
    beta = float(beta)
  except (TypeError, ValueError):
    raise ValueError(f'pmm.pus_beta must be a number, got {beta!r}.'
                     ) from None
  if not math.isfinite(beta):
    raise ValueError(f'pmm.pus_beta must be finite, got {beta!r}.')
  if mode != 'none':
    _check_positive('pmm.pus_kappa', kappa)

  valid = valid.astype(bool)
  ce = jnp.where(valid, ce.astype(jnp.float32), 0.0)
  batch = ce.shape[0]
  count = jnp.sum(valid, axis=(1, 2)).astype(jnp.float32)          # (B,)
  total = jnp.sum(count)
  mean_ce = jax.lax.stop_gradient(jnp.sum(ce) / jnp.maximum(total, 1.0))

  if scope == 'per_image_valid':
    per_image = jnp.sum(ce, axis=(1, 2)) / jnp.maximum(count, 1.0)
    switch = (jax.lax.stop_gradient(per_image) < beta) & (count > 0)
    if mode == 'none':
      switch = jnp.zeros_like(switch)
    values = jnp.where(
        switch[:, None, None],
        pus_transform(ce, mode, kappa, ignore_inclusive=ignore_inclusive), ce)
    values = jnp.where(valid, values, 0.0)
    loss = jnp.sum(values) / jnp.maximum(total, 1.0)
  else:
    if (isinstance(group_size, bool) or not isinstance(group_size, int)
        or group_size < 1):
      raise ValueError(f'pmm.pus_group_size must be an integer >= 1, got '
                       f'{group_size!r}.')
    if batch % group_size:
      raise ValueError(f'pmm.pus_group_size = {group_size} must divide the '
                       f'batch size B = {batch} (scope '
                       f"'per_device_batch_all_pixels').")
    groups = ce.reshape(batch // group_size, -1)                    # (G, N)
    per_group = jnp.mean(groups, axis=1)
    switch = jax.lax.stop_gradient(per_group) < beta
    if mode == 'none':
      switch = jnp.zeros_like(switch)
    values = jnp.where(
        switch[:, None],
        pus_transform(groups, mode, kappa, ignore_inclusive=ignore_inclusive),
        groups)
    loss = jnp.mean(values)
  metrics = {'pus/active': jnp.mean(switch.astype(jnp.float32)),
             'pus/mean_ce': mean_ce}
  return loss, metrics
