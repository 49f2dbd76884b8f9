"""Method-agnostic region work for pseudo labels: box masks, masked feature
means, cosine scores, masked argmax and label agreement.

Conventions: channel-last maps (B, H, W, C) with C = L + 1 channels and class
0 = background; boxes (B, N, 4) float half-open pixel-edge [x0, y0, x1, y1]
in image pixels (a box covers the pixels whose centres lie inside,
`wsss_jax.ops.boxes.centre_membership`); box labels (B, N) int32 in 1..L,
−1 (any value < 1) on padded rows.

"AC-True" is bilinear resampling with align_corners=True: output pixel i
samples input coordinate i·(in − 1)/(out − 1) (`wsss_jax.ops.resize`).

All dot products run at `Precision.HIGHEST` (no TF32 rounding): BANA compares
cosines against a 0.99·max cut (docs/bana.md).

The functions were first written for BANA (Oh et al., CVPR 2021) and keep its
numbers bit for bit; they are shared with the other methods.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from wsss_jax.ops import boxes as box_ops
from wsss_jax.ops.features import l2_normalize

_EPS = 1e-12
_HI = lax.Precision.HIGHEST
IGNORE = 255


# ----------------------------------------------------------------------------
# Boxes
# ----------------------------------------------------------------------------
def box_coverage(boxes: jax.Array, box_labels: jax.Array,
                 image_hw: tuple[int, int]) -> jax.Array:
  """Per-box pixel coverage.

  Args:
    boxes: (B, N, 4) float edge boxes in image pixels.
    box_labels: (B, N) int; rows with a label < 1 are padding.
    image_hw: (H, W), static.
  Returns:
    (B, N, H, W) bool: pixel centres inside each real box (padded rows and
    boxes without a pixel centre cover nothing).
  """
  in_y, in_x = box_ops.centre_membership(boxes, box_labels, image_hw)
  return in_y[..., :, None] & in_x[..., None, :]


def class_box_masks(boxes: jax.Array, box_labels: jax.Array,
                    num_classes: int, image_hw: tuple[int, int]
                    ) -> jax.Array:
  """Class box masks (B, H, W, C) bool.

  Channel c ≥ 1: inside some box of class c (the set B_c of BANA Eq. 5);
  channel 0: outside every box (definite background M).  Rows with label −1
  are ignored.  Computed separably (rows × columns × one-hot), no
  (B, N, H, W, C) intermediate.

  Args:
    boxes: (B, N, 4) float edge boxes; box_labels: (B, N) int.
    num_classes: C (static); image_hw: (H, W) (static).
  """
  labels = jnp.asarray(box_labels, jnp.int32)
  in_y, in_x = box_ops.centre_membership(boxes, labels, image_hw)
  in_y, in_x = in_y.astype(jnp.float32), in_x.astype(jnp.float32)
  onehot = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
  # Cover counts per class: exact small integers.
  yc = jnp.einsum('bnh,bnc->bnhc', in_y, onehot)
  counts = jnp.einsum('bnhc,bnw->bhwc', yc, in_x, precision=_HI)
  masks = counts > 0.5
  outside = ~jnp.any(masks[..., 1:], axis=-1)
  return masks.at[..., 0].set(outside)


def present_classes(box_labels: jax.Array, num_classes: int) -> jax.Array:
  """(B, C) bool: background always; class c iff the image has a box of c.

  `box_labels` (B, N) int (padding < 1); num_classes C static."""
  labels = jnp.asarray(box_labels, jnp.int32)
  onehot = (labels[..., None] == jnp.arange(num_classes)) & (
      labels >= 1)[..., None]
  return jnp.any(onehot, axis=1).at[:, 0].set(True)


# ----------------------------------------------------------------------------
# AC-True interpolation and masked means of upsampled features
# ----------------------------------------------------------------------------
def ac_true_matrix(out_size: int, in_size: int) -> jax.Array:
  """(out, in) float32 matrix U with U @ x = AC-True bilinear resize of x.

  Output i samples input coordinate i·(in − 1)/(out − 1); each row has at
  most two non-zero weights summing to 1.  Sizes are static Python ints.
  """
  out_size, in_size = int(out_size), int(in_size)
  if out_size == in_size:
    return jnp.eye(out_size, dtype=jnp.float32)
  scale = (in_size - 1) / max(out_size - 1, 1)
  src = np.arange(out_size, dtype=np.float64) * scale
  low = np.clip(np.floor(src), 0, in_size - 1).astype(np.int64)
  high = np.minimum(low + 1, in_size - 1)
  frac = src - low
  matrix = np.zeros((out_size, in_size), np.float64)
  np.add.at(matrix, (np.arange(out_size), low), 1.0 - frac)
  np.add.at(matrix, (np.arange(out_size), high), frac)
  return jnp.asarray(matrix, jnp.float32)


def masked_feature_sums(features: jax.Array, weights: jax.Array
                        ) -> tuple[jax.Array, jax.Array]:
  """Σ_p m_k(p) f_up(p) and Σ_p m_k(p) over full-resolution masks.

  f_up = AC-True upsampling of `features` (B, h, w, D) to the mask size
  (H, W); `weights` (B, H, W, K) (bool or float).  The upsampled features
  are never built: Σ_p m(p) f_up(p) = Σ_ij (Uyᵀ m Ux)_ij f_ij with the
  interpolation matrices Uy (H, h), Ux (W, w) of `ac_true_matrix`.  With
  (h, w) = (H, W) this is the plain masked sum.

  Returns:
    (sums (B, K, D) float32, counts (B, K) float32).
  """
  features = jnp.asarray(features, jnp.float32)
  weights = jnp.asarray(weights, jnp.float32)
  (h, w), (height, width) = features.shape[1:3], weights.shape[1:3]
  counts = jnp.sum(weights, axis=(1, 2))
  if (h, w) != (height, width):
    uy, ux = ac_true_matrix(height, h), ac_true_matrix(width, w)
    weights = jnp.einsum('Hh,bHWk->bhWk', uy, weights, precision=_HI)
    weights = jnp.einsum('bhWk,Ww->bhwk', weights, ux, precision=_HI)
  sums = jnp.einsum('bhwk,bhwd->bkd', weights, features, precision=_HI)
  return sums, counts


def masked_feature_means(features: jax.Array, weights: jax.Array
                         ) -> tuple[jax.Array, jax.Array]:
  """Means of the AC-True-upsampled features over each mask.

  Args:
    features: (B, h, w, D); weights: (B, H, W, K) bool or float masks.
  Returns:
    (means (B, K, D) float32, non-empty flags (B, K) bool).  An empty mask
    gives a zero mean (not NaN).
  """
  sums, counts = masked_feature_sums(features, weights)
  return sums / jnp.maximum(counts, _EPS)[..., None], counts > 0


def cosine_scores(features: jax.Array, queries: jax.Array) -> jax.Array:
  """ReLU(cos(f(p), q_k)), (B, h, w, K), for f (B, h, w, D), q (B, K, D).

  Both sides are normalised by max(‖·‖, 1e-12), so a zero query or feature
  scores 0 (BANA Eqs. 7 and 9 with the ReLU)."""
  f = l2_normalize(jnp.asarray(features, jnp.float32))
  q = l2_normalize(jnp.asarray(queries, jnp.float32))
  return jax.nn.relu(jnp.einsum('bhwd,bkd->bhwk', f, q, precision=_HI))


# ----------------------------------------------------------------------------
# CRF input probabilities
# ----------------------------------------------------------------------------
def unary_probabilities(u: jax.Array, present: jax.Array,
                        inside_any_box: jax.Array) -> jax.Array:
  """CRF input probabilities (B, H, W, C) float32 (docs/bana.md).

  Inside any box: softmax of u = [u_0, u_1, …, u_L] over the present
  channels (absent classes get exactly 0).  Outside boxes: exactly
  [1, 0, …, 0].

  Args:
    u: (B, H, W, C) unaries.
    present: (B, C) bool; must include the background.
    inside_any_box: (B, H, W) bool.
  """
  u = jnp.asarray(u, jnp.float32)
  keep = jnp.asarray(present, bool)[:, None, None, :]
  logits = jnp.where(keep, u, -jnp.inf)
  logits = logits - jnp.max(logits, axis=-1, keepdims=True)
  e = jnp.where(keep, jnp.exp(logits), 0.0)
  probs = e / jnp.sum(e, axis=-1, keepdims=True)
  background = jax.nn.one_hot(0, u.shape[-1], dtype=jnp.float32)
  return jnp.where(inside_any_box[..., None], probs, background)


# ----------------------------------------------------------------------------
# After the CRF
# ----------------------------------------------------------------------------
def _xp(*arrays):
  return np if all(isinstance(a, np.ndarray) for a in arrays) else jnp


def mask_marginals(q, class_masks):
  """Box-constrained argmax: Y (B, H, W) int32.

  CRF marginals q (B, H, W, C) with every foreground channel zeroed outside
  its class boxes (`class_masks` (B, H, W, C) bool from `class_box_masks`;
  its channel 0 is not used), then argmax over C (ties to the lowest index).
  BANA's Y_crf.  NumPy in, NumPy out; otherwise jax."""
  xp = _xp(q, class_masks)
  keep = xp.asarray(class_masks, bool)
  keep = xp.concatenate([xp.ones_like(keep[..., :1]), keep[..., 1:]], -1)
  masked = xp.where(keep, q, 0)
  return xp.argmax(masked, axis=-1).astype(xp.int32)


def agreement(y_crf, y_ret):
  """Agreement of two label maps (B, H, W) (integer, same shape).

  Returns (S, label map): S (B, H, W) bool where the two agree; the label map
  is the first map on S and 255 elsewhere.  The reliable labels of BANA
  Eq. (10) (Y_crf, Y_ret) and of RRM Eq. (7) (I_cam, I_crf).  NumPy in,
  NumPy out; otherwise jax.  The map keeps the first map's dtype."""
  xp = _xp(y_crf, y_ret)
  same = y_crf == y_ret
  labels = xp.where(same, y_crf, IGNORE).astype(y_crf.dtype)
  return same, labels
