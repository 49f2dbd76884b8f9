"""The one box-rasterisation rule shared by the methods (ops/boxes.py)."""

import numpy as np

from wsss_jax.ops import boxes as box_ops


def test_centre_membership_hand_computed():
  boxes = np.array([[[1, 0, 3, 2], [0, 0, 4, 4]]], np.float32)
  labels = np.array([[2, -1]])                     # second row is padding
  in_y, in_x = box_ops.centre_membership(boxes, labels, (4, 4))
  # Centres 0.5, 1.5, 2.5, 3.5: rows 0-1 in [0, 2), columns 1-2 in [1, 3).
  np.testing.assert_array_equal(in_y[0, 0], [True, True, False, False])
  np.testing.assert_array_equal(in_x[0, 0], [False, True, True, False])
  assert not np.any(in_y[0, 1]) and not np.any(in_x[0, 1])
  # A 4x4 grid over 8x8 pixels: centres 1, 3, 5, 7.
  in_y, in_x = box_ops.centre_membership(boxes, labels, (4, 4), (8, 8))
  np.testing.assert_array_equal(in_y[0, 0], [True, False, False, False])
  np.testing.assert_array_equal(in_x[0, 0], [True, False, False, False])


def test_a_box_between_centres_covers_nothing():
  boxes = np.array([[[1.6, 1.6, 2.4, 2.4]]], np.float32)
  in_y, in_x = box_ops.centre_membership(boxes, np.array([[1]]), (4, 4))
  assert not np.any(in_y) and not np.any(in_x)
