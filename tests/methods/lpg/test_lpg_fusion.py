"""LPG per-class predictions and their fusion (Eq. 7, supplement A) on
hand-built overlaps, plus the whole pure pipeline under jax.jit."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from wsss_jax.methods.lpg import classes, fusion, losses


def _preds(*masks):
  """(1, M, H, W) bool from per-slot (H, W) 0/1 lists."""
  return jnp.asarray(np.asarray(masks, bool)[None])


def _row_mask(width, start, stop):
  row = np.zeros((1, width), bool)
  row[0, start:stop] = True
  return row


def _both(preds, slot_classes, slot_valid):
  slot_classes = jnp.asarray([slot_classes], jnp.int32)
  slot_valid = jnp.asarray([slot_valid])
  return (np.asarray(fusion.fuse('overlap_rate', preds, slot_classes,
                                 slot_valid)),
          np.asarray(fusion.fuse('first_come', preds, slot_classes,
                                 slot_valid)))


def test_two_classes_overlap_goes_to_the_smaller_prediction():
  # Class 1 (slot 0): rows 0-3 × cols 0-3, 16 px.  Class 2 (slot 1): rows 1-2
  # × cols 3-4, 4 px.  Overlap rows 1-2 × col 3 (2 px): rates 2/16 < 2/4.
  big = np.zeros((4, 6), bool)
  big[0:4, 0:4] = True
  small = np.zeros((4, 6), bool)
  small[1:3, 3:5] = True
  overlap_rate, first_come = _both(_preds(big, small), [1, 2], [True, True])
  assert overlap_rate.dtype == np.uint8 and overlap_rate.shape == (1, 4, 6)
  expected = np.zeros((4, 6), np.uint8)
  expected[big] = 1
  expected[small] = 2
  np.testing.assert_array_equal(overlap_rate[0], expected)
  # The official rule: slot 0 came first and keeps the overlap.
  expected[1:3, 3] = 1
  np.testing.assert_array_equal(first_come[0], expected)


def test_three_classes_each_candidate_set_resolved_by_smallest_area():
  # 1×10 image.  Slots: class 5 cols 0-5 (area 6), class 2 cols 2-9 (area 8),
  # class 7 cols 4-6 (area 3).
  #   cols 0-1 {5} -> 5;   cols 2-3 {5, 2}: rates 2/6 > 2/8 -> 5;
  #   cols 4-5 {5, 2, 7}: 2/6, 2/8, 2/3 -> 7;   col 6 {2, 7}: 1/8 < 1/3 -> 7;
  #   cols 7-9 {2} -> 2.
  preds = _preds(_row_mask(10, 0, 6), _row_mask(10, 2, 10),
                 _row_mask(10, 4, 7))
  overlap_rate, first_come = _both(preds, [5, 2, 7], [True] * 3)
  np.testing.assert_array_equal(overlap_rate[0, 0],
                                [5, 5, 5, 5, 7, 7, 7, 2, 2, 2])
  np.testing.assert_array_equal(first_come[0, 0],
                                [5, 5, 5, 5, 5, 5, 2, 2, 2, 2])


def test_equal_areas_tie_goes_to_the_lower_class_id_not_the_slot():
  # Class 4 (slot 0) cols 0-2, class 3 (slot 1) cols 2-4: both 3 px.
  preds = _preds(_row_mask(6, 0, 3), _row_mask(6, 2, 5))
  overlap_rate, first_come = _both(preds, [4, 3], [True, True])
  np.testing.assert_array_equal(overlap_rate[0, 0], [4, 4, 3, 3, 3, 0])
  np.testing.assert_array_equal(first_come[0, 0], [4, 4, 4, 3, 3, 0])


def test_invalid_slots_never_label_even_if_their_preds_are_true():
  # Slot 1 is padding (class 0, invalid) but claims everything, and is the
  # smallest: it must neither label nor steal the overlap.
  preds = _preds(_row_mask(4, 0, 3), _row_mask(4, 1, 2))
  overlap_rate, first_come = _both(preds, [6, 0], [True, False])
  np.testing.assert_array_equal(overlap_rate[0, 0], [6, 6, 6, 0])
  np.testing.assert_array_equal(first_come[0, 0], [6, 6, 6, 0])


def test_unknown_fusion_names_the_config_key():
  preds = _preds(_row_mask(2, 0, 1))
  with pytest.raises(ValueError, match=r'lpg\.fusion'):
    fusion.fuse('max_area', preds, jnp.asarray([[1]]), jnp.asarray([[True]]))


def test_class_predictions_clip_to_the_box_and_drop_invalid_slots():
  # Slot 0: g says fg everywhere, its box covers cols 1-2 only.
  # Slot 1: invalid, g says fg everywhere, box everywhere.
  # Slot 2: exact tie of the two logits -> background (argmax picks 0).
  logits = np.zeros((1, 3, 1, 4, 2), np.float32)
  logits[0, 0, ..., 1] = 5.0
  logits[0, 1, ..., 1] = 5.0
  box = np.zeros((1, 3, 1, 4), bool)
  box[0, 0, 0, 1:3] = True
  box[0, 1:] = True
  preds = fusion.class_predictions(jnp.asarray(logits), jnp.asarray(box),
                                   jnp.asarray([[True, False, True]]))
  assert preds.dtype == jnp.bool_
  np.testing.assert_array_equal(preds[0, 0, 0], [False, True, True, False])
  assert not bool(preds[0, 1:].any())
  fused = fusion.fuse('overlap_rate', preds, jnp.asarray([[9, 0, 4]]),
                      jnp.asarray([[True, False, True]]))
  np.testing.assert_array_equal(fused[0, 0], [0, 9, 9, 0])


def test_whole_pure_pipeline_under_jit_matches_eager():
  # One 8×8 image, boxes of classes 2, 1, 2 and one padding row; M = 3.
  rng = np.random.default_rng(1)
  batch = {
      'image': jnp.asarray(rng.integers(0, 256, (1, 8, 8, 3)), jnp.uint8),
      'boxes': jnp.asarray([[[0, 0, 4, 4], [2, 2, 8, 6], [4, 4, 8, 8],
                             [0, 0, 0, 0]]], jnp.float32),
      'box_labels': jnp.asarray([[2, 1, 2, -1]], jnp.int32),
      'mask': jnp.asarray(rng.integers(0, 3, (1, 8, 8)), jnp.uint8),
      'valid': jnp.ones((1, 8, 8), bool).at[:, :, 6:].set(False),
  }
  probs = jax.nn.softmax(
      jnp.asarray(rng.normal(size=(1, 8, 8, 3)), jnp.float32), axis=-1)

  def run(batch, probs, *, with_probs):
    slot_classes, slot_valid = classes.class_slots(batch['box_labels'], 3)
    box_masks = classes.class_box_masks(batch['boxes'], batch['box_labels'],
                                        slot_classes, slot_valid, 8, 8)
    class_probs = (classes.gather_class_probs(probs, slot_classes)
                   if with_probs else None)
    images = batch['image'].astype(jnp.float32) / 255.0
    inputs = classes.lpg_inputs(images, class_probs, box_masks)
    # A stand-in for g: fg logit = the box channel at 1/4 resolution, minus
    # a pixel-dependent offset so that some fg is predicted outside boxes.
    box_channel = inputs[..., 1 if with_probs else 0]
    fg = losses.quarter_labels(box_channel) + inputs[:, ::4, ::4, -1] - 0.5
    logits = jnp.stack([jnp.zeros_like(fg), fg], axis=-1)    # (B·M, 2, 2, 2)
    targets = losses.binary_targets(batch['mask'], batch['valid'],
                                    slot_classes, slot_valid)
    targets = losses.quarter_labels(targets).reshape(logits.shape[:-1])
    loss = losses.e_step_loss(logits, targets)
    full_logits = jnp.repeat(jnp.repeat(logits, 4, axis=1), 4, axis=2)
    preds = fusion.class_predictions(full_logits.reshape((1, 3, 8, 8, 2)),
                                     box_masks, slot_valid)
    return (slot_classes, loss,
            fusion.fuse('overlap_rate', preds, slot_classes, slot_valid),
            fusion.fuse('first_come', preds, slot_classes, slot_valid))

  for with_probs in (True, False):
    fn = functools.partial(run, with_probs=with_probs)
    eager = fn(batch, probs)
    jitted = jax.jit(fn)(batch, probs)
    np.testing.assert_array_equal(eager[0], [[2, 1, 0]])
    assert np.isfinite(float(jitted[1]))
    assert float(jitted[1]) == pytest.approx(float(eager[1]), rel=1e-6)
    for got, want in zip(jitted[2:], eager[2:]):
      assert got.dtype == jnp.uint8
      np.testing.assert_array_equal(got, want)
      # Only background and the two box classes can appear.
      assert set(np.unique(np.asarray(got))) <= {0, 1, 2}
