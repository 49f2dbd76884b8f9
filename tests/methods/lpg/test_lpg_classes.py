"""LPG class slots, box masks and generator inputs on hand-built cases."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from wsss_jax.methods.lpg import classes


def _labels(*rows):
  return jnp.asarray(rows, jnp.int32)


def test_class_slots_first_appearance_order_and_padding():
  labels = _labels([3, 1, 3, 2, -1])
  slot_classes, slot_valid = classes.class_slots(labels, 4)
  assert slot_classes.dtype == jnp.int32 and slot_valid.dtype == jnp.bool_
  np.testing.assert_array_equal(slot_classes, [[3, 1, 2, 0]])
  np.testing.assert_array_equal(slot_valid, [[True, True, True, False]])


def test_class_slots_truncates_to_the_first_m_classes():
  labels = _labels([3, 1, 3, 2, -1])
  slot_classes, slot_valid = classes.class_slots(labels, 2)
  np.testing.assert_array_equal(slot_classes, [[3, 1]])
  np.testing.assert_array_equal(slot_valid, [[True, True]])
  np.testing.assert_array_equal(classes.num_distinct_classes(labels), [3])


def test_class_slots_image_without_boxes_and_m_above_n():
  labels = _labels([-1, -1], [5, 5])
  slot_classes, slot_valid = classes.class_slots(labels, 3)
  np.testing.assert_array_equal(slot_classes, [[0, 0, 0], [5, 0, 0]])
  np.testing.assert_array_equal(slot_valid, [[False] * 3, [True, False, False]])
  np.testing.assert_array_equal(classes.num_distinct_classes(labels), [0, 1])


def test_class_slots_padding_rows_between_real_rows_are_skipped():
  slot_classes, slot_valid = classes.class_slots(_labels([-1, 4, -1, 2, 4]), 3)
  np.testing.assert_array_equal(slot_classes, [[4, 2, 0]])
  np.testing.assert_array_equal(slot_valid, [[True, True, False]])


def test_class_slots_rejects_zero_slots():
  with pytest.raises(ValueError, match='max_classes'):
    classes.class_slots(_labels([1]), 0)


def test_class_box_masks_union_and_half_open_edges():
  # 6×6 grid.  Class 1: [0, 0, 2, 2) and [3, 3, 6, 5) (x0, y0, x1, y1), plus a
  # fractional box of class 2: [1.4, 0.6, 2.6, 1.6): centres x = 1.5, 2.5 are
  # inside (1.4 <= c < 2.6), y = 0.5 is not (< 0.6), y = 1.5 is (< 1.6).
  boxes = jnp.asarray([[[0, 0, 2, 2], [3, 3, 6, 5], [1.4, 0.6, 2.6, 1.6],
                        [0, 0, 6, 6]]], jnp.float32)
  labels = _labels([1, 1, 2, -1])
  slot_classes, slot_valid = classes.class_slots(labels, 3)
  masks = classes.class_box_masks(boxes, labels, slot_classes, slot_valid, 6, 6)
  assert masks.shape == (1, 3, 6, 6) and masks.dtype == jnp.bool_
  expect_1 = np.zeros((6, 6), bool)
  expect_1[0:2, 0:2] = True      # rows y0..y1-1, columns x0..x1-1
  expect_1[3:5, 3:6] = True
  expect_2 = np.zeros((6, 6), bool)
  expect_2[1, 1:3] = True        # y-centre 1.5 < 1.6; x-centres 1.5, 2.5
  np.testing.assert_array_equal(masks[0, 0], expect_1)
  np.testing.assert_array_equal(masks[0, 1], expect_2)
  # The padding row covering everything (label -1) and the invalid slot.
  np.testing.assert_array_equal(masks[0, 2], np.zeros((6, 6), bool))


def test_class_box_masks_edge_exactly_at_pixel_centre():
  # x1 = 2.5: centre 2.5 is NOT inside (half-open); x0 = 0.5: centre 0.5 is.
  boxes = jnp.asarray([[[0.5, 0.0, 2.5, 1.0]]], jnp.float32)
  labels = _labels([7])
  slot_classes, slot_valid = classes.class_slots(labels, 1)
  masks = classes.class_box_masks(boxes, labels, slot_classes, slot_valid, 2, 4)
  np.testing.assert_array_equal(masks[0, 0], [[True, True, False, False],
                                              [False, False, False, False]])


def test_gather_class_probs_picks_each_slots_channel():
  # probs[..., k] = 10·k + pixel index, so every channel is recognisable.
  pixel = np.arange(4, dtype=np.float32).reshape(1, 2, 2, 1)
  probs = jnp.asarray(pixel + 10.0 * np.arange(4, dtype=np.float32))
  got = classes.gather_class_probs(probs, _labels([3, 1, 0]))
  assert got.shape == (1, 3, 2, 2)
  np.testing.assert_array_equal(got[0, 0], pixel[0, ..., 0] + 30)
  np.testing.assert_array_equal(got[0, 1], pixel[0, ..., 0] + 10)
  np.testing.assert_array_equal(got[0, 2], pixel[0, ..., 0])


def test_lpg_inputs_channel_order_and_shapes():
  batch, slots, h, w = 2, 3, 4, 5
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.normal(size=(batch, h, w, 3)), jnp.float32)
  probs = jnp.asarray(rng.uniform(size=(batch, slots, h, w)), jnp.float32)
  masks = jnp.asarray(rng.uniform(size=(batch, slots, h, w)) > 0.5)
  full = classes.lpg_inputs(images, probs, masks)
  assert full.shape == (batch * slots, h, w, 5) and full.dtype == jnp.float32
  box_only = classes.lpg_inputs(images, None, masks)
  assert box_only.shape == (batch * slots, h, w, 4)
  for b in range(batch):
    for m in range(slots):
      row = b * slots + m
      np.testing.assert_array_equal(full[row, ..., 0], probs[b, m])
      np.testing.assert_array_equal(full[row, ..., 1], masks[b, m])
      np.testing.assert_array_equal(full[row, ..., 2:], images[b])
      np.testing.assert_array_equal(box_only[row, ..., 0], masks[b, m])
      np.testing.assert_array_equal(box_only[row, ..., 1:], images[b])


def test_lpg_inputs_rejects_mismatched_shapes():
  images = jnp.zeros((1, 4, 4, 3))
  with pytest.raises(ValueError, match='box_masks'):
    classes.lpg_inputs(images, None, jnp.zeros((1, 2, 4, 5), bool))
  with pytest.raises(ValueError, match='class_probs'):
    classes.lpg_inputs(images, jnp.zeros((1, 3, 4, 4)),
                       jnp.zeros((1, 2, 4, 4), bool))


def test_class_functions_under_jit():
  boxes = jnp.asarray([[[0, 0, 2, 2], [1, 1, 3, 3], [0, 0, 0, 0]]],
                      jnp.float32)
  labels = _labels([2, 5, -1])

  @jax.jit
  def run(boxes, labels):
    slot_classes, slot_valid = classes.class_slots(labels, 3)
    masks = classes.class_box_masks(boxes, labels, slot_classes, slot_valid,
                                    4, 4)
    return slot_classes, slot_valid, masks

  slot_classes, slot_valid, masks = run(boxes, labels)
  np.testing.assert_array_equal(slot_classes, [[2, 5, 0]])
  np.testing.assert_array_equal(slot_valid, [[True, True, False]])
  assert int(masks[0, 0].sum()) == 4 and int(masks[0, 1].sum()) == 4
  assert not bool(masks[0, 2].any())
