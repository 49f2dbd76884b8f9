"""wsss_jax.pseudo.regions: hand-computed cases, empty inputs, gradients."""

import jax
import jax.numpy as jnp
import numpy as np

from wsss_jax.ops.resize import resize_bilinear
from wsss_jax.pseudo import regions as R


def _boxes(rows):
  """(1, N, 4) float boxes and (1, N) labels from [(x0, y0, x1, y1, label)]."""
  array = np.asarray(rows, np.float32).reshape(1, -1, 5)
  return jnp.asarray(array[..., :4]), jnp.asarray(array[..., 4], jnp.int32)


# ----------------------------------------------------------------------------
# Boxes
# ----------------------------------------------------------------------------
def test_box_coverage_by_hand():
  # 2x4 image (pixel centres at x = 0.5 .. 3.5, y = 0.5, 1.5).  Box 0 covers
  # cols 1-2 of row 1; box 1 ([0.6, 1.4) in x) holds no pixel centre; box 2
  # is padding and would cover everything.
  boxes, labels = _boxes([(1, 1, 3, 2, 2), (0.6, 0, 1.4, 2, 1),
                          (0, 0, 4, 2, -1)])
  cover = np.asarray(R.box_coverage(boxes, labels, (2, 4)))
  assert cover.shape == (1, 3, 2, 4) and cover.dtype == bool
  np.testing.assert_array_equal(cover[0, 0], [[0, 0, 0, 0], [0, 1, 1, 0]])
  np.testing.assert_array_equal(cover[0, 1], np.zeros((2, 4), bool))
  np.testing.assert_array_equal(cover[0, 2], np.zeros((2, 4), bool))


def test_class_box_masks_by_hand():
  # 3x6 image; class 1 covers cols 0-2 rows 0-1, class 2 cols 2-4 rows 1-2
  # (overlap at row 1, col 2); a padded row covering everything is ignored;
  # a float box [0.6, 1.6) covers only col 1 (centre 0.5 is left of 0.6).
  boxes, labels = _boxes([(0, 0, 3, 2, 1), (2, 1, 5, 3, 2),
                          (0, 0, 6, 3, -1), (0.6, 2, 1.6, 3, 1)])
  masks = np.asarray(R.class_box_masks(boxes, labels, 4, (3, 6)))[0]
  c1 = np.array([[1, 1, 1, 0, 0, 0],
                 [1, 1, 1, 0, 0, 0],
                 [0, 1, 0, 0, 0, 0]], bool)
  c2 = np.array([[0, 0, 0, 0, 0, 0],
                 [0, 0, 1, 1, 1, 0],
                 [0, 0, 1, 1, 1, 0]], bool)
  np.testing.assert_array_equal(masks[..., 1], c1)
  np.testing.assert_array_equal(masks[..., 2], c2)
  np.testing.assert_array_equal(masks[..., 3], np.zeros((3, 6), bool))
  np.testing.assert_array_equal(masks[..., 0], ~(c1 | c2))
  np.testing.assert_array_equal(
      R.present_classes(labels, 4), [[True, True, True, False]])


def test_no_boxes_is_all_background():
  boxes = jnp.zeros((1, 2, 4), jnp.float32)
  labels = jnp.full((1, 2), -1, jnp.int32)
  masks = np.asarray(R.class_box_masks(boxes, labels, 3, (2, 3)))
  np.testing.assert_array_equal(masks[..., 0], True)
  np.testing.assert_array_equal(masks[..., 1:], False)
  np.testing.assert_array_equal(R.present_classes(labels, 3),
                                [[True, False, False]])


# ----------------------------------------------------------------------------
# AC-True matrix and masked means
# ----------------------------------------------------------------------------
def test_ac_true_matrix_by_hand():
  # 2 -> 3: the middle output sits halfway; 3 -> 5: outputs at 0, .5, 1, 1.5,
  # 2 in input coordinates.  Equal sizes: identity.
  np.testing.assert_allclose(R.ac_true_matrix(3, 2),
                             [[1, 0], [0.5, 0.5], [0, 1]])
  np.testing.assert_allclose(R.ac_true_matrix(5, 3),
                             [[1, 0, 0], [0.5, 0.5, 0], [0, 1, 0],
                              [0, 0.5, 0.5], [0, 0, 1]])
  np.testing.assert_array_equal(R.ac_true_matrix(4, 4), np.eye(4))


def test_ac_true_matrix_matches_resize():
  x = jnp.asarray(np.random.default_rng(1).normal(size=(1, 5, 7, 1)),
                  jnp.float32)
  up = resize_bilinear(x, (33, 49), align_corners=True)
  mine = jnp.einsum('Hh,hw,Ww->HW', R.ac_true_matrix(33, 5), x[0, ..., 0],
                    R.ac_true_matrix(49, 7))
  np.testing.assert_allclose(mine, up[0, ..., 0], atol=1e-5)


# Features (1, 1, 2, 2): f = [2, 0], [0, 4]; AC-True upsampled to width 3:
# [2, 0], [1, 2], [0, 4].  Three masks over the 1x3 image: k0 = [1, 1, 0],
# k1 = empty, k2 = weights [0.5, 0, 1].
_F_LOW = np.asarray([[[[2, 0], [0, 4]]]], np.float32)
_F_UP = np.asarray([[[[2, 0], [1, 2], [0, 4]]]], np.float32)
_MASKS = np.asarray([[[[1, 0, 0.5], [1, 0, 0], [0, 0, 1]]]], np.float32)


def test_masked_feature_sums_and_means_by_hand():
  for features in (_F_LOW, _F_UP):       # upsampled or already full-size
    sums, counts = R.masked_feature_sums(features, _MASKS)
    # k0: [2,0] + [1,2]; k1: 0; k2: 0.5·[2,0] + [0,4].
    np.testing.assert_allclose(sums[0], [[3, 2], [0, 0], [1, 4]], atol=1e-6)
    np.testing.assert_allclose(counts[0], [2, 0, 1.5])
    means, found = R.masked_feature_means(features, _MASKS)
    np.testing.assert_allclose(means[0], [[1.5, 1], [0, 0],
                                          [2 / 3, 8 / 3]], atol=1e-6)
    np.testing.assert_array_equal(found, [[True, False, True]])
  # Bool masks are accepted.
  means, _ = R.masked_feature_means(_F_LOW, _MASKS[..., :1] > 0)
  np.testing.assert_allclose(means[0], [[1.5, 1]], atol=1e-6)


def test_masked_feature_means_empty_mask_gradient_is_finite():
  empty = jnp.zeros((1, 1, 3, 1), jnp.float32)
  grad = jax.grad(lambda f: jnp.sum(R.masked_feature_means(f, empty)[0]))(
      jnp.asarray(_F_LOW))
  np.testing.assert_array_equal(grad, 0.0)
  grad = jax.grad(lambda f: jnp.sum(R.masked_feature_means(f, _MASKS)[0]))(
      jnp.asarray(_F_LOW))
  assert np.all(np.isfinite(grad))


# ----------------------------------------------------------------------------
# Cosine scores
# ----------------------------------------------------------------------------
def test_cosine_scores_by_hand():
  e1, e2 = np.eye(2, dtype=np.float32)
  features = jnp.asarray(np.stack([e1, e1 + e2, -e1, 0 * e1])[None, None])
  queries = jnp.asarray(np.stack([3 * e1, 0 * e1])[None])    # (1, 2, 2)
  scores = np.asarray(R.cosine_scores(features, queries))
  assert scores.shape == (1, 1, 4, 2)
  # cos with e1: 1, 1/√2, −1 -> ReLU 0, zero feature -> 0; zero query -> 0.
  np.testing.assert_allclose(scores[0, 0, :, 0], [1, 1 / np.sqrt(2), 0, 0],
                             atol=1e-6)
  np.testing.assert_array_equal(scores[..., 1], 0.0)
  grads = jax.grad(lambda f, q: jnp.sum(R.cosine_scores(f, q)),
                   argnums=(0, 1))(features, queries)
  assert all(np.all(np.isfinite(g)) for g in grads)


# ----------------------------------------------------------------------------
# CRF input probabilities
# ----------------------------------------------------------------------------
def test_unary_probabilities_by_hand():
  u = jnp.asarray([[[[0.0, 1.0, 0.7], [0.5, 0.5, 1.0], [0.2, 0.9, 0.9]]]])
  present = jnp.asarray([[True, True, False]])
  inside = jnp.asarray([[[True, True, False]]])
  p = np.asarray(R.unary_probabilities(u, present, inside))
  # e/(1 + e) = 0.731059 for a logit difference of 1.
  np.testing.assert_allclose(p[0, 0, 0], [0.268941, 0.731059, 0.0],
                             atol=1e-6)
  np.testing.assert_allclose(p[0, 0, 1], [0.5, 0.5, 0.0], atol=1e-7)
  np.testing.assert_array_equal(p[0, 0, 2], [1.0, 0.0, 0.0])
  np.testing.assert_array_equal(p[..., 2], 0.0)           # absent: exactly 0
  np.testing.assert_allclose(p.sum(-1), 1.0, atol=1e-6)
  # Gradient through the masked softmax: finite, 0 for the absent class and
  # outside boxes; d p_1 / d u_1 = p_0·p_1 = 0.25 at equal logits.
  grad = np.asarray(jax.grad(lambda v: jnp.sum(
      R.unary_probabilities(v, present, inside)[..., 1]))(u))
  assert np.all(np.isfinite(grad))
  np.testing.assert_allclose(grad[0, 0, 1], [-0.25, 0.25, 0.0], atol=1e-7)
  np.testing.assert_array_equal(grad[0, 0, 2], 0.0)


# ----------------------------------------------------------------------------
# After the CRF
# ----------------------------------------------------------------------------
def test_mask_marginals_and_agreement():
  boxes, labels = _boxes([(0, 0, 2, 1, 1), (1, 0, 3, 1, 2)])
  masks = R.class_box_masks(boxes, labels, 3, (1, 4))
  q = np.asarray([[[[0.1, 0.2, 0.7],      # class 2 outside its box -> 1
                    [0.1, 0.3, 0.6],      # both boxes -> 2
                    [0.3, 0.6, 0.1],      # class 1 outside its box -> 0
                    [0.2, 0.5, 0.3]]]], np.float32)   # outside -> 0
  y = R.mask_marginals(q, np.asarray(masks))
  assert isinstance(y, np.ndarray) and y.dtype == np.int32
  np.testing.assert_array_equal(y, [[[1, 2, 0, 0]]])
  np.testing.assert_array_equal(R.mask_marginals(jnp.asarray(q), masks), y)
  same, fused = R.agreement(y, np.asarray([[[1, 1, 0, 2]]], np.int32))
  np.testing.assert_array_equal(same, [[[True, False, True, False]]])
  np.testing.assert_array_equal(fused, [[[1, 255, 0, 255]]])


def test_mask_marginals_ties_go_to_lowest_index():
  # One class-1 box over both pixels; pixel 0 ties 0/1, pixel 1 ties 1/2 with
  # class 2 outside its (absent) box -> 1.
  boxes, labels = _boxes([(0, 0, 2, 1, 1)])
  masks = np.asarray(R.class_box_masks(boxes, labels, 3, (1, 2)))
  q = np.asarray([[[[0.5, 0.5, 0.0], [0.0, 0.5, 0.5]]]], np.float32)
  np.testing.assert_array_equal(R.mask_marginals(q, masks), [[[0, 1]]])


def test_agreement_jax_keeps_dtype():
  a = jnp.asarray([[[3, 0, 255]]], jnp.uint8)
  b = jnp.asarray([[[3, 1, 255]]], jnp.uint8)
  same, fused = R.agreement(a, b)
  assert isinstance(fused, jax.Array) and fused.dtype == jnp.uint8
  np.testing.assert_array_equal(same, [[[True, False, True]]])
  np.testing.assert_array_equal(fused, [[[3, 255, 255]]])
