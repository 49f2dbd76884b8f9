"""PMM's host pseudo-mask equations (Eqs. 1–9, Algorithm 1, the multi-crop
label rule) on cases small enough to check by hand."""

from __future__ import annotations

import ast
import dataclasses
import functools
import pickle

import numpy as np
import pytest

from wsss_jax.host import crf as host_crf
from wsss_jax.methods.pmm import masks

# The official code's PPMG CRF (Gaussian 3/10, bilateral 80/13/10), with few
# iterations to stay fast.
PPMG_CRF = host_crf.CrfParams(iterations=5, gauss_sxy=3.0, gauss_compat=10.0,
                              bilateral_sxy=80.0, bilateral_srgb=13.0,
                              bilateral_compat=10.0)


# ----------------------------------------------------------------------------
# A stand-in CRF backend: marginals = the unary input renormalised per pixel
# (no pairwise term), recording what it was given.
# ----------------------------------------------------------------------------
@dataclasses.dataclass
class _RecordingBackend:
  name: str = 'pmm_test_recording'
  calls: list = dataclasses.field(default_factory=list)

  def __call__(self, image, probs, params):
    self.calls.append((np.array(image), np.array(probs)))
    probs = np.asarray(probs, np.float64)
    return (probs / np.maximum(probs.sum(0, keepdims=True), 1e-12)
            ).astype(np.float32)


@pytest.fixture
def recorder():
  backend = _RecordingBackend()
  host_crf.register_backend(backend)
  return backend


def _two_squares(overlap_score_a=1.0, score_b=0.8):
  """24×24 scene: class channel 0 ("A", rows 2–19 × cols 2–13, 216 px),
  channel 2 ("B", rows 8–15 × cols 10–19, 80 px), overlapping on rows 8–15 ×
  cols 10–13; channel 1 absent but with a high constant map.  Each region
  has its own colour so that the CRF keeps it."""
  image = np.full((24, 24, 3), 40, np.uint8)
  a, b = (slice(2, 20), slice(2, 14)), (slice(8, 16), slice(10, 20))
  image[a] = (200, 40, 40)
  image[b] = (40, 200, 40)
  image[8:16, 10:14] = (40, 40, 200)
  cam = np.zeros((24, 24, 3), np.float32)
  cam[..., 0][a] = overlap_score_a
  cam[..., 2][b] = score_b
  cam[..., 1] = 0.7
  present = np.array([True, False, True])
  return image, cam, present, a, b


# ----------------------------------------------------------------------------
# Eq. (1)
# ----------------------------------------------------------------------------
def test_normalize_cam_eq1_by_hand():
  cam = np.zeros((2, 2, 3), np.float32)
  cam[..., 0] = [[0, 1], [2, 4]]           # min 0, max 4
  cam[..., 1] = [[3, 3], [3, 9]]           # absent
  cam[..., 2] = 7.0                        # constant, present
  present = np.array([True, False, True])
  got = masks.normalize_cam(cam, present, eps=0.0)
  assert got.dtype == np.float32
  np.testing.assert_allclose(got[..., 0], [[0, 0.25], [0.5, 1.0]])
  np.testing.assert_array_equal(got[..., 1], 0.0)
  np.testing.assert_array_equal(got[..., 2], 0.0)   # constant map: 0, no NaN
  # Default eps = 1e-5 (the code's): x / 4.00001.
  got = masks.normalize_cam(cam, present)
  np.testing.assert_allclose(got[..., 0],
                             np.array([[0, 1], [2, 4]]) / 4.00001, rtol=1e-6)
  np.testing.assert_array_equal(got[..., 2], 0.0)


def test_normalize_cam_code_multiscale_quirk_by_hand():
  cam = np.zeros((2, 2, 2), np.float32)
  cam[..., 0] = [[1, 2], [3, 5]]           # min 1, max 5 (ReLU changes none)
  cam[..., 1] = [[-3, 0], [2, 4]]          # ReLU -> [[0, 0], [2, 4]]
  got = masks.normalize_cam(cam, np.array([True, True]),
                            mode='pmm_code_multiscale')
  # Channel 0: pixel 1 < 1 + 1e-5 -> 0, then (0 − 1 − 1e-5) / (4 + 1e-5);
  # the others (x − 1.00001) / 4.00001.
  np.testing.assert_allclose(
      got[..., 0], np.array([[-1.00001, 0.99999], [1.99999, 3.99999]])
      / 4.00001, rtol=1e-6)
  # Channel 1: min 0, max 4; the two zero pixels -> −1e-5 / 4.00001.
  np.testing.assert_allclose(
      got[..., 1], np.array([[-1e-5, -1e-5], [1.99999, 3.99999]]) / 4.00001,
      rtol=1e-5)


def test_normalize_cam_code_multicrop_quirk_by_hand():
  cam = np.zeros((2, 2, 1), np.float32)
  cam[..., 0] = [[-2, 0], [2, 6]]          # min −2, max 6, no ReLU
  got = masks.normalize_cam(cam, np.array([True]), mode='pmm_code_multicrop')
  # −2 < −2 + 1e-5 is zeroed first, then (x + 2) / 8.00001: the former
  # minimum ends at −min / 8.00001 = 0.25, not 0.
  np.testing.assert_allclose(got[..., 0],
                             np.array([[2, 2], [4, 8]]) / 8.00001, rtol=1e-6)


def test_normalize_cam_rejects_bad_arguments():
  cam = np.zeros((2, 2, 2), np.float32)
  with pytest.raises(ValueError, match='mode'):
    masks.normalize_cam(cam, np.array([True, True]), mode='minmax')
  with pytest.raises(ValueError, match='present'):
    masks.normalize_cam(cam, np.array([True]))
  with pytest.raises(ValueError, match='cam'):
    masks.normalize_cam(np.zeros((2, 2), np.float32), np.array([True]))
  with pytest.raises(ValueError, match='eps'):
    masks.normalize_cam(cam, np.array([True, True]), eps=-1.0)


# ----------------------------------------------------------------------------
# Eqs. (5)–(6)
# ----------------------------------------------------------------------------
def test_coefficient_of_variation_by_hand():
  cam = np.zeros((2, 2, 4), np.float32)
  cam[..., 0] = [[0.0, 0.2], [0.4, 0.6]]   # above t: .2 .4 .6
  cam[..., 1] = [[0.05, 0.01], [0.0, 0.05]]  # nothing strictly above t
  cam[..., 2] = [[0.9, 0.2], [0.4, 0.6]]   # absent
  # One pixel strictly above t (the float32 0.05s equal t): std 0, cv 0.
  cam[..., 3] = [[0.05, 0.0], [0.3, 0.05]]
  cv = masks.coefficient_of_variation(
      cam, np.array([True, True, False, True]), t=0.05)
  # Channel 0: mean 0.4, population variance (0.04 + 0 + 0.04) / 3, so
  # cv = sqrt(0.08 / 3) / 0.4 = 0.1632993 / 0.4 = 0.4082483.
  np.testing.assert_allclose(cv, [0.4082483, 0.0, 0.0, 0.0], rtol=1e-5)


def test_cv_smoothing_by_hand():
  cam = np.zeros((1, 3, 2), np.float32)
  cam[0, :, 0] = [0.0, 0.25, 1.0]
  cam[0, :, 1] = [0.0, 0.04, 0.64]
  got = masks.cv_smoothing(cam, np.array([0.0, 5.0 / 3.0]), s=0.3)
  # Channel 0: exponent 1 (unchanged).  Channel 1: exponent 1 − 0.5 = 0.5.
  np.testing.assert_allclose(got[0, :, 0], [0.0, 0.25, 1.0])
  np.testing.assert_allclose(got[0, :, 1], [0.0, 0.2, 0.8], rtol=1e-6)
  # The code's switch zeroes pixels < t first: 0.04 < 0.05 -> 0.
  got = masks.cv_smoothing(cam, np.array([0.0, 5.0 / 3.0]), s=0.3,
                           zero_below_t=True, t=0.05)
  np.testing.assert_allclose(got[0, :, 1], [0.0, 0.0, 0.8], rtol=1e-6)


def test_cov_above_one_over_s_clamps_the_exponent():
  cam = np.zeros((4, 4, 1), np.float32)
  flat = cam.reshape(-1)
  flat[:14] = 0.001
  flat[14] = 1.0
  flat[15] = 0.0                           # not above t = 0
  cv = masks.coefficient_of_variation(cam, np.array([True]), t=0.0)
  # 15 pixels above 0: mean = 1.014 / 15 = 0.0676, E[x²] = 1.000014 / 15 =
  # 0.0666676, variance 0.0666676 − 0.0676² = 0.0620978, std 0.249194, so
  # cv = 3.68631 > 1 / 0.3.
  np.testing.assert_allclose(cv, [3.68631], rtol=1e-4)
  got = masks.cv_smoothing(cam, cv, s=0.3)
  # Exponent 1 − 0.3 · 3.686 = −0.106 is clamped to 0.05: 0 stays 0 (no
  # 0^0 = 1), 0.001^0.05 = exp(0.05 · ln 0.001) = 0.707946, 1 stays 1.
  assert np.isfinite(got).all()
  np.testing.assert_allclose(got.reshape(-1)[[0, 14, 15]],
                             [0.707946, 1.0, 0.0], rtol=1e-5)
  with pytest.raises(ValueError, match='min_exponent'):
    masks.cv_smoothing(cam, cv, min_exponent=0.0)
  with pytest.raises(ValueError, match='cv'):
    masks.cv_smoothing(cam, np.zeros(2))


# ----------------------------------------------------------------------------
# Eqs. (2)–(4)
# ----------------------------------------------------------------------------
def test_background_unary_by_hand():
  cam = np.zeros((1, 2, 2), np.float32)
  cam[0, 0] = [0.5, 0.2]
  got = masks.background_unary(cam, alpha=2.0)
  # Pixel 0: (1 − 0.5)² = 0.25; pixel 1: no foreground -> 1.
  np.testing.assert_allclose(got[0], [[0.25, 0.5, 0.2], [1.0, 0.0, 0.0]])
  empty = masks.background_unary(np.zeros((2, 3, 0), np.float32), alpha=24.0)
  np.testing.assert_array_equal(empty, np.ones((2, 3, 1)))


def test_crf_label_real_crf_ignores_the_absent_class():
  image, cam, present, a, b = _two_squares(overlap_score_a=1.0, score_b=0.8)
  got = masks.crf_label(image, cam, present, alpha=24.0, crf_params=PPMG_CRF)
  expected = np.zeros((24, 24), np.uint8)
  expected[b] = 3
  expected[a] = 1          # the overlap goes to A's higher score (Eq. 4)
  np.testing.assert_array_equal(got, expected)
  marginals = masks.crf_marginals(image, cam, present, alpha=24.0,
                                  crf_params=PPMG_CRF)
  assert marginals.shape == (24, 24, 4) and marginals.dtype == np.float32
  np.testing.assert_array_equal(marginals[..., 2], 0.0)  # absent class
  np.testing.assert_allclose(marginals.sum(-1), 1.0, atol=1e-5)


def test_crf_label_feeds_present_classes_only_and_maps_back(recorder):
  cam = np.zeros((1, 3, 3), np.float32)
  cam[0, :, 0] = [0.9, 0.0, 0.0]
  cam[0, :, 1] = [0.0, 0.0, 0.0]           # absent
  cam[0, :, 2] = [0.0, 0.8, 0.0]
  image = np.zeros((1, 3, 3), np.uint8)
  got = masks.crf_label(image, cam, np.array([True, False, True]), alpha=1.0,
                        crf_params=PPMG_CRF, crf_backend=recorder.name)
  # Unaries (bg, c0, c2): (0.1, 0.9, 0), (0.2, 0, 0.8), (1, 0, 0).
  np.testing.assert_array_equal(got, [[1, 3, 0]])
  (_, probs), = recorder.calls
  assert probs.shape == (3, 1, 3)           # channel-first, absent dropped
  np.testing.assert_allclose(probs[:, 0, 1], [0.2, 0.0, 0.8], rtol=1e-6)


def test_no_present_class_gives_background(recorder):
  cam = np.full((4, 5, 2), 0.9, np.float32)
  image = np.zeros((4, 5, 3), np.uint8)
  none = np.array([False, False])
  kwargs = dict(crf_params=PPMG_CRF, crf_backend=recorder.name)
  np.testing.assert_array_equal(masks.crf_label(image, cam, none, **kwargs),
                                0)
  np.testing.assert_array_equal(masks.ppmg_label(image, cam, none, **kwargs),
                                0)
  marginals = masks.crf_marginals(image, cam, none, **kwargs)
  np.testing.assert_array_equal(marginals[..., 0], 1.0)
  np.testing.assert_array_equal(marginals[..., 1:], 0.0)
  assert not recorder.calls


# ----------------------------------------------------------------------------
# Eqs. (7)–(9), Algorithm 1
# ----------------------------------------------------------------------------
def test_proportional_label_by_hand():
  cam = np.zeros((1, 4, 2), np.float32)
  cam[0, :, 0] = [0.5, 0.5, 0.0, 0.3]
  cam[0, :, 1] = [0.5, 0.0, 0.0, 0.3]
  fg = np.zeros((1, 4, 2), bool)
  fg[0, :, 0] = [True, True, True, False]
  fg[0, :, 1] = [True, False, True, False]
  # Masses 1.0 (class 0) and 0.5 (class 1): P0 = X / 2, P1 = X / 1.5.
  # Pixel 0: 0.25 vs 0.333 -> class 1.  Pixel 1: class 0 alone.  Pixel 2:
  # in both masks with X = 0 -> all scores 0 -> background (first index).
  # Pixel 3: in no mask -> background indicator.
  np.testing.assert_array_equal(masks.proportional_label(cam, fg),
                                [[2, 1, 0, 0]])
  # Exact tie of two classes: the lower class wins.
  fg[0, :, 1] = [True, True, True, False]
  cam[0, :, 1] = [0.5, 0.5, 0.0, 0.3]
  np.testing.assert_array_equal(masks.proportional_label(cam, fg),
                                [[1, 1, 0, 0]])


def test_ppmg_label_by_hand_with_a_stand_in_crf(recorder):
  cam = np.zeros((1, 6, 3), np.float32)
  cam[0, :, 0] = [0.9, 0.8, 0.0, 0.6, 0.0, 0.5]
  cam[0, :, 1] = 0.9                        # absent: never a CRF, never wins
  cam[0, :, 2] = [0.0, 0.7, 0.9, 0.4, 0.0, 0.0]
  image = np.arange(18, dtype=np.uint8).reshape(1, 6, 3)
  got = masks.ppmg_label(image, cam, np.array([True, False, True]), alpha=1.0,
                         use_cvs=False, crf_params=PPMG_CRF,
                         crf_backend=recorder.name)
  # Stand-in CRF with α = 1: marginal = X / ((1 − X) + X) = X, fg iff
  # X > 0.5 (strict: 0.5 is not fg).  fg0 = [1 1 0 1 0 0], mass 2.3;
  # fg2 = [0 1 1 0 0 0], mass 1.6.  Pixel 1: 0.8 / 3.3 = 0.242 <
  # 0.7 / 2.6 = 0.269: the smaller class wins despite its lower CAM.
  np.testing.assert_array_equal(got, [[1, 3, 3, 1, 0, 0]])
  assert len(recorder.calls) == 2          # one 2-label CRF per present class
  seen_image, probs = recorder.calls[0]
  np.testing.assert_array_equal(seen_image, image)
  assert probs.shape == (2, 1, 6)
  np.testing.assert_allclose(probs[1, 0], cam[0, :, 0])
  np.testing.assert_allclose(probs[0, 0], 1.0 - cam[0, :, 0], rtol=1e-6)


def test_ppmg_label_cvs_and_colour_order_reach_the_crf(recorder):
  cam = np.zeros((1, 4, 1), np.float32)
  cam[0, :, 0] = [0.0, 0.2, 0.4, 0.6]      # cv = 0.4082483 (see above)
  image = np.arange(12, dtype=np.uint8).reshape(1, 4, 3)
  masks.ppmg_label(image, cam, np.array([True]), alpha=11.0, s=0.3,
                   crf_params=PPMG_CRF, crf_backend=recorder.name,
                   colour_order='bgr')
  seen_image, probs = recorder.calls[0]
  np.testing.assert_array_equal(seen_image, image[..., ::-1])
  # X^(1 − 0.3 · 0.4082483) = X^0.8775255: 0.2 -> exp(0.8775255 · ln 0.2)
  # = exp(−1.412323) = 0.243577; background (1 − 0.243577)^11 = 0.046389.
  np.testing.assert_allclose(probs[1, 0, 1], 0.243577, rtol=1e-5)
  np.testing.assert_allclose(probs[0, 0, 1], 0.046389, rtol=1e-4)
  with pytest.raises(ValueError, match='colour_order'):
    masks.ppmg_label(image, cam, np.array([True]), crf_params=PPMG_CRF,
                     crf_backend=recorder.name, colour_order='hsv')


def test_ppmg_label_real_crf_smaller_object_wins_the_overlap():
  # A (216 px, CAM 1.0) and B (80 px, CAM 0.8) overlap; Eq. (4) gives the
  # overlap to A (see test_crf_label_real_crf_ignores_the_absent_class), but
  # PPMG compares 1 / (1 + 216) = 0.0046 with 0.8 / (1 + 64) = 0.0123: B.
  image, cam, present, a, b = _two_squares(overlap_score_a=1.0, score_b=0.8)
  expected = np.zeros((24, 24), np.uint8)
  expected[a] = 1
  expected[b] = 3
  for colour_order in ('rgb', 'bgr'):
    got = masks.ppmg_label(image, cam, present, crf_params=PPMG_CRF,
                           colour_order=colour_order)
    assert got.dtype == np.uint8
    np.testing.assert_array_equal(got, expected)


def test_ppmg_functions_are_picklable_and_module_imports_no_jax():
  fn = functools.partial(masks.ppmg_label, alpha=11.0, crf_params=PPMG_CRF)
  assert pickle.loads(pickle.dumps(fn)).func is masks.ppmg_label
  with open(masks.__file__, encoding='utf-8') as f:
    tree = ast.parse(f.read())
  imported = {alias.name for node in ast.walk(tree)
              if isinstance(node, ast.Import) for alias in node.names}
  imported |= {node.module for node in ast.walk(tree)
               if isinstance(node, ast.ImportFrom)}
  assert not {m for m in imported if m and m.split('.')[0] == 'jax'}


def test_ppmg_label_rejects_bad_arguments():
  image, cam, present, _, _ = _two_squares()
  with pytest.raises(ValueError, match='image'):
    masks.ppmg_label(image[:10], cam, present, crf_params=PPMG_CRF)
  with pytest.raises(ValueError, match='crf_params'):
    masks.ppmg_label(image, cam, present, crf_params=None)
  with pytest.raises(ValueError, match='alpha'):
    masks.crf_label(image, cam, present, alpha=-1.0, crf_params=PPMG_CRF)


# ----------------------------------------------------------------------------
# Sec. 4.1: multi-crop training labels
# ----------------------------------------------------------------------------
def _probs(regions):
  """(10, 10, K + 1) marginals with 0.95 on each class's boolean region."""
  probs = np.zeros((10, 10, len(regions) + 1), np.float32)
  for k, region in enumerate(regions):
    probs[..., k + 1] = np.where(region, 0.95, 0.0)
  return probs
