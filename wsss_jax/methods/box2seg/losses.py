"""Box2Seg losses (Kulharia et al., ECCV 2020), one pure function per equation.

Notation (paper Sect. 3): at the m output cells of an image, y (B, h, w, L+1)
are softmax probabilities (we take log y from a log-softmax), α (B, h, w, L)
sigmoid attention for the L foreground classes, β (B, h, w, d) embeddings,
B and M one-hot (B, h, w, L+1) box and GrabCut tensors (channel 0 =
background).  `valid` (B, h, w) marks real (non-padded) cells: crop padding is
not data (docs/box2seg.md, "Choices the paper leaves open", 25).

Where the paper is silent, the choices numbered in docs/box2seg.md ("Choices
the paper leaves open", cited below as "choice N") are used and named in the
docstrings; each is a config field of `configs/box2seg.py`, always passed in
(no function here has a default that could disagree with the config).
Every loss is finite, with finite gradients, when the region it averages over
is empty (that term is 0).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from wsss_jax.losses import safe_mean
from wsss_jax.ops.features import l2_normalize

# The aggregations each equation accepts (its config field in brackets); the
# value used is always passed in, from `config.box2seg` (configs/box2seg.py).
FG_CLASS_REDUCTIONS = ('sum', 'mean')                # [fg_class_reduction]
BBOX_REG_REDUCTIONS = ('sum', 'mean')                # [bbox_reg_reduction]
FILL_RATE_REDUCTIONS = ('sum', 'image_sum', 'mean')  # [fill_rate_reduction]
AFFINITY_REDUCTIONS = ('mean', 'sum')                # [affinity_reduction]

def _per_image_mean_ce(log_y: jax.Array, target: jax.Array,
                       valid: jax.Array) -> jax.Array:
  """−(1/m) Σ_c Σ_i T(i, c) log y(i, c), m = valid cells, mean over images."""
  valid = valid.astype(log_y.dtype)
  per_cell = -jnp.sum(target * log_y, axis=-1) * valid
  m = jnp.maximum(jnp.sum(valid, axis=(1, 2)), 1.0)
  return jnp.mean(jnp.sum(per_cell, axis=(1, 2)) / m)


def box_loss(log_y: jax.Array, box_onehot: jax.Array,
             valid: jax.Array) -> jax.Array:
  """L_box, Box2Seg Eq. (1): −(1/m) Σ_{c=0..L} Σ_i B(i, c) log y(i, c).

  Args:
    log_y: (B, h, w, L+1) log-probabilities.
    box_onehot: (B, h, w, L+1) box tensor B (one-hot; smaller box in front).
    valid: (B, h, w) bool, real cells; m counts them (per image).
  Returns:
    Scalar: the per-image loss averaged over images.
  """
  return _per_image_mean_ce(log_y, box_onehot, valid)


def grabcut_loss(log_y: jax.Array, grabcut_onehot: jax.Array,
                 valid: jax.Array) -> jax.Array:
  """L_GC, Box2Seg Eq. (2): −(1/m) Σ_{c=0..L} Σ_i M(i, c) log y(i, c).

  Shapes as in `box_loss`, with M the GrabCut tensor.
  """
  return _per_image_mean_ce(log_y, grabcut_onehot, valid)


def foreground_attention_loss(log_y: jax.Array, alpha: jax.Array,
                              box_onehot: jax.Array, valid: jax.Array,
                              class_reduction: str) -> jax.Array:
  """L_fg, Box2Seg Eq. (3): attention-weighted cross-entropy inside boxes.

  Per image and foreground class c: −Σ_i α(i,c) B(i,c) log y(i,c) / Σ_i B(i,c)
  (normalised by the box area "to give similar weighting to each class").
  The paper prints the normaliser outside Σ_c; we normalise per class and
  sum over the classes present (`class_reduction='sum'`, choice 8) or
  average them ('mean'); then mean over images.  α is not detached (choice
  7: the paper's remark that α = 0 would minimise L_fg implies it receives
  this gradient).

  Args:
    log_y: (B, h, w, L+1); alpha: (B, h, w, L) in [0, 1];
    box_onehot: (B, h, w, L+1); valid: (B, h, w).
  """
  box_fg = box_onehot[..., 1:] * valid[..., None].astype(log_y.dtype)
  weighted = -jnp.sum(alpha * box_fg * log_y[..., 1:], axis=(1, 2))
  area = jnp.sum(box_fg, axis=(1, 2))                    # (B, L)
  present = area > 0
  per_class = jnp.where(present, weighted / jnp.maximum(area, 1.0), 0.0)
  if class_reduction == 'sum':
    per_image = jnp.sum(per_class, axis=-1)
  elif class_reduction == 'mean':
    per_image = jnp.sum(per_class, axis=-1) / jnp.maximum(
        jnp.sum(present, axis=-1), 1)
  else:
    raise ValueError(f"fg_class_reduction={class_reduction!r}; expected "
                     "'sum' or 'mean'.")
  return jnp.mean(per_image)


def background_loss(log_y: jax.Array, box_onehot: jax.Array,
                    valid: jax.Array) -> jax.Array:
  """L_bg, Box2Seg Eq. (4): −Σ_i B(i,0) log y(i,0) / Σ_i B(i,0) per image.

  Cells outside every box are definite background.  An image without such a
  cell contributes 0 (choice 9); mean over images.
  """
  bg = box_onehot[..., 0] * valid.astype(log_y.dtype)
  total = -jnp.sum(bg * log_y[..., 0], axis=(1, 2))
  count = jnp.sum(bg, axis=(1, 2))
  return jnp.mean(jnp.where(count > 0, total / jnp.maximum(count, 1.0), 0.0))


def attention_weighted_loss(log_y, alpha, box_onehot, valid,
                            class_reduction: str) -> jax.Array:
  """L_AW, Box2Seg Eq. (5): L_fg (Eq. 3) + L_bg (Eq. 4)."""
  return (foreground_attention_loss(log_y, alpha, box_onehot, valid,
                                    class_reduction)
          + background_loss(log_y, box_onehot, valid))


def bbox_attention_loss(alpha: jax.Array, box_onehot: jax.Array,
                        valid: jax.Array, reduction: str) -> jax.Array:
  """L_α^bbox, Box2Seg Eq. (6): Σ_i Σ_{c=1..L} ‖B(i,c) − α(i,c)‖².

  `reduction` 'sum': the paper's unnormalised sum per image; 'mean': the
  mean over the image's valid cells of the per-cell sum over classes; then
  mean over images (choice 10).
  """
  valid_f = valid.astype(alpha.dtype)
  per_cell = jnp.sum((box_onehot[..., 1:] - alpha) ** 2, axis=-1) * valid_f
  per_image = jnp.sum(per_cell, axis=(1, 2))
  if reduction == 'mean':
    per_image = per_image / jnp.maximum(jnp.sum(valid_f, axis=(1, 2)), 1.0)
  elif reduction != 'sum':
    raise ValueError(f"bbox_reg_reduction={reduction!r}; expected 'mean' or "
                     "'sum'.")
  return jnp.mean(per_image)


def grabcut_fill_rates(grabcut_onehot: jax.Array, box_onehot: jax.Array,
                       valid: jax.Array) -> tuple[jax.Array, jax.Array]:
  """η_c, Box2Seg Eq. (7): Σ_i M(i,c) / Σ_i B(i,c), per image and class.

  Returns (η (B, L), present (B, L) bool: classes with a box cell).  Absent
  classes have η = 0.
  """
  valid_f = valid[..., None].astype(box_onehot.dtype)
  grabcut = jnp.sum(grabcut_onehot[..., 1:] * valid_f, axis=(1, 2))
  area = jnp.sum(box_onehot[..., 1:] * valid_f, axis=(1, 2))
  present = area > 0
  return jnp.where(present, grabcut / jnp.maximum(area, 1.0), 0.0), present


def predicted_fill_rates(alpha: jax.Array, box_onehot: jax.Array,
                         valid: jax.Array) -> jax.Array:
  """η'_c, Box2Seg Eq. (8): Σ_i B(i,c) α(i,c) / Σ_i B(i,c), (B, L)."""
  box_fg = box_onehot[..., 1:] * valid[..., None].astype(alpha.dtype)
  area = jnp.sum(box_fg, axis=(1, 2))
  return jnp.sum(box_fg * alpha, axis=(1, 2)) / jnp.maximum(area, 1.0)


def fill_rate_loss(alpha: jax.Array, grabcut_onehot: jax.Array,
                   box_onehot: jax.Array, valid: jax.Array,
                   gamma: float, reduction: str) -> jax.Array:
  """L_α^fr, Box2Seg Sect. 3.3: max(0, γ η_c − η'_c) (Eqs. 7–8), γ = 0.7.

  One hinge per (image, present class); how they are aggregated is not in
  the paper (choice 11).  `reduction`:
    'sum' (the config's value): summed over images and classes.  With
      λ_AW = 10 and λ_α = 1 the hinge then outweighs λ_AW·L_fg at a pixel while its
      cross-entropy is below batch_size/10 (1.6 at batch 16), so α stays on
      the pixels the network may label with the box class;
    'image_sum': summed over the classes of an image, mean over images (the
      normalisation of L_fg);
    'mean': mean over all (image, class) pairs (the reading noted under
      choice 11).
  With 'image_sum' or 'mean' the hinge holds α only where the cross-entropy
  is below 0.1, and on the benchmark the attention collapsed to 0
  (docs/box2seg.md, "Attention collapse").  0 when no image has a box.
  """
  eta, present = grabcut_fill_rates(grabcut_onehot, box_onehot, valid)
  eta_pred = predicted_fill_rates(alpha, box_onehot, valid)
  hinge = jnp.where(present, jnp.maximum(0.0, gamma * eta - eta_pred), 0.0)
  if reduction == 'image_sum':
    return jnp.mean(jnp.sum(hinge, axis=-1))
  if reduction == 'mean':
    return safe_mean(hinge, present)
  if reduction == 'sum':
    return jnp.sum(hinge)
  raise ValueError(f"fill_rate_reduction={reduction!r}; expected "
                   "'image_sum', 'mean' or 'sum'.")


def affinity(beta_i: jax.Array, beta_j: jax.Array) -> jax.Array:
  """A(i, j), Box2Seg Eq. (9): β_jᵀβ_i / (‖β_j‖‖β_i‖) (cosine; eps 1e-12).

  Args: (..., d) embeddings.  Returns (...) cosines.
  """
  return jnp.sum(l2_normalize(beta_i) * l2_normalize(beta_j), axis=-1)


def class_balanced_sample(labels: jax.Array, valid: jax.Array, rng: jax.Array,
                          num_samples: int) -> tuple[jax.Array, jax.Array]:
  """Samples `num_samples` cells per image, equally from each class present.

  "We randomly sample a small fraction of pixel embeddings equally from each
  class" (Box2Seg Sect. 3.4).  Cells are visited round-robin over classes in
  a random order within each class: the k-th pick of every class comes
  before the (k+1)-th of any class.  So each present class gets an equal
  share, and a class with fewer cells gives all of them, the rest going to
  the others (choice 4).  Fixed shapes: jit-friendly.

  Args:
    labels: (B, m) integer class per cell (GrabCut labels M, background 0).
    valid: (B, m) bool; invalid cells are never picked.
    rng: key.
    num_samples: n_s, samples per image.
  Returns:
    (indices (B, n_s) int32 into m, picked (B, n_s) bool: False where the
    image had fewer than n_s valid cells).
  """
  batch, m = labels.shape
  keys = jax.random.uniform(rng, (batch, m))

  def one_image(labels, valid, keys):
    big = jnp.iinfo(jnp.int32).max
    cls = jnp.where(valid, labels.astype(jnp.int32), big)
    order = jnp.lexsort((keys, cls))                     # by class, then key
    sorted_cls = cls[order]
    position = jnp.arange(m)
    is_start = jnp.concatenate([jnp.ones((1,), bool),
                                sorted_cls[1:] != sorted_cls[:-1]])
    start = lax.cummax(jnp.where(is_start, position, 0), axis=0)
    rank_sorted = (position - start).astype(jnp.float32)
    rank = jnp.zeros((m,), jnp.float32).at[order].set(rank_sorted)
    priority = jnp.where(valid, rank + keys, jnp.inf)
    neg, index = lax.top_k(-priority, num_samples)
    return index.astype(jnp.int32), jnp.isfinite(neg)

  return jax.vmap(one_image)(labels, valid, keys)


def affinity_loss(beta: jax.Array, targets: jax.Array, picked: jax.Array,
                  reduction: str) -> jax.Array:
  """L_A, Box2Seg Eq. (10): Σ_{i≠j} (A(i,j) − y_jᵀ y_i)² over sampled pixels.

  A(i, j) is the cosine of Eq. (9).  Never materialises the n×n matrices: with
  unit rows b_i and targets t_i of the picked pixels (P = picked),
      Σ_{i,j∈P} (b_i·b_j − t_i·t_j)² = ‖BᵀB‖² − 2‖BᵀT‖² + ‖TᵀT‖²
  (Frobenius norms, O(n(d + L)²)), and the diagonal Σ_i (‖b_i‖² − ‖t_i‖²)²
  is subtracted.  `reduction='mean'` divides by the n(n−1) ordered pairs per
  image (choice 5), 'sum' keeps the paper's sum; then mean over images.

  Args:
    beta: (B, n, d) embeddings of the sampled pixels (unnormalised).
    targets: (B, n, L+1) probabilities y (phase 2) or one-hot M (phase 1).
    picked: (B, n) bool; unpicked rows are excluded.
  """
  w = picked.astype(beta.dtype)[..., None]
  b, t = l2_normalize(beta) * w, targets.astype(beta.dtype) * w
  hi = lax.Precision.HIGHEST

  def gram_sq(x, y):
    g = jnp.einsum('bnd,bne->bde', x, y, precision=hi)
    return jnp.sum(g * g, axis=(1, 2))

  total = gram_sq(b, b) - 2.0 * gram_sq(b, t) + gram_sq(t, t)
  diagonal = jnp.sum((jnp.sum(b * b, -1) - jnp.sum(t * t, -1)) ** 2, axis=1)
  pairs_sum = jnp.maximum(total - diagonal, 0.0)
  if reduction == 'mean':
    n = jnp.sum(picked, axis=1).astype(beta.dtype)
    per_image = pairs_sum / jnp.maximum(n * (n - 1.0), 1.0)
  elif reduction == 'sum':
    per_image = pairs_sum
  else:
    raise ValueError(f"affinity_reduction={reduction!r}; expected 'mean' or "
                     "'sum'.")
  return jnp.mean(per_image)


def total_loss(l_gc: jax.Array, l_aw: jax.Array, l_alpha: jax.Array,
               l_affinity: jax.Array, *, lambda_aw: float | jax.Array,
               lambda_alpha: float, lambda_affinity: float) -> jax.Array:
  """L, Box2Seg Eq. (11): L_GC + λ_AW L_AW + λ_α L_α + λ_A L_A.

  The paper's weights are 10, 1, 1 (`config.box2seg.weights`).
  """
  return (l_gc + lambda_aw * l_aw + lambda_alpha * l_alpha
          + lambda_affinity * l_affinity)
