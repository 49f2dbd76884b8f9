"""Layers shared by the backbones and heads (NHWC, PyTorch semantics).

Pooling follows PyTorch exactly (output size, padding value, ceil-mode rule),
because the official codes of the methods are PyTorch and output strides, and
thus which input pixel a feature cell sees, must match them.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from wsss_jax.models import convolution

Dtype = Any
Initializer = Callable[..., jax.Array]

# He/Kaiming normal (PyTorch `kaiming_normal_` draws from a plain normal).
HE_NORMAL_FAN_IN = nn.initializers.variance_scaling(2.0, 'fan_in', 'normal')
HE_NORMAL_FAN_OUT = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')
# The DeepLab classifier initialisation N(0, 0.01)
# (docs/implementation_notes.md, "Networks and initialisation").
CLASSIFIER_INIT = nn.initializers.normal(stddev=0.01)

BN_EPSILON = 1e-5
# PyTorch BatchNorm momentum 0.1 expressed in Flax's convention (1 - 0.1).
BN_MOMENTUM = 0.9


def scaled_channels(base: int, width: float) -> int:
  """Channel count `base` multiplied by `width`, rounded, at least 1."""
  return max(1, int(round(base * width)))


class PointwiseConv(nn.Module):
  """A 1×1 convolution (stride s, no padding) computed as a matrix product.

  The parameters are `nn.Conv`'s (`kernel` (1, 1, C, O) HWIO, `bias` (O,),
  drawn with the same initialisers and keys), so weight files, parameter
  groups and initial values are unchanged.  Why: XLA:CPU runs a 1×1
  convolution's backward pass through its general convolution kernels, 2–3×
  slower than the same contraction as a dot (docs/implementation_notes.md,
  "Speed"); on accelerators both are one matrix product.  Stride s reads
  every s-th row and column, as the convolution does.

  Attributes:
    features: output channels O.
    stride: s.
    use_bias: adds `bias`.
    dtype: computation dtype; parameters are float32.
    kernel_init, bias_init: initialisers of `kernel` and `bias`.
  """
  features: int
  stride: int = 1
  use_bias: bool = True
  dtype: Dtype = jnp.float32
  kernel_init: Initializer = HE_NORMAL_FAN_IN
  bias_init: Initializer = nn.initializers.zeros

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """(B, H, W, C) -> (B, ceil(H / s), ceil(W / s), O) in `dtype`."""
    kernel = self.param('kernel', self.kernel_init,
                        (1, 1, x.shape[-1], self.features), jnp.float32)
    if self.stride > 1:
      x = x[:, ::self.stride, ::self.stride, :]
    y = lax.dot_general(x.astype(self.dtype), kernel[0, 0].astype(self.dtype),
                        (((x.ndim - 1,), (0,)), ((), ())))
    if self.use_bias:
      bias = self.param('bias', self.bias_init, (self.features,), jnp.float32)
      y = y + bias.astype(self.dtype)
    return y


def conv2d(features: int, kernel_size: int, *, stride: int = 1,
           padding: int = 0, dilation: int = 1, use_bias: bool = True,
           dtype: Dtype = jnp.float32,
           kernel_init: Initializer = HE_NORMAL_FAN_IN,
           bias_init: Initializer = nn.initializers.zeros,
           name: str | None = None) -> nn.Module:
  """A square 2-D convolution with PyTorch's `Conv2d` arguments.

  Symmetric explicit padding gives PyTorch's output size
  floor((H + 2p - d(k - 1) - 1) / s) + 1.  Parameters are float32 whatever
  the computation `dtype`; kernels are HWIO, biases start at `bias_init`
  (zero).  Unpadded 1×1 convolutions are `PointwiseConv` (a dot), the others
  `convolution.Conv` (`nn.Conv`'s parameters; taps that read only padding
  dropped, a faster kernel gradient on XLA:CPU).
  """
  if kernel_size == 1 and padding == 0:
    return PointwiseConv(features, stride=stride, use_bias=use_bias,
                         dtype=dtype, kernel_init=kernel_init,
                         bias_init=bias_init, name=name)
  return convolution.Conv(
      features=features,
      kernel_size=kernel_size,
      stride=stride,
      padding=padding,
      dilation=dilation,
      use_bias=use_bias,
      dtype=dtype,
      kernel_init=kernel_init,
      bias_init=bias_init,
      name=name)


def pool_output_size(size: int, kernel: int, stride: int, padding: int,
                     ceil_mode: bool = False) -> int:
  """Output length of a PyTorch 1-D pooling window sweep.

  floor (or ceil) of (size + 2p - k) / s, plus one; in ceil mode PyTorch drops
  the last window when it would start at or after size + p, i.e. inside the
  right padding.
  """
  if 2 * padding > kernel:
    raise ValueError(f'pooling padding {padding} exceeds half the window '
                     f'{kernel} (PyTorch rejects it too)')
  if size + 2 * padding < kernel:
    raise ValueError(f'pooling input of size {size} (padding {padding}) is '
                     f'smaller than the window {kernel}')
  span = size + 2 * padding - kernel
  out = (-(-span // stride) if ceil_mode else span // stride) + 1
  if ceil_mode and (out - 1) * stride >= size + padding:
    out -= 1
  return out


def _pool_padding(size: int, kernel: int, stride: int, padding: int,
                  ceil_mode: bool) -> tuple[int, int, int]:
  """(left pad, right pad, output size) so that a VALID sweep matches PyTorch.

  The right pad is what the last window needs (more than `padding` in ceil
  mode).  In floor mode trailing input that no window reaches may remain; the
  pad is then clipped at 0 and the caller slices off any surplus window.
  """
  out = pool_output_size(size, kernel, stride, padding, ceil_mode)
  right = max((out - 1) * stride + kernel - size - padding, 0)
  return padding, right, out


def _window_views(padded: jax.Array, kernel: int, stride: int, out_h: int,
                  out_w: int) -> list[jax.Array]:
  """The kernel² strided views of a padded (B, H, W, C) array, row-major.

  View (di, dj) holds, at output cell (i, j), the element at padded position
  (di + stride·i, dj + stride·j): the window's (di, dj) member.
  """
  batch, _, _, channels = padded.shape
  return [lax.slice(padded, (0, di, dj, 0),
                    (batch, di + stride * (out_h - 1) + 1,
                     dj + stride * (out_w - 1) + 1, channels),
                    (1, stride, stride, 1))
          for di in range(kernel) for dj in range(kernel)]


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3, 4))
def _max_pool_padded(x: jax.Array, kernel: int, stride: int,
                     pads: tuple[int, int, int, int],
                     out_hw: tuple[int, int]) -> jax.Array:
  """Max over kernel×kernel windows of x padded with -inf by `pads` (top,
  bottom, left, right): (B, H, W, C) -> (B, out_h, out_w, C)."""
  top, bottom, left, right = pads
  y = lax.reduce_window(
      x, -jnp.inf, lax.max,
      window_dimensions=(1, kernel, kernel, 1),
      window_strides=(1, stride, stride, 1),
      padding=((0, 0), (top, bottom), (left, right), (0, 0)))
  return y[:, :out_hw[0], :out_hw[1], :]


def _max_pool_forward(x, kernel, stride, pads, out_hw):
  y = _max_pool_padded(x, kernel, stride, pads, out_hw)
  return y, (x, y)


def _max_pool_backward(kernel, stride, pads, out_hw, residuals, g):
  """Routes each window's gradient to its first maximal member (row-major),
  PyTorch's and XLA's tie rule, with shifted adds instead of a scatter.

  XLA's own rule (`select_and_scatter`) is several times slower than this on
  XLA:CPU (docs/implementation_notes.md, "Speed").  Window member (di, dj)
  of output cell (i, j) sits at padded position (di + stride·i, dj +
  stride·j), i.e. in the stride-phase (di mod stride, dj mod stride) grid at
  cell (i + di div stride, j + dj div stride): each member's gradient is one
  shifted add on an output-sized phase grid, and the phase grids interleave
  into the input.  Exact: every window sends its whole gradient to exactly
  one input element.
  """
  x, y = residuals
  top, bottom, left, right = pads
  out_h, out_w = out_hw
  batch, height, width, channels = x.shape
  padded = jnp.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)),
                   constant_values=-jnp.inf)
  reach = (kernel - 1) // stride
  phase_h = max(out_h + reach, -(-(top + height) // stride))
  phase_w = max(out_w + reach, -(-(left + width) // stride))
  zero = jnp.zeros((), g.dtype)
  phases = [[jnp.zeros((batch, phase_h, phase_w, channels), g.dtype)
             for _ in range(stride)] for _ in range(stride)]
  unclaimed = jnp.ones(y.shape, bool)
  views = _window_views(padded, kernel, stride, out_h, out_w)
  for index, view in enumerate(views):
    di, dj = divmod(index, kernel)
    winner = unclaimed & (view == y)
    unclaimed = unclaimed & ~winner
    (qi, pi), (qj, pj) = divmod(di, stride), divmod(dj, stride)
    phases[pi][pj] = phases[pi][pj] + lax.pad(
        jnp.where(winner, g, zero), zero,
        ((0, 0, 0), (qi, phase_h - out_h - qi, 0),
         (qj, phase_w - out_w - qj, 0), (0, 0, 0)))
  grid = jnp.stack([jnp.stack(row, axis=3) for row in phases], axis=2)
  grid = grid.reshape(batch, phase_h * stride, phase_w * stride, channels)
  return (grid[:, top:top + height, left:left + width, :],)


_max_pool_padded.defvjp(_max_pool_forward, _max_pool_backward)


def max_pool2d(x: jax.Array, kernel: int, stride: int, padding: int = 0,
               ceil_mode: bool = False) -> jax.Array:
  """PyTorch `MaxPool2d(kernel, stride, padding, ceil_mode)` on NHWC input.

  Padded positions hold -inf, so they never win (PyTorch semantics).  The
  gradient goes to the first maximal element of each window in row-major
  order, as in PyTorch, computed without a scatter (`_max_pool_backward`).

  Args:
    x: (B, H, W, C) float array.
    kernel, stride, padding: square window parameters.
    ceil_mode: PyTorch's ceil mode, including its last-window rule.

  Returns:
    (B, H', W', C) array of x's dtype, H' = `pool_output_size(H, ...)`.
  """
  top, bottom, out_h = _pool_padding(x.shape[1], kernel, stride, padding,
                                     ceil_mode)
  left, right, out_w = _pool_padding(x.shape[2], kernel, stride, padding,
                                     ceil_mode)
  return _max_pool_padded(x, kernel, stride, (top, bottom, left, right),
                          (out_h, out_w))


def avg_pool2d(x: jax.Array, kernel: int, stride: int, padding: int = 0,
               count_include_pad: bool = True) -> jax.Array:
  """PyTorch `AvgPool2d(kernel, stride, padding, count_include_pad)` (floor mode).

  With `count_include_pad=True` (PyTorch's default, used by DeepLab-LargeFOV's
  pool5a) zero padding counts, so every window is divided by kernel**2.

  Args:
    x: (B, H, W, C) float array.

  Returns:
    (B, H', W', C) array of x's dtype.
  """
  pads = ((0, 0), (padding, padding), (padding, padding), (0, 0))
  dims = (1, kernel, kernel, 1)
  strides = (1, stride, stride, 1)
  sums = lax.reduce_window(x, 0.0, lax.add, dims, strides, pads)
  if count_include_pad:
    return sums / jnp.array(kernel * kernel, x.dtype)
  ones = jnp.ones((1,) + x.shape[1:3] + (1,), x.dtype)
  counts = lax.reduce_window(ones, 0.0, lax.add, dims, strides, pads)
  return sums / counts


def channel_dropout(rate: float, train: bool,
                    name: str | None = None) -> nn.Dropout:
  """PyTorch `Dropout2d(rate)` on NHWC: one keep/drop draw per (image, channel).

  Uses the 'dropout' rng stream when `train` and `rate > 0`.
  """
  return nn.Dropout(rate, broadcast_dims=(1, 2), deterministic=not train,
                    name=name)


class FrozenBatchNorm(nn.Module):
  """Batch normalisation with fixed statistics and affine parameters.

  y = (x - mean) * scale / sqrt(var + eps) + bias, eps = 1e-5 (the inference
  transform of Ioffe & Szegedy, ICML 2015, Algorithm 2).  All four
  vectors live in the `batch_stats` collection, never in `params`, so a
  frozen network has nothing in its BN layers for the optimiser to update and
  needs no optimiser mask.  Running in training mode changes nothing.

  Attributes:
    epsilon: added to the variance.
    dtype: computation dtype; the statistics are stored in float32 and folded
      into one multiply-add in float32 before the cast.
  """
  epsilon: float = BN_EPSILON
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """Normalises (..., C) `x` channel-wise; returns the same shape in `dtype`."""
    channels = x.shape[-1]
    def stat(name, init):
      return self.variable('batch_stats', name, init, (channels,),
                           jnp.float32).value
    scale = stat('scale', jnp.ones)
    bias = stat('bias', jnp.zeros)
    mean = stat('mean', jnp.zeros)
    var = stat('var', jnp.ones)
    multiplier = scale * lax.rsqrt(var + self.epsilon)
    offset = bias - mean * multiplier
    return (x.astype(self.dtype) * multiplier.astype(self.dtype)
            + offset.astype(self.dtype))


def batch_norm(frozen: bool, train: bool, dtype: Dtype = jnp.float32,
               name: str | None = None) -> nn.Module:
  """The BN layer of a backbone: `FrozenBatchNorm`, or a trained `nn.BatchNorm`.

  The trained variant uses PyTorch's momentum (0.1 = Flax 0.9) and eps
  (1e-5) and batch statistics when `train` (over the whole global batch
  under jit).  One difference: Flax updates the running variance with the
  biased batch variance, PyTorch with the unbiased one (× n / (n − 1), n
  values per channel); it matters only where n is small, e.g. UPerNet's
  1×1 pyramid-pooling branch (n = batch size; docs/fidelity.md).
  """
  if frozen:
    return FrozenBatchNorm(dtype=dtype, name=name)
  return nn.BatchNorm(use_running_average=not train, momentum=BN_MOMENTUM,
                      epsilon=BN_EPSILON, dtype=dtype,
                      param_dtype=jnp.float32, name=name)

