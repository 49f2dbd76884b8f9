"""BANA stage-2 pseudo labels (Eqs. 5-9): hand-computed cases, edge cases.

The shared helpers (box masks, masked means, cosine scores, CRF input
softmax, masked argmax, agreement) are tested in tests/pseudo/test_regions.py."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from wsss_jax.methods.bana import labels as B
from wsss_jax.ops.resize import resize_bilinear
from wsss_jax.pseudo import regions as R

E1, E2, E3 = np.eye(3, dtype=np.float32)

# Jitted entry points: one compilation each is cheaper than eager dispatch.
first_pass = functools.partial(B.first_pass_jit, resolution='upsample_maps',
                               per='class', threshold=0.99)
second_pass = functools.partial(B.second_pass_jit,
                                resolution='upsample_maps')
background_unary = jax.jit(B.background_unary, static_argnames='threshold')
normalized_cam = jax.jit(B.normalized_cam, static_argnames='per')


def _boxes(rows):
  """(1, N, 4) float boxes and (1, N) labels from [(x0, y0, x1, y1, label)]."""
  array = np.asarray(rows, np.float32).reshape(1, -1, 5)
  return jnp.asarray(array[..., :4]), jnp.asarray(array[..., 4], jnp.int32)


# ----------------------------------------------------------------------------
# u_c (Eq. 5)
# ----------------------------------------------------------------------------
def test_normalized_cam_per_class_vs_per_box():
  # 1x6 image, C = 3.  Two class-1 boxes: A = cols 0-2 (peak 4), B = cols 2-4
  # (peak 6), overlapping at col 2; one class-2 box at col 5; a padded row.
  cam = np.zeros((1, 1, 6, 3), np.float32)
  cam[0, 0, :, 1] = [1, 2, 4, 3, 6, 9]     # 9 lies outside every class-1 box
  cam[0, 0, :, 2] = [7, 7, 7, 7, 7, 5]     # class 2 only counts at col 5
  cam[0, 0, :, 0] = 3.0
  rows = [(0, 0, 3, 1, 1), (2, 0, 5, 1, 1), (5, 0, 6, 1, 2), (0, 0, 6, 1, -1)]
  boxes, labels = _boxes(rows)
  masks = R.class_box_masks(boxes, labels, 3, (1, 6))
  per_class = np.asarray(normalized_cam(cam, boxes, labels, masks, 'class'))
  per_box = np.asarray(normalized_cam(cam, boxes, labels, masks, 'box'))
  np.testing.assert_allclose(per_class[0, 0, :, 1],
                             [1 / 6, 2 / 6, 4 / 6, 3 / 6, 1, 0], rtol=1e-6)
  # Box B is later and overwrites col 2 with 4/6.
  np.testing.assert_allclose(per_box[0, 0, :, 1],
                             [1 / 4, 2 / 4, 4 / 6, 3 / 6, 1, 0], rtol=1e-6)
  for u in (per_class, per_box):
    np.testing.assert_allclose(u[0, 0, :, 2], [0, 0, 0, 0, 0, 1], rtol=1e-6)
    np.testing.assert_array_equal(u[..., 0], 0.0)
  # Reversed order: box A is now later and owns col 2 (4/4).
  boxes_r, labels_r = _boxes([rows[1], rows[0], rows[2], rows[3]])
  per_box_r = np.asarray(
      normalized_cam(cam, boxes_r, labels_r, masks, 'per_box'))
  np.testing.assert_allclose(per_box_r[0, 0, :, 1],
                             [1 / 4, 2 / 4, 1, 3 / 6, 1, 0], rtol=1e-6)
  with pytest.raises(ValueError, match='u_c_normalisation'):
    B.normalized_cam(cam, boxes, labels, masks, 'image')


# ----------------------------------------------------------------------------
# u_0 (Eq. 7)
# ----------------------------------------------------------------------------
def _bg_image():
  """1x5 image at full resolution; box over cols 1-4; background = col 0."""
  features = np.stack([E1,                     # background: query q = e1
                       2 * E1,                 # cos 1
                       E1 + E2,                # cos 0.707 -> cut
                       E1 + 0.1 * E2,          # cos 0.995 -> kept
                       -E1])[None, None]       # cos −1 -> ReLU 0
  boxes, labels = _boxes([(1, 0, 5, 1, 1)])
  masks = R.class_box_masks(boxes, labels, 2, (1, 5))
  return jnp.asarray(features), masks[..., 0], ~masks[..., 0]


def test_background_unary_threshold_and_outside():
  features, bg, inside = _bg_image()
  u0, no_bg = background_unary(features, bg, inside, 0.99)
  np.testing.assert_allclose(u0[0, 0], [1, 1, 0, 1 / np.sqrt(1.01), 0],
                             atol=1e-6)
  assert not bool(no_bg[0])
  u0, _ = background_unary(features, bg, inside, threshold=0.0)
  np.testing.assert_allclose(u0[0, 0],
                             [1, 1, 1 / np.sqrt(2), 1 / np.sqrt(1.01), 0],
                             atol=1e-6)


def test_background_unary_without_background_is_finite():
  rng = np.random.default_rng(0)
  features = jnp.asarray(rng.normal(size=(2, 3, 4, 5)), jnp.float32)
  # Image 0 fully covered; image 1 has a background column.
  boxes = jnp.asarray([[[0, 0, 4, 3]], [[0, 0, 3, 3]]], jnp.float32)
  labels = jnp.asarray([[1], [1]], jnp.int32)
  masks = R.class_box_masks(boxes, labels, 2, (3, 4))
  u0, no_bg = background_unary(features, masks[..., 0], ~masks[..., 0],
                               0.99)
  assert np.all(np.isfinite(u0))
  np.testing.assert_array_equal(u0[0], 0.0)
  np.testing.assert_array_equal(no_bg, [True, False])
  np.testing.assert_array_equal(u0[1, :, 3], 1.0)
  out = first_pass(features, jnp.asarray(rng.normal(size=(5, 2)), jnp.float32),
                   boxes, labels, (3, 4))
  assert np.all(np.isfinite(out['probs']))
  np.testing.assert_array_equal(out['no_background'], [True, False])


# ----------------------------------------------------------------------------
# Projection trick = naive mean of explicitly upsampled features
# ----------------------------------------------------------------------------
def _naive_means(features, weights):
  up = resize_bilinear(features, weights.shape[1:3], align_corners=True)
  w = jnp.asarray(weights, jnp.float32)
  sums = jnp.einsum('bhwk,bhwd->bkd', w, up,
                    precision=jax.lax.Precision.HIGHEST)
  return sums / jnp.maximum(jnp.sum(w, axis=(1, 2)), 1e-12)[..., None]


def test_background_query_and_prototypes_projection_equals_naive():
  rng = np.random.default_rng(2)
  features = jnp.asarray(rng.normal(size=(2, 5, 7, 6)), jnp.float32)
  labels = jnp.asarray(rng.integers(0, 4, size=(2, 33, 49)), jnp.int32)
  labels = labels.at[1].set(jnp.where(labels[1] == 3, 2, labels[1]))
  proto, present = B.class_prototypes(features, labels, 5, (33, 49))
  naive = _naive_means(features, jax.nn.one_hot(labels, 5))
  np.testing.assert_allclose(proto, naive, atol=1e-5)
  np.testing.assert_array_equal(present, [[1, 1, 1, 1, 0], [1, 1, 1, 0, 0]])
  np.testing.assert_array_equal(proto[1, 3:], 0.0)
  # Background query through the whole unary, no cut: upsample-maps mode.
  bg = jnp.asarray(rng.random((2, 33, 49)) < 0.3)
  u0, _ = background_unary(features, bg, ~bg, threshold=0.0)
  q = _naive_means(features, bg[..., None])
  a = resize_bilinear(R.cosine_scores(features, q), (33, 49),
                      align_corners=True)[..., 0]
  np.testing.assert_allclose(u0, jnp.where(bg, 1.0, a), atol=1e-5)


# ----------------------------------------------------------------------------
# Second pass (Eqs. 8-9)
# ----------------------------------------------------------------------------
KERNEL = jnp.asarray(np.stack([E1, E2, 5 * E3], axis=1))   # (D=3, C=3)


def test_second_pass_fallback_and_outside_boxes():
  # 1x5 image at full resolution: class-2 box cols 1-3, class-1 box cols
  # 2-3; cols 0 and 4 outside every box.  Class 2 is absent from Y_crf.
  boxes, labels = _boxes([(1, 0, 4, 1, 2), (2, 0, 4, 1, 1)])
  features = jnp.asarray(np.stack([E1, E3, E2, E2, E2])[None, None])
  y_crf = jnp.asarray([[[0, 0, 1, 1, 0]]], jnp.int32)
  # q_0 = mean(e1, e3, e2) (cos 0.577 with e2 and e3), q_1 = e2, and q_2 =
  # W[:, 2] / 5 = e3: col 1 -> 2 only through the classifier fallback (a zero
  # prototype would leave it to the background); cols 2-3 -> 1; col 4 looks
  # like class 1 but lies outside its box: background score 1 -> 0.
  y_ret = second_pass(features, KERNEL, y_crf, boxes, labels, (1, 5))
  assert y_ret.dtype == jnp.int32
  np.testing.assert_array_equal(y_ret, [[[0, 2, 1, 1, 0]]])
  scores = np.asarray(B.retrieval_scores(
      features, KERNEL, y_crf, boxes, labels, (1, 5),
      resolution='upsample_maps'))[0, 0]
  r = 1 / np.sqrt(3)
  np.testing.assert_allclose(scores, [[1, 0, 0], [r, 0, 1], [r, 1, 0],
                                      [r, 1, 0], [1, 0, 0]], atol=1e-6)


def test_second_pass_ties_go_to_lowest_index():
  # D = 4; both classes' boxes cover cols 1-4.  Y_crf gives q_0 = (e4 − e2)/3
  # and q_1 = mean(e2 − e3, e2 + e3) = e2 exactly; class 2 falls back to e3.
  e1, e2, e3, e4 = np.eye(4, dtype=np.float32)
  kernel = jnp.asarray(np.stack([e1, e2, 5 * e3], axis=1))
  boxes, labels = _boxes([(1, 0, 5, 1, 1), (1, 0, 5, 1, 2)])
  features = jnp.asarray(np.stack([e4, e2 - e3, e2 + e3, e4, -e2 - e4])[None,
                                                                        None])
  y_crf = jnp.asarray([[[0, 1, 1, 0, 0]]], jnp.int32)
  # col 2: class 1 and class 2 both score exactly 1/√2 -> 1 (lowest);
  # col 4: every score is 0 -> 0 (background, the lowest index).
  y_ret = second_pass(features, kernel, y_crf, boxes, labels, (1, 5))
  np.testing.assert_array_equal(y_ret, [[[0, 1, 1, 0, 0]]])


def test_second_pass_no_background_uses_classifier_direction():
  # Fully covered by a class-1 box; Y_crf has no background pixel.  q_1 =
  # mean(e1, e2, e2, e2); background falls back to W[:, 0] = e1.
  boxes, labels = _boxes([(0, 0, 4, 1, 1)])
  features = jnp.asarray(np.stack([E1, E2, E2, E2])[None, None])
  y_crf = jnp.ones((1, 1, 4), jnp.int32)
  first = first_pass(features, KERNEL[:, :2], boxes, labels, (1, 4))
  assert bool(first['no_background'][0])
  assert np.all(np.isfinite(first['probs']))
  y_ret = second_pass(features, KERNEL[:, :2], y_crf, boxes, labels, (1, 4))
  np.testing.assert_array_equal(y_ret, [[[0, 1, 1, 1]]])


# ----------------------------------------------------------------------------
# Both passes under jit, both resolutions
# ----------------------------------------------------------------------------
@pytest.mark.parametrize('resolution', ['upsample_maps', 'upsample_features'])
def test_passes_jit_both_resolutions(resolution):
  rng = np.random.default_rng(3)
  batch, (h, w), d, c, hw = 2, (5, 6), 8, 4, (33, 41)
  features = jnp.asarray(rng.normal(size=(batch, h, w, d)), jnp.float32)
  kernel = jnp.asarray(rng.normal(size=(d, c)), jnp.float32)
  boxes = jnp.asarray([[[2, 3, 20, 25], [10.5, 8, 30, 30], [0, 0, 0, 0]],
                       [[0, 0, 41, 33], [5, 5, 15, 15], [0, 0, 9, 9]]],
                      jnp.float32)
  labels = jnp.asarray([[1, 3, -1], [2, 2, -1]], jnp.int32)
  first = functools.partial(B.first_pass_jit, image_hw=hw,
                            resolution=resolution, threshold=0.99)
  out = first(features, kernel, boxes, labels, per='class')
  out_box = first(features, kernel, boxes, labels, per='box')
  probs = np.asarray(out['probs'])
  assert probs.shape == (batch, *hw, c)
  assert np.all(np.isfinite(probs))
  np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-5)
  np.testing.assert_array_equal(out['present'], [[1, 1, 0, 1], [1, 0, 1, 0]])
  np.testing.assert_array_equal(out['no_background'], [False, True])
  np.testing.assert_array_equal(probs[0][..., 2], 0.0)
  # Image 0 has one box per class: both normalisations agree there.
  np.testing.assert_allclose(out['cam'][0], out_box['cam'][0], atol=1e-6)
  y_crf = R.mask_marginals(np.asarray(out['probs']),
                           np.asarray(out['class_masks']))
  y_ret = B.second_pass_jit(features, kernel, jnp.asarray(y_crf), boxes,
                            labels, image_hw=hw, resolution=resolution)
  assert y_ret.shape == y_crf.shape == (batch, *hw)
  outside = np.asarray(out['class_masks'][..., 0])
  np.testing.assert_array_equal(np.asarray(y_ret)[outside], 0)
  np.testing.assert_array_equal(y_crf[outside], 0)
  assert set(np.unique(np.asarray(y_ret)[1])) <= {0, 2}
  with pytest.raises(ValueError, match='stage2_map_resolution'):
    B.first_pass(features, kernel, boxes, labels, hw, resolution='x',
                 per='class', threshold=0.99)
