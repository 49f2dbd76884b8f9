"""RRM's dense energy loss (Zhang et al., AAAI 2020, Eqs. 10–14), in jit.

Notation.  On the grid where the energy is computed (half resolution in the
official code), with N = h·w pixels per image and C classes:

* P (B, h, w, C): softmax probabilities of the segmentation branch;
* ROI (B, h, w) bool: real (non-padded) pixels of the crop;
* P̃ = P·ROI: the probabilities with the padding masked out;
* S (B, h, w): the soft filter (gate) of RRM Eq. 14: 1 − max_c P on labelled
  pixels, 1 on unlabelled ones (`energy_gate`);
* G: the Gaussian kernel of RRM Eq. 11 over the features (x/σ_xy, y/σ_xy,
  r/σ_rgb, g/σ_rgb, b/σ_rgb) (`energy_features`), unit peak, without the
  paper's unspecified 1/W normaliser;
* [G v](i) = Σ_j G(i, j) v(j), applied per image and per class
  (`filter_gaussian`).

With the Potts form of the pairwise term (RRM Eq. 12), the loss of RRM Eq. 13,
Σ_i Σ_{j≠i} S(i) G(i, j) Σ_c P_c(i)(1 − P_c(j)), is a term that does not
depend on P once S is held constant, minus Σ_c Σ_i S(i) P_c(i) [G P_c](i).
We compute, as the official code does, only the part that has a gradient,
divided by the batch size B (not by the pixel count):

    E = −(1/B) Σ_b Σ_c Σ_i S(i) P̃_c(i) [G P̃_c](i)          (`dense_energy`)

The caller multiplies E by the energy weight (1e-7 in the official code).
The gate is a constant for the gradient (stop-gradient: the paper calls it a
soft filter).  `dense_energy_loss` runs the whole pipeline from the
full-resolution crop: downsampling, the gate, the features and E
(docs/rrm.md).

Switches (always passed in; nothing here has a default that could disagree
with the config):

* kernel (`KERNELS`): 'exact_gaussian', the paper's kernel: an exact unit-peak
  Gaussian over j ≠ i, computed block by block, never as an N × N matrix;
  'lattice_scaled': the exact kernel with the j = i term kept, times
  `LATTICE_ENERGY_RATIO`, which emulates the scale of the official code's
  un-normalised permutohedral lattice (its energy is about 0.6 of the exact
  unit-peak Gaussian's at the training settings); 'permutohedral': the
  lattice itself (`wsss_jax.crf.lattice`), j = i term kept, as the official
  code.
* backward (`BACKWARDS`): 'autodiff', the gradient of E with S constant,
  −(S·G P̃ + G(S·P̃))/B with respect to P̃; 'rloss_custom', the official code's
  hand-written rule −2·S·G P̃/B, which equals the former only when S is
  uniform.
* sigma_assignment (`SIGMA_ASSIGNMENTS`): 'code', σ_xy and σ_rgb as given
  (the official 100 px at full resolution and 15); 'paper_literal' swaps the
  two, the paper's sentence "σ_d and σ_r ... are set as 15 and 100" read
  literally (15 px spatial, 100 colour), which is most likely a typo
  (a colour σ of 100 on 0..255 makes the kernel nearly colour-blind).
* downsample_interp (`DOWNSAMPLE_INTERPS`): how the probabilities are
  bilinearly (align_corners=False) downsampled: 'exact_half', source
  coordinate 2i + 0.5 (scale exactly 0.5, current PyTorch), or 'size_ratio',
  source (i + 0.5)·H/h − 0.5 (PyTorch releases of the code's era, 321/160).
  Images, ROI and labels are always taken at pixels 2i (nearest), which both
  conventions agree on.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from wsss_jax.crf import exact
from wsss_jax.crf import lattice
from wsss_jax.data import schema
from wsss_jax.ops.resize import resize_bilinear

KERNELS = ('exact_gaussian', 'lattice_scaled', 'permutohedral')
BACKWARDS = ('autodiff', 'rloss_custom')
SIGMA_ASSIGNMENTS = ('code', 'paper_literal')
DOWNSAMPLE_INTERPS = ('exact_half', 'size_ratio')
# The official lattice's energy divided by the exact unit-peak Gaussian's
# (j = i kept) at the training settings: a 321 crop on the 160² grid,
# σ_xy 50, σ_rgb 15 (docs/rrm.md).  Smaller images give smaller ratios.
LATTICE_ENERGY_RATIO = 0.596
SCALES = (0.5, 1.0)

# One block of the exact filter: block × N query-key weights for the whole
# batch, at most this many float32 (64 MB), as `crf.exact`'s default.
_BLOCK_ELEMENTS = 1 << 24


def _check(name: str, value: str, choices: tuple[str, ...]) -> None:
  if value not in choices:
    raise ValueError(f'{name}={value!r}; expected one of '
                     f'{", ".join(repr(c) for c in choices)}.')


# ----------------------------------------------------------------------------
# RRM Eq. 14: the soft filter
# ----------------------------------------------------------------------------
def energy_gate(probs: jax.Array, labelled: jax.Array,
                roi: jax.Array) -> jax.Array:
  """S, RRM Eq. 14, with the official code's treatment of the padding.

  S(i) = 1 − max_c P_c(i) on labelled pixels inside the ROI, 1 on unlabelled
  pixels (inside or outside the ROI), 0 on labelled pixels outside the ROI
  (the code's max(ROI − max_c P, 0) overwritten by 1 where unlabelled).  The
  unlabelled padding still gets weight 1, but its P̃ is 0, so it adds
  nothing to E.

  Args:
    probs: (B, h, w, C) softmax probabilities.
    labelled: (B, h, w) bool, pixels with a reliable label.
    roi: (B, h, w) bool, real (non-padded) pixels.
  Returns:
    (B, h, w) float32 in [0, 1], a constant for the gradient.
  """
  peak = jnp.max(probs.astype(jnp.float32), axis=-1)
  gate = jnp.where(labelled, roi.astype(jnp.float32) - peak, 1.0)
  return jax.lax.stop_gradient(jnp.maximum(gate, 0.0))


# ----------------------------------------------------------------------------
# The half-resolution grid
# ----------------------------------------------------------------------------
def downsampled_size(size: int, scale: float) -> int:
  """floor(size·scale), PyTorch's output size for a scale factor (321 -> 160
  at 0.5)."""
  _check_scale(scale)
  return int(size * scale)


def _check_scale(scale: float) -> None:
  if scale not in SCALES:
    raise ValueError(f'scale={scale!r}; expected one of '
                     f'{", ".join(repr(s) for s in SCALES)}.')


def downsample_nearest(x: jax.Array, scale: float) -> jax.Array:
  """(B, H, W, ...) -> (B, h, w, ...), any dtype: pixels (2i, 2j) at scale
  0.5 (the code's `F.interpolate` nearest: floor(i/0.5) with the exact scale,
  and floor(i·H/h) with the size ratio, agree for h = floor(H/2)); the input
  itself at scale 1.
  """
  _check_scale(scale)
  if scale == 1.0:
    return x
  h = downsampled_size(x.shape[1], scale)
  w = downsampled_size(x.shape[2], scale)
  return x[:, 0:2 * h:2, 0:2 * w:2]


def downsample_bilinear(x: jax.Array, scale: float,
                        interp: str) -> jax.Array:
  """(B, H, W, C) -> (B, h, w, C) float32, bilinear, align_corners=False, no
  antialiasing; the input itself at scale 1.

  interp 'exact_half': source coordinate (i + 0.5)/0.5 − 0.5 = 2i + 0.5, i.e.
  the mean of the 2 × 2 block at (2i, 2j) (also for odd H, since h =
  floor(H/2)).  'size_ratio': source (i + 0.5)·H/h − 0.5
  (`ops.resize.resize_bilinear`).
  """
  _check_scale(scale)
  _check('downsample_interp', interp, DOWNSAMPLE_INTERPS)
  x = x.astype(jnp.float32)
  if scale == 1.0:
    return x
  batch, _, _, channels = x.shape
  h = downsampled_size(x.shape[1], scale)
  w = downsampled_size(x.shape[2], scale)
  if interp == 'size_ratio':
    return resize_bilinear(x, (h, w))
  return jax.image.scale_and_translate(
      x, (batch, h, w, channels), (1, 2),
      jnp.asarray([scale, scale], jnp.float32), jnp.zeros((2,), jnp.float32),
      method='linear', antialias=False)


# ----------------------------------------------------------------------------
# RRM Eq. 11: features and the Gaussian filter
# ----------------------------------------------------------------------------
def energy_features(images: jax.Array, sigma_xy: float,
                    sigma_rgb: float) -> jax.Array:
  """The features of RRM Eq. 11, scaled so that G = exp(−½‖f_i − f_j‖²).

  Args:
    images: (B, h, w, 3) RGB, 0..255 (any real or integer dtype).
    sigma_xy: spatial σ in pixels of this grid; sigma_rgb: colour σ.
  Returns:
    (B, h·w, 5) float32 (x/σ_xy, y/σ_xy, r/σ_rgb, g/σ_rgb, b/σ_rgb), x the
    column and y the row, pixels in row-major order.
  """
  batch, h, w, _ = images.shape
  rows, cols = jnp.meshgrid(jnp.arange(h, dtype=jnp.float32),
                            jnp.arange(w, dtype=jnp.float32), indexing='ij')
  position = jnp.stack([cols, rows], axis=-1) / jnp.float32(sigma_xy)
  position = jnp.broadcast_to(position, (batch, h, w, 2))
  colour = images.astype(jnp.float32) / jnp.float32(sigma_rgb)
  return jnp.concatenate([position, colour], axis=-1).reshape(batch, h * w, 5)


def _exact_filter_forward(features: jax.Array, values: jax.Array,
                          include_self: bool) -> jax.Array:
  batch, n, _ = features.shape
  block = max(1, min(n, _BLOCK_ELEMENTS // max(batch * n, 1)))
  out = jax.vmap(functools.partial(exact.exact_gaussian_filter, block=block))(
      features, values)
  # exp(0) = 1 exactly, so this removes the j = i term up to the rounding of
  # the sum.
  return out if include_self else out - values


# A custom VJP keeps the backward pass at block × N memory: the filter is
# linear in the values and G is symmetric, so the cotangent is filtered by the
# same blocks.  Autodiff through the blocks' `lax.map` would instead store
# every block's N-wide weight matrix (N × N in all).
@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _exact_filter(features: jax.Array, values: jax.Array,
                  include_self: bool) -> jax.Array:
  return _exact_filter_forward(features, values, include_self)


def _exact_filter_fwd(features, values, include_self):
  return _exact_filter_forward(features, values, include_self), features


def _exact_filter_bwd(include_self, features, cotangent):
  return (jnp.zeros_like(features),
          _exact_filter_forward(features, cotangent, include_self))


_exact_filter.defvjp(_exact_filter_fwd, _exact_filter_bwd)


def filter_gaussian(features: jax.Array, values: jax.Array,
                    kernel: str) -> jax.Array:
  """[G v](i) = Σ_j G(i, j) v(j) per image, G of RRM Eq. 11 (unit peak).

  kernel 'exact_gaussian': Σ over j ≠ i (RRM Eq. 13), exact, block by block;
  'lattice_scaled': Σ over all j, exact, × `LATTICE_ENERGY_RATIO`;
  'permutohedral': the un-normalised permutohedral lattice
  (`crf.lattice.gaussian_filter`, j = i kept).  Differentiable in the values
  (the exact kernels by a custom VJP whose memory is block × N); the features
  are never differentiated.

  Args:
    features: (B, N, d), e.g. `energy_features`.
    values: (B, N, C).
    kernel: one of `KERNELS`.
  Returns:
    (B, N, C) float32.
  """
  _check('kernel', kernel, KERNELS)
  features = jax.lax.stop_gradient(features.astype(jnp.float32))
  values = values.astype(jnp.float32)
  if kernel == 'exact_gaussian':
    return _exact_filter(features, values, False)
  if kernel == 'lattice_scaled':
    return LATTICE_ENERGY_RATIO * _exact_filter(features, values, True)
  return lattice.gaussian_filter(features, values)


# ----------------------------------------------------------------------------
# RRM Eqs. 12–13: the energy
# ----------------------------------------------------------------------------
def _energy_value(masked: jax.Array, gate: jax.Array,
                  filtered: jax.Array) -> jax.Array:
  return -jnp.sum(gate[..., None] * masked * filtered) / masked.shape[0]


# The official backward: the gradient with respect to P̃ taken as
# −2·S·G P̃ / B, i.e. as if G(S·P̃) were S·G P̃ (true for a uniform S).
@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _rloss_energy(masked: jax.Array, gate: jax.Array, features: jax.Array,
                  kernel: str) -> jax.Array:
  return _energy_value(masked, gate, filter_gaussian(features, masked, kernel))


def _rloss_energy_fwd(masked, gate, features, kernel):
  filtered = filter_gaussian(features, masked, kernel)
  return _energy_value(masked, gate, filtered), (gate, filtered, features)


def _rloss_energy_bwd(kernel, residuals, cotangent):
  del kernel
  gate, filtered, features = residuals
  scale = -2.0 * cotangent / filtered.shape[0]
  return (scale * gate[..., None] * filtered, jnp.zeros_like(gate),
          jnp.zeros_like(features))


_rloss_energy.defvjp(_rloss_energy_fwd, _rloss_energy_bwd)


def dense_energy(probs: jax.Array, gate: jax.Array, roi: jax.Array,
                 features: jax.Array, kernel: str,
                 backward: str) -> jax.Array:
  """E = −(1/B) Σ_c Σ_i S(i) P̃_c(i) [G P̃_c](i), RRM Eq. 13 without its
  constant term (Eq. 12's Potts form; the gate of Eq. 14 held constant).

  B is the batch size (the official normaliser; no division by the pixel
  count or by the kernel's mass).

  Args:
    probs: (B, h, w, C) probabilities on the energy grid (differentiable).
    gate: (B, h, w) S (`energy_gate`); treated as a constant.
    roi: (B, h, w) bool; P̃ = P·ROI.
    features: (B, h·w, d) (`energy_features`).
    kernel: one of `KERNELS` (`filter_gaussian`).
    backward: 'autodiff', gradient −(S·G P̃ + G(S·P̃))/B with respect to P̃;
      'rloss_custom', the official rule −2·S·G P̃/B.
  Returns:
    Scalar float32 E (≤ 0 for a kernel with non-negative weights).
  """
  _check('kernel', kernel, KERNELS)
  _check('backward', backward, BACKWARDS)
  batch, h, w, channels = probs.shape
  masked = (probs.astype(jnp.float32)
            * roi[..., None].astype(jnp.float32)).reshape(batch, h * w,
                                                          channels)
  gate = jax.lax.stop_gradient(gate.astype(jnp.float32)).reshape(batch, h * w)
  features = jax.lax.stop_gradient(features.astype(jnp.float32))
  if backward == 'rloss_custom':
    return _rloss_energy(masked, gate, features, kernel)
  return _energy_value(masked, gate, filter_gaussian(features, masked, kernel))


# ----------------------------------------------------------------------------
# RRM Eqs. 10–14 from the full-resolution crop
# ----------------------------------------------------------------------------
def dense_energy_loss(images: jax.Array, probs: jax.Array, roi: jax.Array,
                      labels: jax.Array, *, sigma_xy: float, sigma_rgb: float,
                      scale: float, kernel: str, backward: str,
                      sigma_assignment: str, downsample_interp: str,
                      ignore_label: int = schema.IGNORE_LABEL) -> jax.Array:
  """The dense energy E of RRM Eqs. 10–14 (unweighted: the caller multiplies
  by the energy weight, 1e-7 in the official code).

  The crop is brought to the energy grid by `scale` (0.5 in the official
  code: 321 -> 160): images, ROI and labels by nearest sampling
  (`downsample_nearest`), probabilities bilinearly (`downsample_bilinear`
  with `downsample_interp`).  The spatial σ is multiplied by `scale` (100 ->
  50 px), the colour σ is not.  The gate (`energy_gate`) is computed there
  from the downsampled probabilities and labels.

  Args:
    images: (B, H, W, 3) RGB 0..255, float or uint8: the crop, padding
      included.
    probs: (B, H, W, C) softmax probabilities (differentiable).
    roi: (B, H, W) bool, real (non-padded) pixels.
    labels: (B, H, W) int reliable labels, `ignore_label` = unlabelled.
    sigma_xy: spatial σ at full resolution, px; sigma_rgb: colour σ.  With
      sigma_assignment 'paper_literal' the two are swapped (given 100 and
      15: spatial 15 px, colour 100); 'code' uses them as given.
    scale: 0.5 or 1.0.
    kernel, backward: see `dense_energy`.
    downsample_interp: one of `DOWNSAMPLE_INTERPS`.
  Returns:
    Scalar float32 E, finite with finite gradients also for an all-padding
    crop, no or only labelled pixels, one class or a flat image.
  """
  _check('kernel', kernel, KERNELS)
  _check('backward', backward, BACKWARDS)
  _check('sigma_assignment', sigma_assignment, SIGMA_ASSIGNMENTS)
  _check('downsample_interp', downsample_interp, DOWNSAMPLE_INTERPS)
  _check_scale(scale)
  if sigma_assignment == 'paper_literal':
    sigma_xy, sigma_rgb = sigma_rgb, sigma_xy
  images = downsample_nearest(images, scale).astype(jnp.float32)
  roi = downsample_nearest(roi, scale)
  labelled = downsample_nearest(labels, scale) != ignore_label
  probs = downsample_bilinear(probs, scale, downsample_interp)
  gate = energy_gate(probs, labelled, roi)
  features = energy_features(images, sigma_xy * scale, sigma_rgb)
  return dense_energy(probs, gate, roi, features, kernel, backward)
