"""Class activation maps, their normalisations, the power-rule background and
multi-scale + flip aggregation.

Conventions: channel-last maps (B, H, W, C); `present` (B, C) bool marks the
classes an image carries (its image labels, or its box classes).  Every
function is pure, has fixed output shapes and can be jitted (Python
arguments such as scales, sizes and switches are static).  Divisions are
guarded so that an absent class or an all-zero map gives 0, never NaN, with
finite gradients.
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from jax import lax

from wsss_jax.ops.resize import resize_bilinear

_HI = lax.Precision.HIGHEST

_REDUCTIONS = ('sum', 'mean')
_ROUNDINGS = ('round', 'floor')


# ----------------------------------------------------------------------------
# CAM
# ----------------------------------------------------------------------------
def class_activation_maps(features: jax.Array, kernel: jax.Array
                          ) -> jax.Array:
  """CAM_c = ReLU(f·w_c): BANA Eq. (6); RRM Eq. (1) before its resize RS.

  Args:
    features: (B, h, w, D) features.
    kernel: (D, C) classifier weights (1×1 convolution, no bias).
  Returns:
    (B, h, w, C) float32 ≥ 0 (dot products at Precision.HIGHEST).
  """
  return jax.nn.relu(jnp.einsum(
      'bhwd,dc->bhwc', jnp.asarray(features, jnp.float32),
      jnp.asarray(kernel, jnp.float32), precision=_HI))


# ----------------------------------------------------------------------------
# Normalisations
# ----------------------------------------------------------------------------
def _safe_divide(num: jax.Array, den: jax.Array, keep: jax.Array
                 ) -> jax.Array:
  """num / den where keep & (den > 0), else 0; no NaN value or gradient."""
  ok = keep & (den > 0)
  return jnp.where(ok, num / jnp.where(ok, den, 1.0), 0.0)


def max_normalize(cam: jax.Array, present: jax.Array, *, eps: float = 0.0
                  ) -> jax.Array:
  """Per-class max normalisation: ReLU(CAM_c) / max_p ReLU(CAM_c)(p).

  RRM Eq. (3) (P_fg^c = M_cam^c / max(M_cam^c)); also the CAM normalisation
  inside SEAM's network that PMM builds on.  The ReLU comes first, so the
  result lies in [0, 1] and each present class with a positive response
  reaches 1 at its peak.

  Args:
    cam: (B, H, W, C) class activation maps.
    present: (B, C) bool; absent classes are set to 0.
    eps: added to the maximum.  0 (default) is the paper's plain division;
      RRM's official code divides by max + 1e-5 (`eps=1e-5`).
  Returns:
    (B, H, W, C) float32.  Absent classes and all-zero (or all-negative)
    maps are 0, not NaN, with finite gradients.
  """
  cam = jax.nn.relu(jnp.asarray(cam, jnp.float32))
  peak = jnp.max(cam, axis=(1, 2), keepdims=True) + eps
  keep = jnp.asarray(present, bool)[:, None, None, :]
  return _safe_divide(cam, peak, keep)


def minmax_normalize(cam: jax.Array, present: jax.Array, *, eps: float = 0.0
                     ) -> jax.Array:
  """Per-class min-max normalisation, PMM Eq. (1):
  (CAM_c − min CAM_c) / (max CAM_c − min CAM_c), min and max over the
  spatial positions of the class's own map (no ReLU).

  Args:
    cam: (B, H, W, C) class activation maps.
    present: (B, C) bool; absent classes are set to 0.
    eps: added to the denominator.  0 (default) is Eq. (1); PMM's official
      code uses 1e-5 (its other normalisation quirks are PMM switches, see
      docs/pmm.md).
  Returns:
    (B, H, W, C) float32 in [0, 1].  Absent classes and constant maps
    (max = min, e.g. all zero) are 0, not NaN, with finite gradients.
  """
  cam = jnp.asarray(cam, jnp.float32)
  low = jnp.min(cam, axis=(1, 2), keepdims=True)
  span = jnp.max(cam, axis=(1, 2), keepdims=True) - low + eps
  keep = jnp.asarray(present, bool)[:, None, None, :]
  return _safe_divide(cam - low, span, keep)


# ----------------------------------------------------------------------------
# Background
# ----------------------------------------------------------------------------
def power_background(cam_fg: jax.Array, alpha: float) -> jax.Array:
  """Background score by the power rule: (1 − max_c X_c)^α.

  PMM Eq. (2) (bg(X) = (1 − max_c X^(n)_c)^α, α = 24 for the base mask and
  11 in PPMG, where Eq. 7 applies it to one class at a time) and RRM Eq. (4)
  (P_bg = (1 − max_c P_fg^c)^γ, γ = 4; the paper's typeset Eq. (4) has an
  unbalanced parenthesis, read like PMM Eq. (2)).  Both official codes
  compute exactly this on their normalised CAMs, so there is no switch; RRM's
  code merely uses several exponents (4 and 32), each a call with its own α.

  Args:
    cam_fg: (..., L) normalised foreground maps in [0, 1], channel last (for
      per-class use pass (..., 1)); absent classes must be 0.
    alpha: the exponent α (static or traced), > 0.
  Returns:
    (...) float32 in [0, 1]: 1 where no foreground responds; 0 (with a
    finite gradient for α ≥ 1) at a pixel where some class is at 1.
  """
  cam_fg = jnp.asarray(cam_fg, jnp.float32)
  return jnp.power(1.0 - jnp.max(cam_fg, axis=-1), alpha)


# ----------------------------------------------------------------------------
# Multi-scale + flip
# ----------------------------------------------------------------------------
def _scaled_size(size: int, scale: float, rounding: str) -> int:
  value = size * float(scale)
  value = round(value) if rounding == 'round' else int(value)
  return max(int(value), 1)


def aggregate_multiscale(cam_fn: Callable[[jax.Array], jax.Array],
                         images: jax.Array, scales: Sequence[float],
                         flip: bool, out_size: tuple[int, int], *,
                         align_corners: bool = False,
                         reduction: str = 'sum',
                         rounding: str = 'round') -> jax.Array:
  """Multi-scale (and flip) CAM: Σ_s resize(cam_fn(resize(I, s)), out_size).

  For each scale s the images are resized (bilinear, align_corners=False, no
  antialiasing) to (rounding(H·s), rounding(W·s)) and given to `cam_fn`;
  with `flip` the horizontally flipped images go through `cam_fn` in the
  same call (batch 2B) and their maps are flipped back.  Every map is
  resized bilinearly to `out_size` and the maps are summed (or averaged).

  What the methods do (docs/pmm.md, docs/rrm.md):
    PMM's code (multi-scale base mask): scales 0.5, 1, 1.5, 2, each with its
      flip (8 passes), maps resized AC-False to the image and **summed**;
      a min-max normalisation follows, so sum and mean differ only through
      its epsilon.  Its images are resized with PIL bicubic to
      round(size·s) (here: bilinear).
    RRM Eq. (2): the **mean** over scales 0.5, 1, 1.5, 2 (no flip) of the
      CAMs resized to the image; its code averages the maps after resizing
      them AC-False to the 1.0-scale feature grid (out_size = that grid),
      its images resized to int(size·s) (`rounding='floor'`); a max
      normalisation follows.

  Args:
    cam_fn: images (b, h_s, w_s, 3) -> maps (b, h', w', C); any output
      resolution; must accept a batch of B (or 2B with `flip`).
    images: (B, H, W, 3) float.
    scales: static sequence of positive factors (a Python loop over them).
    flip: static; also run the horizontally flipped images.
    out_size: (H_out, W_out), static.
    align_corners: resize convention for the maps (False: PMM's and RRM's
      codes; True: BANA's and LPG's).
    reduction: 'sum' (default, PMM's code) or 'mean' (divide by the number
      of passes, len(scales)·(2 if flip else 1): RRM Eq. (2) and its code).
    rounding: scaled image size, 'round' (round(size·s), PMM's code) or
      'floor' (int(size·s), RRM's code); never below 1.
  Returns:
    (B, H_out, W_out, C) float32.
  """
  if reduction not in _REDUCTIONS:
    raise ValueError(f'reduction={reduction!r}; expected one of '
                     f'{_REDUCTIONS}.')
  if rounding not in _ROUNDINGS:
    raise ValueError(f'rounding={rounding!r}; expected one of '
                     f'{_ROUNDINGS}.')
  scales = tuple(float(s) for s in scales)
  if not scales or min(scales) <= 0:
    raise ValueError(f'scales={scales}; expected positive factors.')
  images = jnp.asarray(images, jnp.float32)
  batch, height, width = images.shape[:3]
  out_size = (int(out_size[0]), int(out_size[1]))
  total = None
  for scale in scales:
    size = (_scaled_size(height, scale, rounding),
            _scaled_size(width, scale, rounding))
    scaled = resize_bilinear(images, size, align_corners=False)
    if flip:
      scaled = jnp.concatenate([scaled, jnp.flip(scaled, axis=2)], axis=0)
    maps = jnp.asarray(cam_fn(scaled), jnp.float32)
    if flip:
      maps = maps[:batch] + jnp.flip(maps[batch:], axis=2)
    # Resizing is linear, so the flipped pair is resized once as a sum.
    maps = resize_bilinear(maps, out_size, align_corners=align_corners)
    total = maps if total is None else total + maps
  if reduction == 'mean':
    total = total / (len(scales) * (2 if flip else 1))
  return total
