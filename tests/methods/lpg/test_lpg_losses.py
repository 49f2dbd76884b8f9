"""LPG E-step targets and loss, checked by hand."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from wsss_jax.methods.lpg import losses


def test_quarter_labels_samples_top_left_not_centres():
  # Value = 100·row + column, so the sampled rows/columns can be read back.
  grid = (100 * np.arange(12)[:, None] + np.arange(12)[None, :]).astype(
      np.int32)
  got = np.asarray(losses.quarter_labels(jnp.asarray(grid[None])))
  assert got.shape == (1, 3, 3)
  expected_rows = np.array([0, 4, 8])
  np.testing.assert_array_equal(
      got[0], 100 * expected_rows[:, None] + expected_rows[None, :])
  # Centre sampling would pick rows/columns 2, 6, 10.
  centres = jax.image.resize(jnp.asarray(grid[None], jnp.float32), (1, 3, 3),
                             'nearest')
  assert not np.array_equal(np.asarray(centres, np.int32), got)


def test_quarter_labels_leading_dims_and_partial_cells():
  labels = jnp.zeros((2, 3, 8, 4), jnp.uint8)
  assert losses.quarter_labels(labels).shape == (2, 3, 2, 1)
  # 6 × 9: ceil -> 2 × 3, sampled at rows 0, 4 and columns 0, 4, 8.
  grid = (100 * np.arange(6)[:, None] + np.arange(9)[None, :]).astype(np.int32)
  got = losses.quarter_labels(jnp.asarray(grid[None]))
  np.testing.assert_array_equal(got[0], [[0, 4, 8], [400, 404, 408]])


# One image, 1×4 pixels: mask [0, 2, 255, 2]; the last pixel is crop padding
# (the batch mask is 255 there too, as in the data pipeline, but the test
# gives it 2 to show that `valid` alone decides).
MASK = jnp.asarray([[[0, 2, 255, 2]]], jnp.uint8)
VALID = jnp.asarray([[[True, True, True, False]]])
SLOT_CLASSES = jnp.asarray([[2, 1, 0]], jnp.int32)
SLOT_VALID = jnp.asarray([[True, True, False]])


def test_binary_targets_padding_ignored_by_default():
  got = losses.binary_targets(MASK, VALID, SLOT_CLASSES, SLOT_VALID)
  assert got.dtype == jnp.uint8 and got.shape == (1, 3, 1, 4)
  np.testing.assert_array_equal(got[0, 0, 0], [0, 1, 255, 255])
  np.testing.assert_array_equal(got[0, 1, 0], [0, 0, 255, 255])
  np.testing.assert_array_equal(got[0, 2, 0], [255] * 4)     # invalid slot


def test_binary_targets_padding_as_background_reproduces_the_code():
  got = losses.binary_targets(MASK, VALID, SLOT_CLASSES, SLOT_VALID,
                              padding_as_background=True)
  np.testing.assert_array_equal(got[0, 0, 0], [0, 1, 255, 0])
  np.testing.assert_array_equal(got[0, 1, 0], [0, 0, 255, 0])
  np.testing.assert_array_equal(got[0, 2, 0], [255] * 4)


def test_e_step_loss_hand_value():
  # logits [0, log 3]: p_fg = 3/4.  fg pixel: log(4/3); bg pixel: log 4;
  # the ignored pixel does not count.  Mean of the two = (log(4/3)+log 4)/2.
  row = [0.0, math.log(3.0)]
  logits = jnp.asarray([[[row, row, row]]], jnp.float32)     # (1, 1, 3, 2)
  targets = jnp.asarray([[[1, 0, 255]]], jnp.uint8)
  got = float(losses.e_step_loss(logits, targets))
  assert got == pytest.approx((math.log(4 / 3) + math.log(4)) / 2, rel=1e-6)
  only_fg = jnp.asarray([[[1, 255, 255]]], jnp.uint8)
  assert float(losses.e_step_loss(logits, only_fg)) == pytest.approx(
      math.log(4 / 3), rel=1e-6)


def test_e_step_loss_pools_all_pixels_of_the_batch():
  # Slot 0 has 1 counted pixel (loss log 4), slot 1 has 3 (log(4/3) each):
  # a per-slot mean would give (log 4 + log(4/3)) / 2; the batch mean is
  # (log 4 + 3 log(4/3)) / 4.
  row = [0.0, math.log(3.0)]
  logits = jnp.asarray([[[row] * 3], [[row] * 3]], jnp.float32)
  targets = jnp.asarray([[[0, 255, 255]], [[1, 1, 1]]], jnp.uint8)
  got = float(losses.e_step_loss(logits, targets))
  assert got == pytest.approx((math.log(4) + 3 * math.log(4 / 3)) / 4,
                              rel=1e-6)


def test_e_step_loss_invalid_slots_do_not_count():
  # Targets built by binary_targets: the invalid slot is all 255, so huge
  # logits on its row change nothing.
  mask = jnp.asarray([[[1, 0, 1, 0]]], jnp.uint8)
  valid = jnp.ones((1, 1, 4), bool)
  targets = losses.binary_targets(mask, valid, jnp.asarray([[1, 0]]),
                                  jnp.asarray([[True, False]]))
  targets = targets.reshape((2, 1, 4))
  row = [0.0, math.log(3.0)]
  base = jnp.asarray([[[row] * 4], [[row] * 4]], jnp.float32)
  wild = base.at[1].set(jnp.asarray([50.0, -50.0]))
  expected = (math.log(4 / 3) + math.log(4)) / 2
  assert float(losses.e_step_loss(base, targets)) == pytest.approx(
      expected, rel=1e-6)
  assert float(losses.e_step_loss(wild, targets)) == pytest.approx(
      expected, rel=1e-6)


def test_e_step_loss_all_ignored_is_zero_with_finite_gradient():
  logits = jnp.asarray(np.random.default_rng(0).normal(size=(2, 2, 2, 2)),
                       jnp.float32)
  targets = jnp.full((2, 2, 2), 255, jnp.uint8)
  value, grad = jax.value_and_grad(losses.e_step_loss)(logits, targets)
  assert float(value) == 0.0
  assert np.all(np.isfinite(np.asarray(grad)))
  np.testing.assert_array_equal(grad, np.zeros_like(grad))


def test_e_step_loss_rejects_bad_shapes():
  with pytest.raises(ValueError, match='e_step_loss'):
    losses.e_step_loss(jnp.zeros((1, 2, 2, 3)), jnp.zeros((1, 2, 2), jnp.uint8))
  with pytest.raises(ValueError, match='e_step_loss'):
    losses.e_step_loss(jnp.zeros((1, 2, 2, 2)), jnp.zeros((1, 2, 3), jnp.uint8))
