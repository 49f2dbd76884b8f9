"""BANA stage 2 (Oh et al., CVPR 2021, Sect. 3.2): pseudo labels Y_crf, Y_ret.

Device side of the label generation, split in two jitted passes around the
host DenseCRF:

  first_pass   unaries u_c (Eqs. 5-6, CAM normalised inside the class boxes)
               and u_0 (Eq. 7, background attention with N = 1 and the
               0.99·max cut of Sect. 4.1), turned into probabilities by a
               softmax over the present channels inside boxes ([1, 0, …, 0]
               outside; docs/bana.md).  The host CRF takes
               −log(clip(p, 1e-5, 1)).
  `wsss_jax.pseudo.regions.mask_marginals`  after the CRF: foreground
               channels zeroed outside their class boxes, argmax -> Y_crf
               (docs/bana.md).
  second_pass  prototypes q_c (Eq. 8) from Y_crf, ReLU(cos) retrieval
               (Eq. 9) with the rules of docs/bana.md -> Y_ret.

The method-agnostic pieces (box masks, masked feature means, cosine scores,
the CRF input softmax, the masked argmax, the agreement map, the CAM) live in
`wsss_jax.pseudo.regions` and `wsss_jax.pseudo.cam`.

Notation: features f (B, h, w, D) at output stride ~8, classifier kernel W
(D, C) without bias, C = L + 1 channels, class 0 = background; boxes (B, N,
4) float half-open pixel-edge [x0, y0, x1, y1] in image pixels (a box covers
the pixels whose centres lie inside, `wsss_jax.data.boxes`), box_labels
(B, N) int32 in 1..L, −1 on padded rows.  Every image of a call has the same
size (H, W).

Resolution (switch `stage2_map_resolution`, docs/bana.md):
  'upsample_maps' (default, paper footnote 3): CAM, the background
    attention A and the correlations C_c are computed on f and upsampled with
    align_corners=True (AC-True) to (H, W); the 0.99·max cut and the
    per-class maxima are taken on the upsampled maps.  Means over
    full-resolution masks (background query, prototypes) are means of the
    AC-True-upsampled features, computed without materialising (H, W, D):
    Σ_p m(p) f_up(p) = Σ_ij (Uyᵀ m Ux)_ij f_ij with the interpolation
    matrices Uy (H, h), Ux (W, w).
  'upsample_features' (official code): f itself is upsampled to (H, W) and
    everything is computed there.

Normalisation of u_c (switch `u_c_normalisation`): 'class' (Eq. 5, max over
the union of the class's boxes, default) or 'box' (official code: each box by
its own max, a later box of the same class overwriting earlier ones).

Not reproduced (docs/bana.md): the official code's NaN background query
for an image without definite background.  Here u_0 = 0 inside boxes, the
image is flagged `no_background`, and Y_ret falls back to the normalised
classifier column W[:, 0] for the background prototype.

All dot products run at `Precision.HIGHEST`: cosines compared against a
0.99·max cut must not carry TF32 rounding.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from wsss_jax.ops.resize import resize_bilinear
from wsss_jax.pseudo.cam import class_activation_maps
from wsss_jax.pseudo.regions import (box_coverage, class_box_masks,
                                     cosine_scores, masked_feature_means,
                                     present_classes, unary_probabilities)

_EPS = 1e-12

_PER = {'class': 'class', 'per_class': 'class', 'box': 'box',
        'per_box': 'box'}
_RESOLUTIONS = ('upsample_maps', 'upsample_features')


def _check_per(per: str) -> str:
  if per not in _PER:
    raise ValueError(f"u_c_normalisation={per!r}; expected 'class' "
                     "('per_class') or 'box' ('per_box').")
  return _PER[per]


def _check_resolution(resolution: str) -> str:
  if resolution not in _RESOLUTIONS:
    raise ValueError(f'stage2_map_resolution={resolution!r}; expected one '
                     f'of {_RESOLUTIONS}.')
  return resolution


def _upsample(maps: jax.Array, image_hw: tuple[int, int]) -> jax.Array:
  return resize_bilinear(jnp.asarray(maps, jnp.float32),
                         (int(image_hw[0]), int(image_hw[1])),
                         align_corners=True)


# ----------------------------------------------------------------------------
# First pass: unaries (Eqs. 5-7) and CRF input probabilities
# ----------------------------------------------------------------------------
def normalized_cam(cam: jax.Array, boxes: jax.Array, box_labels: jax.Array,
                   class_masks: jax.Array, per: str = 'class') -> jax.Array:
  """u_c, Eq. (5): CAM_c / (max of CAM_c over B_c + 1e-12) inside B_c.

  Args:
    cam: (B, H, W, C) ReLU(f·W) at image resolution (≥ 0).
    boxes, box_labels: (B, N, 4), (B, N) as in the module docstring.
    class_masks: (B, H, W, C) from `class_box_masks`.
    per: 'class' (Eq. 5: one max per class over the union of its boxes) or
      'box' (official code: each box by its own max; where boxes of the same
      class overlap, the later row wins).
  Returns:
    (B, H, W, C) float32 in [0, 1]; 0 outside B_c; channel 0 is 0.
  """
  per = _check_per(per)
  cam = jnp.asarray(cam, jnp.float32)
  fg = class_masks.at[..., 0].set(False)
  if per == 'class':
    peak = jnp.max(jnp.where(fg, cam, 0.0), axis=(1, 2), keepdims=True)
    return jnp.where(fg, cam / (peak + _EPS), 0.0)

  num_boxes, num_classes = box_labels.shape[1], cam.shape[-1]
  labels = jnp.asarray(box_labels, jnp.int32)
  real = labels >= 1
  safe = jnp.clip(labels, 0, num_classes - 1)
  cover = box_coverage(boxes, labels, cam.shape[1:3])          # (B, N, H, W)
  # Per-box peak of its own class channel.
  cam_of_box = jax.vmap(lambda c, l: jnp.moveaxis(c[..., l], -1, 0))(
      cam, safe)                                                # (B, N, H, W)
  peak = jnp.max(jnp.where(cover, cam_of_box, 0.0), axis=(2, 3))   # (B, N)
  # Priority: at each pixel and class, the covering box with the highest row.
  key = jnp.where(cover, jnp.arange(num_boxes)[:, None, None], -1)
  segment = jnp.where(real, labels, num_classes)               # padded: drop

  def winner(key_b, segment_b):
    return jax.ops.segment_max(key_b, segment_b,
                               num_segments=num_classes + 1)[:num_classes]

  winning = jax.vmap(winner)(key, segment)                      # (B, C, H, W)
  has_box = winning >= 0
  denom = jax.vmap(lambda p, i: p[i])(peak, jnp.clip(winning, 0, None))
  has_box = jnp.moveaxis(has_box, 1, -1).at[..., 0].set(False)
  denom = jnp.moveaxis(denom, 1, -1)
  return jnp.where(has_box, cam / (denom + _EPS), 0.0)


def background_unary(features: jax.Array, bg_mask: jax.Array,
                     inside_any_box: jax.Array, threshold: float
                     ) -> tuple[jax.Array, jax.Array]:
  """u_0, Eq. (7) with N = 1 and the cut of Sect. 4.1.

  One query q = mean of the (AC-True-upsampled) features over the definite
  background; A = ReLU(cos(f, q)) with eps 1e-12.  `features` may be at
  feature resolution (h, w) ('upsample_maps': A is computed there and
  upsampled, q is the mean of the upsampled features over the mask) or at
  image resolution (H, W) ('upsample_features').  Values of A below
  threshold·max(A over the whole image) are set to 0 (docs/bana.md);
  u_0 = 1 outside boxes, A inside.

  Args:
    features: (B, h, w, D) or (B, H, W, D).
    bg_mask: (B, H, W) bool, definite background (outside every box).
    inside_any_box: (B, H, W) bool.
    threshold: the relative cut (0.99); 0 disables it.
  Returns:
    (u_0 (B, H, W) float32, no_background (B,) bool).  An image without a
    definite-background pixel has u_0 = 0 inside boxes (no NaN).
  """
  image_hw = bg_mask.shape[1:3]
  query, has_bg = masked_feature_means(features, bg_mask[..., None])
  attention = _upsample(cosine_scores(features, query), image_hw)[..., 0]
  peak = jnp.max(attention, axis=(1, 2), keepdims=True)
  attention = jnp.where(attention < threshold * peak, 0.0, attention)
  has_bg = has_bg[:, 0]
  attention = jnp.where(has_bg[:, None, None], attention, 0.0)
  u0 = jnp.where(inside_any_box, attention, 1.0)
  return u0, ~has_bg


def first_pass(features: jax.Array, kernel: jax.Array, boxes: jax.Array,
               box_labels: jax.Array, image_hw: tuple[int, int], *,
               per: str, resolution: str,
               threshold: float) -> dict[str, jax.Array]:
  """Unaries and CRF input probabilities for a batch of same-size images.

  Args:
    features: (B, h, w, D) classification features (eval mode).
    kernel: (D, C) classifier weights (no bias).
    boxes: (B, N, 4) float edge boxes in image pixels; box_labels (B, N)
      int32, −1 on padded rows.
    image_hw: (H, W), static.
    per: `u_c_normalisation` ('class' | 'box'); resolution:
      `stage2_map_resolution` ('upsample_maps' | 'upsample_features');
      threshold: the background-attention cut (0.99).  All static.
  Returns:
    dict with 'probs' (B, H, W, C) float32, 'class_masks' (B, H, W, C) bool,
    'present' (B, C) bool, 'no_background' (B,) bool, 'cam' (u_c, channel 0
    = 0) and 'background' (u_0, (B, H, W)) for visualisation.
  """
  per = _check_per(per)
  resolution = _check_resolution(resolution)
  image_hw = (int(image_hw[0]), int(image_hw[1]))
  num_classes = kernel.shape[-1]
  class_masks = class_box_masks(boxes, box_labels, num_classes, image_hw)
  bg_mask = class_masks[..., 0]
  inside = ~bg_mask
  present = present_classes(box_labels, num_classes)
  if resolution == 'upsample_features':
    features = _upsample(features, image_hw)
    cam = class_activation_maps(features, kernel)
  else:
    cam = _upsample(class_activation_maps(features, kernel), image_hw)
  u_c = normalized_cam(cam, boxes, box_labels, class_masks, per)
  u_0, no_background = background_unary(features, bg_mask, inside, threshold)
  u = u_c.at[..., 0].set(u_0)
  return {
      'probs': unary_probabilities(u, present, inside),
      'class_masks': class_masks,
      'present': present,
      'no_background': no_background,
      'cam': u_c,
      'background': u_0,
  }


# ----------------------------------------------------------------------------
# Second pass: prototypes (Eq. 8) and retrieval (Eq. 9)
# ----------------------------------------------------------------------------
def class_prototypes(features: jax.Array, labels: jax.Array,
                     num_classes: int, image_hw: tuple[int, int]
                     ) -> tuple[jax.Array, jax.Array]:
  """q_c, Eq. (8): mean of the AC-True-upsampled features over Y_crf == c.

  Args:
    features: (B, h, w, D) (or already at (H, W)).
    labels: (B, H, W) integer Y_crf; values outside 0..C−1 are ignored.
    num_classes: C; image_hw: (H, W) (must match `labels`).
  Returns:
    (q (B, C, D) float32 unnormalised means, zero for absent classes;
    present (B, C) bool: the class has at least one pixel).
  """
  if tuple(labels.shape[1:3]) != (int(image_hw[0]), int(image_hw[1])):
    raise ValueError(f'labels of shape {labels.shape} do not match '
                     f'image_hw={tuple(image_hw)}.')
  onehot = jax.nn.one_hot(jnp.asarray(labels, jnp.int32), num_classes,
                          dtype=jnp.float32)
  return masked_feature_means(features, onehot)


def retrieval_scores(features: jax.Array, kernel: jax.Array,
                     y_crf: jax.Array, boxes: jax.Array,
                     box_labels: jax.Array, image_hw: tuple[int, int], *,
                     resolution: str) -> jax.Array:
  """Retrieval scores (B, H, W, C) float32 behind Y_ret (docs/bana.md).

  Queries: q_c from Y_crf (Eq. 8); a class absent from Y_crf (the
  background of an image without background included) uses the classifier
  column W[:, c] (normalised with the rest).  Score_c = ReLU(cos(f, q_c))
  (Eq. 9 with ReLU; at feature resolution then AC-True upsampled, or on the
  upsampled features); the background score is 1 outside boxes; every class
  score is 0 outside its class boxes (classes without a box score 0
  everywhere).
  """
  resolution = _check_resolution(resolution)
  image_hw = (int(image_hw[0]), int(image_hw[1]))
  num_classes = kernel.shape[-1]
  if resolution == 'upsample_features':
    features = _upsample(features, image_hw)
  proto, found = class_prototypes(features, y_crf, num_classes, image_hw)
  fallback = jnp.asarray(kernel, jnp.float32).T[None]           # (1, C, D)
  queries = jnp.where(found[..., None], proto, fallback)
  scores = _upsample(cosine_scores(features, queries), image_hw)
  class_masks = class_box_masks(boxes, box_labels, num_classes, image_hw)
  outside = class_masks[..., 0]
  scores = jnp.where(class_masks.at[..., 0].set(True), scores, 0.0)
  return scores.at[..., 0].set(jnp.where(outside, 1.0, scores[..., 0]))


def second_pass(features: jax.Array, kernel: jax.Array, y_crf: jax.Array,
                boxes: jax.Array, box_labels: jax.Array,
                image_hw: tuple[int, int], *,
                resolution: str) -> jax.Array:
  """Y_ret (B, H, W) int32: argmax of `retrieval_scores`, ties to the lowest
  index (background first).  Outside boxes Y_ret = 0."""
  scores = retrieval_scores(features, kernel, y_crf, boxes, box_labels,
                            image_hw, resolution=resolution)
  return jnp.argmax(scores, axis=-1).astype(jnp.int32)


# The two passes jitted with their configuration arguments static (image_hw
# must be a hashable tuple of ints).
first_pass_jit = jax.jit(first_pass, static_argnames=(
    'image_hw', 'per', 'resolution', 'threshold'))
second_pass_jit = jax.jit(second_pass,
                          static_argnames=('image_hw', 'resolution'))
