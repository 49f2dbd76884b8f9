"""wsss_jax.pseudo.cam: hand-computed cases, empty inputs, gradients, jit."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from wsss_jax.pseudo import cam as P


# ----------------------------------------------------------------------------
# CAM
# ----------------------------------------------------------------------------
def test_class_activation_maps_by_hand():
  # Two pixels, D = 2, C = 3.  f·W: pixel 0 = [1+2, 0+4, −1+0] = [3, 4, −1],
  # pixel 1 = [−1+0.5, 0+1, 1+0] = [−0.5, 1, 1]; ReLU clips the negatives.
  features = jnp.asarray([[[[1.0, 2.0], [-1.0, 0.5]]]])       # (1, 1, 2, 2)
  kernel = jnp.asarray([[1.0, 0.0, -1.0], [1.0, 2.0, 0.0]])   # (2, 3)
  cam = np.asarray(P.class_activation_maps(features, kernel))
  assert cam.shape == (1, 1, 2, 3) and cam.dtype == np.float32
  np.testing.assert_allclose(cam[0, 0], [[3, 4, 0], [0, 1, 1]], atol=1e-6)


# ----------------------------------------------------------------------------
# Normalisations
# ----------------------------------------------------------------------------
# One image, 1x3 pixels, three classes: class 0 = [2, −1, 4], class 1 all 0,
# class 2 = [1, 2, 3] (absent), class 3 = [−2, −1, −3] (all negative).
_CAM = np.asarray([[[[2, 0, 1, -2], [-1, 0, 2, -1], [4, 0, 3, -3]]]],
                  np.float32)
_PRESENT = np.asarray([[True, True, False, True]])


def test_max_normalize_by_hand():
  out = np.asarray(P.max_normalize(_CAM, _PRESENT))
  assert out.shape == _CAM.shape
  # Class 0: ReLU -> [2, 0, 4], / 4.  All-zero and all-negative maps: 0.
  np.testing.assert_allclose(out[0, 0, :, 0], [0.5, 0, 1], atol=1e-7)
  np.testing.assert_array_equal(out[..., 1], 0.0)
  np.testing.assert_array_equal(out[..., 2], 0.0)           # absent
  np.testing.assert_array_equal(out[..., 3], 0.0)
  # RRM's code: divide by max + 1e-5.
  out = np.asarray(P.max_normalize(_CAM, _PRESENT, eps=1e-5))
  np.testing.assert_allclose(out[0, 0, :, 0],
                             [2 / 4.00001, 0, 4 / 4.00001], rtol=1e-6)
  np.testing.assert_array_equal(out[..., 1:], 0.0)


def test_minmax_normalize_by_hand():
  out = np.asarray(P.minmax_normalize(_CAM, _PRESENT))
  # Class 0: (x + 1) / 5 = [0.6, 0, 1]; class 3: (x + 3) / 2 = [0.5, 1, 0]
  # (no ReLU); the constant class 1 and the absent class 2 are 0.
  np.testing.assert_allclose(out[0, 0, :, 0], [0.6, 0, 1], atol=1e-7)
  np.testing.assert_allclose(out[0, 0, :, 3], [0.5, 1, 0], atol=1e-7)
  np.testing.assert_array_equal(out[..., 1], 0.0)
  np.testing.assert_array_equal(out[..., 2], 0.0)
  out = np.asarray(P.minmax_normalize(_CAM, _PRESENT, eps=1e-5))
  np.testing.assert_allclose(out[0, 0, :, 0], [3 / 5.00001, 0, 5 / 5.00001],
                             rtol=1e-6)
  np.testing.assert_array_equal(out[..., 1], 0.0)


@pytest.mark.parametrize('fn', [P.max_normalize, P.minmax_normalize])
def test_normalize_gradients_are_finite(fn):
  # Weighted sum so that the gradient is not trivially 0; includes the
  # all-zero, the absent and the all-negative class.
  weights = jnp.arange(1.0, 1.0 + _CAM.size).reshape(_CAM.shape)
  grad = jax.grad(lambda c: jnp.sum(weights * fn(c, _PRESENT)))(
      jnp.asarray(_CAM))
  grad = np.asarray(grad)
  assert np.all(np.isfinite(grad))
  np.testing.assert_array_equal(grad[..., 1:3], 0.0)
  zeros = jnp.zeros((2, 3, 4, 5), jnp.float32)
  out = fn(zeros, jnp.ones((2, 5), bool))
  np.testing.assert_array_equal(out, 0.0)
  grad = jax.grad(lambda c: jnp.sum(fn(c, jnp.ones((2, 5), bool))))(zeros)
  assert np.all(np.isfinite(grad))


# ----------------------------------------------------------------------------
# Power background
# ----------------------------------------------------------------------------
def test_power_background_by_hand():
  cam_fg = jnp.asarray([[[[0.5, 0.2], [0.0, 0.0], [1.0, 0.3]]]])   # L = 2
  bg = np.asarray(P.power_background(cam_fg, 2))
  assert bg.shape == (1, 1, 3)
  # (1 − 0.5)² = 0.25; nothing responds -> 1; a class at 1 -> 0.
  np.testing.assert_allclose(bg[0, 0], [0.25, 1, 0], atol=1e-7)
  np.testing.assert_allclose(P.power_background(cam_fg, 4.0)[0, 0],
                             [0.0625, 1, 0], atol=1e-7)
  # Per class (PMM's PPMG): one channel at a time.
  np.testing.assert_allclose(P.power_background(cam_fg[..., 1:], 2)[0, 0],
                             [0.64, 1, 0.49], atol=1e-6)
  # Finite gradient, also where 1 − max = 0: d/dx (1 − x)^4 = −4(1 − x)^3
  # (−0.5 at 0.5; −4 at 0, split between the two tied classes; 0 at 1).
  for alpha in (4, 4.0):
    grad = np.asarray(jax.grad(
        lambda c, a=alpha: jnp.sum(P.power_background(c, a)))(cam_fg))
    assert np.all(np.isfinite(grad))
    np.testing.assert_allclose(grad[0, 0], [[-0.5, 0], [-2, -2], [0, 0]],
                               atol=1e-6)


# ----------------------------------------------------------------------------
# Multi-scale + flip
# ----------------------------------------------------------------------------
def _first_channel(images):
  return images[..., :1]


def test_aggregate_multiscale_by_hand_scales_and_conventions():
  # 2x2 image, one channel, both rows [0, 3] (rows stay equal under every
  # resize).  Scale 2 (AC-False image resize) along x: sources −.25, .25,
  # .75, 1.25 -> [0, .75, 2.25, 3].  Back to width 2: AC-False samples 0.5
  # and 2.5 -> [.375, 2.625]; AC-True samples 0 and 3 -> [0, 3].  Scale 1
  # adds [0, 3].
  images = jnp.asarray([[[[0.0], [3.0]], [[0.0], [3.0]]]])   # (1, 2, 2, 1)
  total = P.aggregate_multiscale(_first_channel, images, (1.0, 2.0), False,
                                 (2, 2))
  assert total.shape == (1, 2, 2, 1)
  np.testing.assert_allclose(total[0, ..., 0], [[0.375, 5.625]] * 2,
                             atol=1e-6)
  mean = P.aggregate_multiscale(_first_channel, images, (1.0, 2.0), False,
                                (2, 2), reduction='mean')
  np.testing.assert_allclose(mean[0, ..., 0], [[0.1875, 2.8125]] * 2,
                             atol=1e-6)
  ac_true = P.aggregate_multiscale(_first_channel, images, (1.0, 2.0),
                                   False, (2, 2), align_corners=True)
  np.testing.assert_allclose(ac_true[0, ..., 0], [[0, 6]] * 2, atol=1e-6)


def test_aggregate_multiscale_flips_back():
  # cam_fn weights column j by w = [0, 1]: not flip-equivariant.  The direct
  # pass gives x·w_j, the flipped pass flipped back gives x·w_{1−j}; their
  # sum is x·(w_j + w_{1−j}) = x.  (Without the flip back each row would
  # read [0, x_0 + x_1].)
  ramp = jnp.asarray([0.0, 1.0])[None, None, :, None]

  def cam_fn(images):
    return images[..., :1] * ramp

  images = jnp.asarray([[[[1.0], [2.0]], [[3.0], [4.0]]]])   # (1, 2, 2, 1)
  total = P.aggregate_multiscale(cam_fn, images, (1.0,), True, (2, 2))
  np.testing.assert_allclose(total[0, ..., 0], [[1, 2], [3, 4]], atol=1e-6)
  mean = P.aggregate_multiscale(cam_fn, images, (1.0,), True, (2, 2),
                                reduction='mean')
  np.testing.assert_allclose(mean[0, ..., 0], [[0.5, 1], [1.5, 2]],
                             atol=1e-6)


def test_aggregate_multiscale_scaled_sizes():
  # cam_fn reports the width it was given; maps are constant so every
  # resize keeps the value.  W = 2, s = 0.75: round(1.5) = 2, int(1.5) = 1;
  # W = 5, s = 0.5: round(2.5) = 2 (half to even), int(2.5) = 2.
  def width(images):
    return jnp.full(images.shape[:3] + (1,), images.shape[2], jnp.float32)

  for w, scale, rounded, floored in ((2, 0.75, 2, 1), (5, 0.5, 2, 2),
                                     (3, 0.5, 2, 1)):
    images = jnp.zeros((1, 4, w, 3))
    out = P.aggregate_multiscale(width, images, (scale,), False, (3, 3))
    np.testing.assert_allclose(out, rounded)
    out = P.aggregate_multiscale(width, images, (scale,), False, (3, 3),
                                 rounding='floor')
    np.testing.assert_allclose(out, floored)


def test_aggregate_multiscale_jit_and_lower_resolution_maps():
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.normal(size=(2, 16, 12, 3)), jnp.float32)
  kernel = jnp.asarray(rng.normal(size=(3, 4)), jnp.float32)

  def cam_fn(x):   # stride-2 "network": average pool then a 1x1 classifier
    b, h, w, d = x.shape
    x = x[:, :h // 2 * 2, :w // 2 * 2]
    x = x.reshape(b, h // 2, 2, w // 2, 2, d).mean(axis=(2, 4))
    return P.class_activation_maps(x, kernel)

  agg = functools.partial(P.aggregate_multiscale, cam_fn, scales=(0.5, 1.0,
                                                                  1.5),
                          flip=True, out_size=(8, 6))
  eager = agg(images)
  jitted = jax.jit(agg)(images)
  assert eager.shape == (2, 8, 6, 4)
  assert np.all(np.isfinite(eager)) and np.all(np.asarray(eager) >= 0)
  np.testing.assert_allclose(jitted, eager, atol=1e-5)
  with pytest.raises(ValueError, match='reduction'):
    P.aggregate_multiscale(cam_fn, images, (1.0,), False, (8, 6),
                           reduction='max')
  with pytest.raises(ValueError, match='rounding'):
    P.aggregate_multiscale(cam_fn, images, (1.0,), False, (8, 6),
                           rounding='ceil')
  with pytest.raises(ValueError, match='scales'):
    P.aggregate_multiscale(cam_fn, images, (), False, (8, 6))
