"""BANA stage 1: background-aware pooling (Oh et al., CVPR 2021, Sect. 3.1).

One pure function per step of the Labeler's forward pass and loss (paper Eqs.
1–4; the semantics, with the official code's where the paper is silent, in
docs/bana.md, "Stage 1 in detail", whose step numbers are cited below):

  M (definite background, input pixels) -> M at feature resolution (legacy
  nearest) -> N×N grid queries q_j (Eq. 1) -> every box resampled on a
  fixed S×S bilinear grid with a validity mask -> background attention A
  (Eqs. 2–3) -> weighted pooling r_i (Eq. 4) -> one cross-entropy over the
  fg rows (box class) and the valid queries (class 0).

Conventions.  Features are (B, h, w, D) channels-last.  Boxes are (B, N, 4)
float [x0, y0, x1, y1] in input pixels, half-open pixel edges: a box covers
the pixels whose centres (i + 0.5) lie in [x0, x1) × [y0, y1); its first and
last covered pixel indices are taken as x0 and x1 − 1.  Rows of `box_labels`
that are ≤ 0 (the caller pads with −1) are padding and are ignored
everywhere.  Sample coordinates are (row, col) positions on the feature grid
(feature cell i has its centre at i).  Variable-size RoIs are sampled on a
fixed max_samples × max_samples grid with a validity mask (step 5),
so a jitted `bap_forward` compiles once for any box sizes.

Paper/code switches (docs/bana.md, "Defaults and switches"): `roi_grid` (1, 1) gives one r_i per box
(paper, default), (2, 2) four vectors per box (official code); `sampling`
'aligned' samples exactly on the box extent in align_corners=True feature
coordinates (paper, RoIAlign-consistent, default), 'grid_sample_ac_false'
reproduces the code's grid_sample call.  The GAP fallback for images with
≤ 1/8 background and the single batch mean of the loss follow the code where
the paper is silent (steps 6 and 8).  Nothing is detached.

Memory: the resampled box features are (B, N, S, S, D); with S = max(h, w) +
1 by default this dominates the cost for many padded boxes, so callers should
keep N (the padded box count) tight.  Dot products use HIGHEST precision (the
official code computes these sums in float32).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from wsss_jax.losses import safe_mean, softmax_cross_entropy
from wsss_jax.ops import boxes as box_ops

_EPS = 1e-12
_HI = lax.Precision.HIGHEST
SAMPLING_MODES = ('aligned', 'grid_sample_ac_false')
POOLING_MODES = ('bap', 'gap')


def _real_boxes(box_labels: jax.Array) -> jax.Array:
  """(B, N) bool: rows that hold a box (label ≥ 1); −1 rows are padding."""
  return box_labels > 0


def background_mask(boxes: jax.Array, box_labels: jax.Array,
                    valid: jax.Array) -> jax.Array:
  """Definite background M, BANA Sect. 3.1: 1 outside every box.

  A pixel is background iff it is a real (non-padded) crop pixel and its
  centre (i + 0.5) lies inside no real box.  Crop padding is not background
  (the official bg-mask is padded with 0, step 1).  Computed
  separably (one (B, N, H) × (B, N, W) contraction), never as (B, N, H, W).

  Args:
    boxes: (B, N, 4) float [x0, y0, x1, y1], half-open, input pixels.
    box_labels: (B, N) int; rows ≤ 0 are padding.
    valid: (B, H, W) bool, False on crop padding.
  Returns:
    (B, H, W) bool M.
  """
  in_y, in_x = box_ops.centre_membership(boxes, box_labels, valid.shape[1:3])
  covered = jnp.einsum('bnh,bnw->bhw', in_y.astype(jnp.float32),
                       in_x.astype(jnp.float32), precision=_HI) > 0.5
  return valid.astype(bool) & ~covered


def downsample_mask(mask: jax.Array, h: int, w: int) -> jax.Array:
  """PyTorch legacy 'nearest' resize of (B, H, W) to (B, h, w).

  src = floor(dst·in/out), top-left aligned (F.interpolate(mode='nearest'),
  how the official code brings the bg mask to the feature grid, step 2);
  e.g. 8 -> 3 picks rows 0, 2, 5.  An explicit gather:
  `jax.image.resize(..., 'nearest')` samples pixel centres instead
  (docs/implementation_notes.md, "Resizing and sampling conventions").
  """
  in_h, in_w = mask.shape[1], mask.shape[2]
  rows = (jnp.arange(h, dtype=jnp.int32) * in_h) // h
  cols = (jnp.arange(w, dtype=jnp.int32) * in_w) // w
  return mask[:, rows][:, :, cols].astype(bool)


def _grid_pads(size: int, n: int) -> tuple[int, int]:
  pad = (-size) % n
  return (pad // 2, pad // 2) if pad % 2 == 0 else (0, pad)


def pad_to_grid(x: jax.Array, n: int) -> jax.Array:
  """Zero-pads axes 1 and 2 of (B, h, w, ...) to multiples of n.

  The official `pad_for_grid` rule (step 3): an even pad
  amount is split evenly between the two sides, an odd amount goes entirely
  to the bottom (right).  41 with n = 4: 0 above, 3 below -> 44.
  """
  pads = [(0, 0)] * x.ndim
  pads[1] = _grid_pads(x.shape[1], n)
  pads[2] = _grid_pads(x.shape[2], n)
  return jnp.pad(x, pads)


def grid_queries(features: jax.Array, mask_f: jax.Array,
                 grid: int) -> tuple[jax.Array, jax.Array]:
  """Background queries, BANA Eq. (1): q_j = Σ_{G(j)} M f / Σ_{G(j)} M.

  Features and mask are zero-padded to a multiple of `grid` (`pad_to_grid`)
  and split into grid × grid equal cells, numbered row-major.  The
  denominator is Σ M + 1e-12 (official code); a cell without background is
  invalid (the paper's J ≤ N² valid cells) and its query is 0.

  Args:
    features: (B, h, w, D).
    mask_f: (B, h, w) bool, M at feature resolution.
    grid: N, cells per side.
  Returns:
    (queries (B, N², D), query_valid (B, N²) bool).
  """
  feats = pad_to_grid(features, grid)
  mask = pad_to_grid(mask_f.astype(features.dtype), grid)
  batch, hp, wp, dim = feats.shape
  ch, cw = hp // grid, wp // grid
  weighted = (feats * mask[..., None]).reshape(batch, grid, ch, grid, cw, dim)
  total = jnp.sum(weighted, axis=(2, 4)).reshape(batch, grid * grid, dim)
  count = jnp.sum(mask.reshape(batch, grid, ch, grid, cw),
                  axis=(2, 4)).reshape(batch, grid * grid)
  queries = total / (count[..., None] + _EPS)
  return queries, count > 0


def _axis_samples(first: jax.Array, last: jax.Array, in_size: int,
                  out_size: int, max_samples: int, mode: str
                  ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Sample positions along one axis: (pos (B, N, S), valid, count (B, N))."""
  scale = (out_size - 1) / max(in_size - 1, 1)
  first_f, last_f = first * scale, last * scale              # AC-True
  count = jnp.ceil(last_f) - jnp.floor(first_f)
  count = jnp.clip(count, 1, max_samples).astype(jnp.int32)
  k = jnp.arange(max_samples, dtype=jnp.float32)
  t = k / jnp.maximum(count - 1, 1).astype(jnp.float32)[..., None]
  if mode == 'aligned':
    pos = first_f[..., None] + t * (last_f - first_f)[..., None]
  elif mode == 'grid_sample_ac_false':
    half = max(in_size - 1, 1) / 2.0
    first_n, last_n = first / half - 1.0, last / half - 1.0
    pos_n = first_n[..., None] + t * (last_n - first_n)[..., None]
    pos = ((pos_n + 1.0) * out_size - 1.0) / 2.0               # AC-False read
  else:
    raise ValueError(f'bap_sampling={mode!r}; expected one of '
                     f'{SAMPLING_MODES}.')
  valid = k < count[..., None]
  pos = jnp.where(valid, pos, pos[..., :1])
  return pos, valid, count


def box_sampling_grid(boxes: jax.Array, image_hw: tuple[int, int],
                      feature_hw: tuple[int, int], max_samples: int,
                      mode: str = 'aligned'
                      ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Bilinear sample grid of every box on the feature map (BANA footnote 2).

  The first/last covered pixels x0, x1 − 1 map to feature coordinates with
  align_corners=True, x_f = x·(fW − 1)/(W − 1); the grid has BW = ceil(x1_f)
  − floor(x0_f) columns (≥ 1, ≤ max_samples), about one per feature cell
  (step 5), and BH rows likewise.

  mode 'aligned' (paper, default): BW points evenly spaced from x0_f to x1_f
  inclusive (one point at x0_f if BW = 1).  mode 'grid_sample_ac_false'
  (official code): BW points evenly spaced from x0_n to x1_n in normalised
  coordinates x_n = x/((W − 1)/2) − 1, read with the align_corners=False
  convention, feature coordinate ((x_n + 1)·fW − 1)/2 (half a cell outward
  at the image borders; outside the map `bilinear_sample` reads zeros).

  Args:
    boxes: (B, N, 4) float [x0, y0, x1, y1], half-open, input pixels.
    image_hw: (H, W) input size; feature_hw: (h, w) feature size.
    max_samples: S, the fixed grid side.
    mode: 'aligned' or 'grid_sample_ac_false'.
  Returns:
    coords (B, N, S, S, 2) float32 feature (row, col) positions; sample_valid
    (B, N, S, S) bool (sample row < BH and column < BW); counts (B, N, 2)
    int32 (BH, BW).  Invalid samples repeat the first position.
  """
  if mode not in SAMPLING_MODES:
    raise ValueError(f'bap_sampling={mode!r}; expected one of '
                     f'{SAMPLING_MODES}.')
  boxes = boxes.astype(jnp.float32)
  ys, vy, nh = _axis_samples(boxes[..., 1], boxes[..., 3] - 1.0, image_hw[0],
                             feature_hw[0], max_samples, mode)
  xs, vx, nw = _axis_samples(boxes[..., 0], boxes[..., 2] - 1.0, image_hw[1],
                             feature_hw[1], max_samples, mode)
  shape = ys.shape + (max_samples,)
  coords = jnp.stack([jnp.broadcast_to(ys[..., :, None], shape),
                      jnp.broadcast_to(xs[..., None, :], shape)], axis=-1)
  sample_valid = vy[..., :, None] & vx[..., None, :]
  return coords, sample_valid, jnp.stack([nh, nw], axis=-1)


def bilinear_sample(features: jax.Array, coords: jax.Array) -> jax.Array:
  """Bilinear read of (B, h, w, D) at (B, N, S, S, 2) (row, col) positions.

  Gather-and-lerp over the four neighbouring cells; a neighbour outside
  [0, h − 1] × [0, w − 1] contributes 0 (per corner, like grid_sample's
  padding_mode='zeros').  At integer positions the result is exactly the
  feature value.

  Returns:
    (B, N, S, S, D) in the features' dtype.
  """
  h, w = features.shape[1], features.shape[2]
  coords = coords.astype(jnp.float32)
  y, x = coords[..., 0], coords[..., 1]
  y0, x0 = jnp.floor(y), jnp.floor(x)
  ly, lx = y - y0, x - x0
  gather = jax.vmap(lambda f, r, c: f[r, c])

  def corner(yi, xi, weight):
    inside = (yi >= 0) & (yi <= h - 1) & (xi >= 0) & (xi <= w - 1)
    r = jnp.clip(yi, 0, h - 1).astype(jnp.int32)
    c = jnp.clip(xi, 0, w - 1).astype(jnp.int32)
    weight = jnp.where(inside, weight, 0.0).astype(features.dtype)
    return gather(features, r, c) * weight[..., None]

  return (corner(y0, x0, (1 - ly) * (1 - lx))
          + corner(y0, x0 + 1, (1 - ly) * lx)
          + corner(y0 + 1, x0, ly * (1 - lx))
          + corner(y0 + 1, x0 + 1, ly * lx))


def background_attention(roi_features: jax.Array, queries: jax.Array,
                         query_valid: jax.Array) -> jax.Array:
  """Background attention inside boxes, BANA Eqs. (2)–(3).

  A(p) = (1/J) Σ_{valid j} ReLU(cos(f(p), q_j)), cosines with the
  F.normalize rule x / max(‖x‖, 1e-12); A = 0 for an image without a valid
  query.  (Eq. 3's A_j = 1 outside boxes is never needed: only box samples
  are pooled.)

  Args:
    roi_features: (B, N, S, S, D) sampled box features.
    queries: (B, J, D); query_valid: (B, J) bool.
  Returns:
    (B, N, S, S) attention in [0, 1].
  """
  sq = jnp.sum(jnp.square(roi_features), axis=-1)
  inv_norm = lax.rsqrt(jnp.maximum(sq, _EPS * _EPS))
  # Written out rather than `ops.features.l2_normalize`: jnp.square's
  # gradient rounds differently from x·x (1.5e-8), which drifts the Labeler's
  # trajectory.  The features' norm divides the dot products rather than the
  # features: (B, N, S, S, D) is never normalised in memory.
  q_sq = jnp.sum(jnp.square(queries), axis=-1, keepdims=True)
  q_hat = queries * lax.rsqrt(jnp.maximum(q_sq, _EPS * _EPS))
  cos = jnp.einsum('bnijd,bkd->bnijk', roi_features, q_hat,
                   precision=_HI) * inv_norm[..., None]
  qv = query_valid.astype(cos.dtype)
  total = jnp.sum(jax.nn.relu(cos) * qv[:, None, None, None, :], axis=-1)
  count = jnp.maximum(jnp.sum(qv, axis=-1), 1.0)
  return total / count[:, None, None, None]


def _windows(count: jax.Array, size: int, cells: int) -> jax.Array:
  """(B, N, cells, size) bool masks of the pooling windows along one axis."""
  k = jnp.arange(size)
  n = count[..., None]
  if cells == 1:
    masks = [k < n]
  elif cells == 2:
    stride = n // 2
    kernel = n - stride
    masks = [k < kernel, (k >= stride) & (k < stride + kernel)]
  else:
    raise ValueError(f'bap_roi_grid side {cells}; expected 1 or 2.')
  return jnp.stack(masks, axis=-2)


def pool_boxes(roi_features: jax.Array, weights: jax.Array,
               sample_valid: jax.Array, counts: jax.Array,
               roi_grid: tuple[int, int] = (1, 1)) -> jax.Array:
  """Weighted average pooling of each box, BANA Eq. (4).

  roi_grid (1, 1) (paper): r_i = Σ w f / (Σ w + 1e-12) over the box's valid
  samples.  (2, 2) (official `weighted_avg_pool_2d`, step 7):
  along an axis with n valid samples, stride s = n // 2 and kernel k = n − s
  give window 0 = samples [0, k) and window 1 = [s, s + k) (the windows share
  the middle sample for odd n and are both the single sample for n = 1);
  each of the 2×2 cells is the weighted mean over its window.  Mixed sides
  ((1, 2), (2, 1)) combine the two rules.

  Args:
    roi_features: (B, N, S, S, D); weights: (B, N, S, S) pooling weights
      (1 − A for BAP); sample_valid: (B, N, S, S) bool; counts: (B, N, 2)
      int (BH, BW) from `box_sampling_grid`.
    roi_grid: (rows, cols) cells per box, each 1 or 2.
  Returns:
    (B, N, R, D), R = rows·cols, cells row-major.  A box without valid
    samples (padding) gives 0.
  """
  size_h, size_w = roi_features.shape[2], roi_features.shape[3]
  rows = _windows(counts[..., 0], size_h, roi_grid[0])
  cols = _windows(counts[..., 1], size_w, roi_grid[1])
  dtype = roi_features.dtype
  wv = jnp.where(sample_valid, weights, 0.0).astype(dtype)
  rows, cols = rows.astype(dtype), cols.astype(dtype)
  num = jnp.einsum('bnai,bncj,bnij,bnijd->bnacd', rows, cols, wv,
                   roi_features, precision=_HI)
  den = jnp.einsum('bnai,bncj,bnij->bnac', rows, cols, wv, precision=_HI)
  pooled = num / (den[..., None] + _EPS)
  batch, boxes = pooled.shape[:2]
  return pooled.reshape(batch, boxes, roi_grid[0] * roi_grid[1], -1)


def bap_forward(features: jax.Array, boxes: jax.Array, box_labels: jax.Array,
                valid: jax.Array, *, grid: int, roi_grid: tuple[int, int],
                sampling: str, pooling: str, min_background_fraction: float,
                max_samples: int | None = None) -> dict:
  """BANA stage-1 pooling (Sect. 3.1, Eqs. 1–4) for an augmented batch.

  pooling 'bap': weights 1 − A; 'gap' (Table 1 baseline): A = 0 (weights 1),
  the queries are still returned for classification.  Fallback (official
  code, paper silent; step 6): an image whose background
  fraction (mean of the full-resolution M over all H×W crop pixels, padding
  included) is ≤ `min_background_fraction`, or that has no valid query, is
  pooled with weights 1; its valid queries are still classified.

  Args:
    features: (B, h, w, D) backbone features.
    boxes: (B, N, 4) float [x0, y0, x1, y1], half-open, input pixels.
    box_labels: (B, N) int class ids 1..L, −1 (≤ 0) on padded rows.
    valid: (B, H, W) bool, False on crop padding; gives the input size.
    grid: N of the N×N query grid (4 for training, paper Sect. 4.1).
    roi_grid: (1, 1) paper, (2, 2) official code (`bap_roi_grid`).
    sampling: 'aligned' or 'grid_sample_ac_false' (`bap_sampling`).
    max_samples: S of the fixed sample grid; default max(h, w) + 1.
    pooling: 'bap' or 'gap'.
    min_background_fraction: fallback threshold (1/8 in the code).
  Returns:
    dict: 'fg' (B, N, R, D) pooled box features; 'fg_labels' (B, N, R) int32
    (−1 for padded boxes); 'queries' (B, J, D), J = grid²; 'query_valid'
    (B, J) bool; 'attention' (B, N, S, S) the A actually used (0 on invalid
    samples, under the fallback and for 'gap'); 'fallback' (B,) bool;
    'sample_valid' (B, N, S, S) bool; 'background_fraction' (B,) float32.
  """
  if pooling not in POOLING_MODES:
    raise ValueError(f'bap pooling={pooling!r}; expected one of '
                     f'{POOLING_MODES}.')
  h, w = features.shape[1], features.shape[2]
  image_hw = (valid.shape[1], valid.shape[2])
  if max_samples is None:
    max_samples = max(h, w) + 1
  real = _real_boxes(box_labels)

  mask = background_mask(boxes, box_labels, valid)
  queries, query_valid = grid_queries(
      features, downsample_mask(mask, h, w), grid)

  coords, sample_valid, counts = box_sampling_grid(
      boxes, image_hw, (h, w), max_samples, sampling)
  sample_valid = sample_valid & real[..., None, None]
  roi = bilinear_sample(features, coords)

  background_fraction = jnp.mean(mask.astype(jnp.float32), axis=(1, 2))
  fallback = ((background_fraction <= min_background_fraction)
              | ~jnp.any(query_valid, axis=-1))
  if pooling == 'bap':
    attention = background_attention(roi, queries, query_valid)
    attention = jnp.where(fallback[:, None, None, None] | ~sample_valid,
                          0.0, attention)
  else:
    attention = jnp.zeros(sample_valid.shape, roi.dtype)
  fg = pool_boxes(roi, 1.0 - attention, sample_valid, counts, roi_grid)
  labels = jnp.where(real, box_labels, -1).astype(jnp.int32)
  fg_labels = jnp.broadcast_to(labels[..., None], fg.shape[:3])
  return {'fg': fg, 'fg_labels': fg_labels, 'queries': queries,
          'query_valid': query_valid, 'attention': attention,
          'fallback': fallback, 'sample_valid': sample_valid,
          'background_fraction': background_fraction}


def bap_loss(out: dict, kernel: jax.Array,
             balance: bool) -> tuple[jax.Array, dict]:
  """Cross-entropy of the (L+1)-way classifier on r_i and q_j, BANA Sect. 3.1.

  Logits are x·W (1×1 conv without bias) for every fg row (target: its box
  class) and every valid query (target: 0, background).  One mean over all
  valid rows of the batch, no fg/bg balancing (official code, step 8) unless
  `balance`.  0, with finite gradients, when there is no row.

  Args:
    out: `bap_forward` output ('fg', 'fg_labels', 'queries', 'query_valid').
    kernel: (D, C) classifier weight, C = L + 1.
  Returns:
    (loss scalar, metrics): 'fg_accuracy', 'bg_accuracy' (0 without rows),
    'num_fg_rows', 'num_bg_rows' (float32 scalars).
  """
  dim = kernel.shape[0]
  fg = out['fg'].reshape(-1, dim)
  fg_targets = out['fg_labels'].reshape(-1)
  bg = out['queries'].reshape(-1, dim)
  bg_valid = out['query_valid'].reshape(-1)
  fg_logits = jnp.einsum('nd,dc->nc', fg, kernel, precision=_HI)
  bg_logits = jnp.einsum('nd,dc->nc', bg, kernel, precision=_HI)
  bg_targets = jnp.where(bg_valid, 0, -1)
  fg_ce, fg_valid = softmax_cross_entropy(fg_logits, fg_targets)
  bg_ce, bg_valid = softmax_cross_entropy(bg_logits, bg_targets)
  if balance:
    loss = 0.5 * (safe_mean(fg_ce, fg_valid) + safe_mean(bg_ce, bg_valid))
  else:
    loss = safe_mean(jnp.concatenate([fg_ce, bg_ce]),
                     jnp.concatenate([fg_valid, bg_valid]))
  fg_hit = jnp.argmax(fg_logits, axis=-1) == fg_targets
  bg_hit = jnp.argmax(bg_logits, axis=-1) == 0
  metrics = {
      'fg_accuracy': safe_mean(fg_hit.astype(jnp.float32), fg_valid),
      'bg_accuracy': safe_mean(bg_hit.astype(jnp.float32), bg_valid),
      'num_fg_rows': jnp.sum(fg_valid).astype(jnp.float32),
      'num_bg_rows': jnp.sum(bg_valid).astype(jnp.float32),
  }
  return loss, metrics
