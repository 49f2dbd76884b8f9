"""Box + DenseCRF pseudo-masks (`host.box_crf`): the prior by hand, and a
CRF that snaps a loose box to the object inside it."""

import numpy as np
import pytest

from wsss_jax.host import box_crf
from wsss_jax.host.crf import CrfParams


def test_box_prior_by_hand():
  boxes = np.array([[0, 0, 2, 2], [1, 1, 3, 3], [0, 0, 0, 0]], np.float32)
  labels = np.array([4, 2, -1])
  probs, classes = box_crf.box_prior(boxes, labels, 3, 4, confidence=0.6)
  assert list(classes) == [2, 4]
  # Pixel (1, 1) lies in both boxes: 0.3 each, background 0.4.
  np.testing.assert_allclose(probs[:, 1, 1], [0.4, 0.3, 0.3])
  # (0, 0): class 4 only; (2, 2): class 2 only; (0, 3): no box.
  np.testing.assert_allclose(probs[:, 0, 0], [0.4, 0.0, 0.6])
  np.testing.assert_allclose(probs[:, 2, 2], [0.4, 0.6, 0.0])
  np.testing.assert_allclose(probs[:, 0, 3], [1.0, 0.0, 0.0])
  with pytest.raises(ValueError, match='confidence'):
    box_crf.box_prior(boxes, labels, 3, 4, confidence=1.0)


def test_crf_snaps_a_loose_box_to_the_object():
  image = np.zeros((24, 24, 3), np.uint8)
  image[8:16, 8:16] = 255                   # a white square on black
  boxes = np.array([[4, 4, 20, 20]], np.float32)   # 4 px loose on each side
  label = box_crf.box_crf_label_map(
      image, boxes, np.array([3]),
      CrfParams(gauss_sxy=3, gauss_compat=3, bilateral_sxy=20,
                bilateral_srgb=10, bilateral_compat=10, iterations=10),
      confidence=0.6)
  assert label.dtype == np.uint8 and set(np.unique(label)) <= {0, 3}
  truth = np.zeros((24, 24), bool)
  truth[8:16, 8:16] = True
  assert (label[truth] == 3).mean() > 0.9
  # The loose margin inside the box went to background, outside stays 0.
  margin = np.zeros((24, 24), bool)
  margin[4:20, 4:20] = True
  margin &= ~truth
  assert (label[margin] == 0).mean() > 0.8
  assert (label[:4] == 0).all()


def test_no_box_gives_background():
  image = np.zeros((5, 6, 3), np.uint8)
  label = box_crf.box_crf_label_map(image, np.zeros((0, 4)),
                                    np.zeros((0,), int), CrfParams())
  assert label.shape == (5, 6) and not label.any()
