"""`models.convolution`: dead-tap pruning and the per-tap kernel gradient are
exact rewrites of `nn.Conv`."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from wsss_jax.models import convolution


def _key(seed):
  return jax.random.PRNGKey(seed)


@pytest.mark.parametrize('size,kernel,stride,dilation,padding,expected', [
    (12, 3, 1, 12, (12, 12), (1, 1)),   # fc6 on a 96² crop: centre tap only
    (13, 3, 1, 12, (12, 12), (0, 2)),   # one row of overlap: all taps live
    (16, 3, 1, 12, (12, 12), (0, 2)),
    (5, 3, 1, 1, (1, 1), (0, 2)),
    (1, 3, 1, 1, (1, 1), (1, 1)),       # a 1-pixel map: centre tap only
    (1, 3, 1, 2, (2, 2), (1, 1)),
    (4, 3, 2, 4, (4, 4), (1, 1)),       # stride 2: outputs 0, 2 read 0..3
    (6, 5, 1, 3, (6, 6), (1, 3)),       # taps 0 and 4 miss a 6-long input
])
def test_live_taps_hand_computed(size, kernel, stride, dilation, padding,
                                 expected):
  assert convolution.live_taps(size, kernel, stride, dilation,
                               padding) == expected


def test_live_taps_rejects_empty_convolutions():
  with pytest.raises(ValueError, match='no output'):
    convolution.live_taps(2, 3, 1, 4, (0, 0))
  with pytest.raises(ValueError, match='every tap'):
    convolution.live_taps(1, 1, 3, 1, (1, 1))


def _reference_conv(x, kernel, stride, padding, dilation):
  return jax.lax.conv_general_dilated(
      x, kernel, (stride, stride), ((padding, padding),) * 2,
      rhs_dilation=(dilation, dilation),
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


@pytest.mark.parametrize('side,kernel,stride,padding,dilation', [
    (12, 3, 1, 12, 12),    # pruned to 1×1
    (7, 3, 1, 6, 6),       # pruned to 1×1 (taps at ±6 miss a 7-long map)
    (9, 3, 1, 6, 6),       # all live
    (10, 3, 2, 4, 4),      # stride 2, pruned
    (6, 5, 1, 6, 3),       # 5×5 to 3×3, padding becomes (3, 3)
    (8, 3, 2, 1, 1),       # ordinary strided conv
])
@pytest.mark.parametrize('backend', ['cpu', 'gpu'])
def test_conv2d_nhwc_matches_lax(side, kernel, stride, padding, dilation,
                                 backend, monkeypatch):
  # 'gpu' takes XLA's kernel gradient; the thresholds are lowered so that
  # 'cpu' takes the per-tap one on these small shapes.
  monkeypatch.setattr(convolution, '_TAP_GRAD_MIN_CHANNELS', 1)
  monkeypatch.setattr(convolution, '_TAP_GRAD_CHANNEL_PAIRS', 1)
  x = jax.random.normal(_key(0), (2, side, side + 1, 3))
  w = jax.random.normal(_key(1), (kernel, kernel, 3, 4))
  weights = jax.random.normal(_key(2), _reference_conv(
      x, w, stride, padding, dilation).shape)
  ours = lambda x, w: convolution.conv2d_nhwc(
      x, w, strides=(stride, stride), padding=((padding, padding),) * 2,
      dilation=(dilation, dilation), backend=backend)
  ref = lambda x, w: _reference_conv(x, w, stride, padding, dilation)
  np.testing.assert_allclose(ours(x, w), ref(x, w), atol=1e-5)
  grad_ours = jax.jit(jax.grad(lambda x, w: jnp.sum(ours(x, w) * weights),
                               (0, 1)))(x, w)
  grad_ref = jax.grad(lambda x, w: jnp.sum(ref(x, w) * weights), (0, 1))(x, w)
  for a, b in zip(grad_ours, grad_ref):
    np.testing.assert_allclose(a, b, atol=1e-4)


def test_tap_kernel_grad_hand_computed():
  # 1×3 input [1, 2, 3], 3-tap kernel, padding 1, output gradient [1, 0, 2]:
  # dW[k] = sum_o x_pad[o + k] g[o] with x_pad = [0, 1, 2, 3, 0]
  #   k=0: 0·1 + 1·0 + 2·2 = 4;  k=1: 1 + 0 + 6 = 7;  k=2: 2 + 0 + 0 = 2.
  x = jnp.array([1., 2., 3.]).reshape(1, 1, 3, 1)
  g = jnp.array([1., 0., 2.]).reshape(1, 1, 3, 1)
  grad = convolution.tap_kernel_grad(x, g, (1, 3, 1, 1), (1, 1),
                                     ((0, 0), (1, 1)))
  np.testing.assert_array_equal(grad.reshape(-1), [4., 7., 2.])


def test_tap_gradient_rule():
  rule = convolution.use_tap_kernel_grad
  assert rule('cpu', 512, 1024, 3_362, (1, 1))       # LargeFOV fc6
  assert rule('cpu', 128, 128, 51_842, (1, 1))       # LargeFOV conv2_2
  assert not rule('cpu', 64, 128, 51_842, (1, 1))    # conv2_1
  assert not rule('cpu', 512, 512, 3_362, (1, 1))    # ResNet layer4, conv5
  assert not rule('cpu', 2048, 21, 3_362, (1, 1))    # ASPP
  assert not rule('cpu', 128, 128, 9_216, (1, 1))
  assert not rule('cpu', 1024, 1024, 10_000, (2, 2))
  assert not rule('gpu', 1024, 1024, 100_000, (1, 1))
  assert not rule('tpu', 1024, 1024, 100_000, (1, 1))


def test_dead_taps_have_zero_gradient_and_cost_nothing():
  x = jax.random.normal(_key(0), (1, 12, 12, 4))
  w = jax.random.normal(_key(1), (3, 3, 4, 6))
  grad = jax.grad(lambda w: jnp.sum(convolution.conv2d_nhwc(
      x, w, padding=((12, 12),) * 2, dilation=(12, 12)) ** 2))(w)
  mask = np.zeros((3, 3), bool)
  mask[1, 1] = True
  assert np.all(np.asarray(grad)[~mask] == 0)
  assert np.any(np.asarray(grad)[mask] != 0)
  # The lowered computation convolves with a 1×1 kernel.
  text = jax.jit(lambda x, w: convolution.conv2d_nhwc(
      x, w, padding=((12, 12),) * 2, dilation=(12, 12))).lower(x, w).as_text()
  assert 'tensor<1x1x4x6xf32>' in text
