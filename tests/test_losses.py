"""Shared loss blocks: hand-computed values, empty regions, gradients."""

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings, strategies as st

from wsss_jax import losses


def test_cross_entropy_hand_computed():
  # Two pixels, 3 classes. Pixel 0: logits (0, log 2, 0), label 1 ->
  # p = 2/4 -> loss log 2. Pixel 1: label 255 (ignored).
  logits = jnp.asarray([[0.0, np.log(2.0), 0.0], [5.0, 0.0, 0.0]])
  labels = jnp.asarray([1, 255])
  loss, valid = losses.softmax_cross_entropy(logits, labels)
  np.testing.assert_allclose(loss, [np.log(2.0), 0.0], rtol=1e-6)
  np.testing.assert_array_equal(valid, [True, False])


def test_out_of_range_labels_are_ignored():
  logits = jnp.zeros((3, 4))
  loss, valid = losses.softmax_cross_entropy(logits, jnp.asarray([-1, 4, 3]))
  np.testing.assert_array_equal(valid, [False, False, True])
  np.testing.assert_allclose(loss[2], np.log(4.0), rtol=1e-6)


def test_segmentation_ce_mean_over_valid_pixels():
  logits = jnp.zeros((1, 2, 2, 2)).at[0, 0, 0, 1].set(np.log(3.0))
  labels = jnp.asarray([[[1, 0], [255, 255]]], jnp.int32)
  # pixel (0,0): p(1) = 3/4; pixel (0,1): p(0) = 1/2.
  expected = (-np.log(0.75) - np.log(0.5)) / 2
  np.testing.assert_allclose(
      losses.segmentation_cross_entropy(logits, labels), expected, rtol=1e-6)


def test_all_ignored_gives_zero_loss_and_zero_gradient():
  logits = jnp.ones((2, 4, 4, 3))
  labels = jnp.full((2, 4, 4), 255, jnp.int32)
  loss, grad = jax.value_and_grad(
      lambda x: losses.segmentation_cross_entropy(x, labels))(logits)
  assert float(loss) == 0.0
  assert np.all(np.asarray(grad) == 0.0)


def test_nearest_label_resize_uses_pixel_centres():
  # 321 -> 41 picks rows 3, 11, 19, ..., 317 (PIL NEAREST, jax_conventions §3.3).
  labels = jnp.broadcast_to(jnp.arange(321)[None, :, None], (1, 321, 321))
  out = losses.resize_labels_nearest(labels, 41, 41)
  expected = np.floor((np.arange(41) + 0.5) * 321 / 41).astype(int)
  np.testing.assert_array_equal(out[0, :, 0], expected)
  assert (expected[0], expected[1], expected[2], expected[-1]) == (3, 11, 19, 317)
  # 16 -> 4 picks 2, 6, 10, 14.
  small = jnp.broadcast_to(jnp.arange(16)[None, None, :], (1, 16, 16))
  np.testing.assert_array_equal(
      losses.resize_labels_nearest(small, 4, 4)[0, 0], [2, 6, 10, 14])


def test_safe_mean_empty_is_zero():
  assert float(losses.safe_mean(jnp.ones(3), jnp.zeros(3))) == 0.0
  np.testing.assert_allclose(
      losses.safe_mean(jnp.asarray([1.0, 3.0]), jnp.asarray([1.0, 1.0])), 2.0)


# Jitted once: one compilation per drawn shape instead of one per operation.
_ce_value_and_grad = jax.jit(jax.value_and_grad(
    losses.segmentation_cross_entropy))


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 3), st.integers(1, 6), st.integers(2, 5),
       st.floats(0.0, 1.0), st.integers(0, 2**31 - 1))
def test_cross_entropy_finite_on_random_and_degenerate_inputs(
    batch, size, classes, ignore_fraction, seed):
  rng = np.random.default_rng(seed)
  logits = rng.normal(0, 50, (batch, size, size, classes)).astype(np.float32)
  labels = rng.integers(0, classes, (batch, 2 * size, 2 * size))
  labels[rng.random(labels.shape) < ignore_fraction] = 255
  loss, grad = _ce_value_and_grad(jnp.asarray(logits), jnp.asarray(labels))
  assert np.isfinite(float(loss))
  assert np.all(np.isfinite(np.asarray(grad)))
