"""The k×k convolution of every backbone: `nn.Conv`'s parameters, two exact
rewrites that make it cheaper.

1. **Taps that read only padding are dropped** (`live_taps`, every backend).
   A dilated kernel larger than its feature map has rows or columns of taps
   whose whole receptive field lies in the zero padding: LargeFOV's fc6
   (3×3, dilation 12) on the 12×12 map of a 96² crop is a 1×1 convolution
   in disguise.  Slicing those taps off the kernel (and the padding with
   them) gives the same output with up to 9× fewer multiply-adds; their
   kernel gradient is exactly zero either way.
2. **The kernel gradient as one matrix product per tap** (`tap_kernel_grad`,
   XLA:CPU only, large layers only; `use_tap_kernel_grad`).  XLA:CPU
   computes a convolution's kernel gradient with a general convolution that
   falls off a cliff on some large layers (DeepLab's 128→128 at 161²:
   0.74 s, against 0.21 s as nine dots; fc6 512→1024: 0.44 against 0.23 s;
   docs/implementation_notes.md, "Speed").  Accelerators keep XLA's own.

Both change only the order of floating-point sums (relative 1e-6).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

Dtype = Any
Initializer = Callable[..., jax.Array]
Padding = tuple[tuple[int, int], tuple[int, int]]

_DIMENSIONS = ('NHWC', 'HWIO', 'NHWC')

# The XLA:CPU layers where nine dots beat XLA's kernel gradient (measured,
# docs/implementation_notes.md "Speed"): >= 128 channels in and out, and
# either >= 2^19 channel pairs (LargeFOV's fc6, 512 -> 1024) or >= 40 000
# output pixels per step (DeepLab's 128 -> 128 at 161², batch 2).  Elsewhere
# (ResNet's 3×3s at 41², ASPP's 2048 -> 21, small maps) XLA's is as fast or
# faster.
_TAP_GRAD_MIN_CHANNELS = 128
_TAP_GRAD_CHANNEL_PAIRS = 2**19
_TAP_GRAD_PIXELS = 40_000


def output_size(size: int, kernel: int, stride: int, dilation: int,
                padding: tuple[int, int]) -> int:
  """Output length of a convolution along one axis (PyTorch's formula)."""
  span = dilation * (kernel - 1) + 1
  return (size + padding[0] + padding[1] - span) // stride + 1


def live_taps(size: int, kernel: int, stride: int, dilation: int,
              padding: tuple[int, int]) -> tuple[int, int]:
  """[first, last] kernel taps along one axis that read an input pixel.

  Output o reads input o·s + k·d − p_lo through tap k, so tap k reads only
  padding when even its last output lands before the input or its first
  output after it.  The live taps are contiguous.

  Args:
    size: input length H.
    kernel, stride, dilation: K, s, d.
    padding: (p_lo, p_hi).

  Returns:
    (first, last) with 0 <= first <= last < K; (0, K − 1) when every tap is
    live, and the middle tap range otherwise.

  Raises:
    ValueError: no output, or no tap ever reads the input.
  """
  out = output_size(size, kernel, stride, dilation, padding)
  if out < 1:
    raise ValueError(f'convolution of length {size} (kernel {kernel}, '
                     f'dilation {dilation}, padding {padding}) has no output.')
  live = [k for k in range(kernel)
          if (out - 1) * stride + k * dilation - padding[0] >= 0
          and k * dilation - padding[0] < size]
  if not live:
    raise ValueError(f'convolution of length {size}: every tap of the '
                     f'kernel {kernel} (dilation {dilation}) reads padding.')
  return live[0], live[-1]


def prune_dead_taps(kernel: jax.Array, spatial: Sequence[int],
                    strides: Sequence[int], dilation: Sequence[int],
                    padding: Padding) -> tuple[jax.Array, Padding]:
  """Drops the taps of an HWIO `kernel` that read only padding.

  Returns the sliced kernel and the padding that keeps the output size and
  alignment: removing the first `f` taps shifts every read by f·d, which the
  low padding absorbs (it may turn negative, a crop).
  """
  new_padding = []
  for axis in range(2):
    k = kernel.shape[axis]
    first, last = live_taps(spatial[axis], k, strides[axis], dilation[axis],
                            padding[axis])
    kernel = lax.slice_in_dim(kernel, first, last + 1, axis=axis)
    low, high = padding[axis]
    new_padding.append((low - first * dilation[axis],
                        high - (k - 1 - last) * dilation[axis]))
  return kernel, (new_padding[0], new_padding[1])


def _conv(x: jax.Array, kernel: jax.Array, strides: Sequence[int],
          padding: Padding, dilation: Sequence[int]) -> jax.Array:
  return lax.conv_general_dilated(x, kernel, tuple(strides), padding,
                                  rhs_dilation=tuple(dilation),
                                  dimension_numbers=_DIMENSIONS)


def tap_kernel_grad(x: jax.Array, grad_out: jax.Array,
                    kernel_shape: Sequence[int], dilation: Sequence[int],
                    padding: Padding) -> jax.Array:
  """Kernel gradient of a stride-1 convolution as one dot per tap.

  dL/dW[i, j] = Σ_{b,y,x} X_pad[b, y + i·d_h, x + j·d_w, :]ᵀ G[b, y, x, :],
  with X_pad the input padded by `padding` (negative = cropped).

  Args:
    x: (B, H, W, C) input.
    grad_out: (B, H', W', O) gradient of the output.
    kernel_shape: (K_h, K_w, C, O).
    dilation: (d_h, d_w).
    padding: ((lo, hi), (lo, hi)) of the convolution.

  Returns:
    (K_h, K_w, C, O) kernel gradient in x's dtype.
  """
  k_h, k_w, channels, _ = kernel_shape
  x_pad = lax.pad(x, jnp.zeros((), x.dtype),
                  ((0, 0, 0), (*padding[0], 0), (*padding[1], 0), (0, 0, 0)))
  height, width = grad_out.shape[1:3]
  flat_grad = grad_out.reshape(-1, grad_out.shape[-1])
  taps = []
  for i in range(k_h):
    for j in range(k_w):
      window = lax.slice(
          x_pad, (0, i * dilation[0], j * dilation[1], 0),
          (x.shape[0], i * dilation[0] + height, j * dilation[1] + width,
           channels))
      taps.append(lax.dot_general(window.reshape(-1, channels), flat_grad,
                                  (((0,), (0,)), ((), ()))))
  return jnp.stack(taps).reshape(kernel_shape).astype(x.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv_with_tap_grad(x: jax.Array, kernel: jax.Array, padding: Padding,
                        dilation: tuple[int, int]) -> jax.Array:
  return _conv(x, kernel, (1, 1), padding, dilation)


def _forward(x, kernel, padding, dilation):
  return _conv(x, kernel, (1, 1), padding, dilation), (x, kernel)


def _backward(padding, dilation, residuals, grad_out):
  x, kernel = residuals
  _, input_vjp = jax.vjp(lambda v: _conv(v, kernel, (1, 1), padding, dilation),
                         x)
  (grad_x,) = input_vjp(grad_out)
  grad_kernel = tap_kernel_grad(x, grad_out, kernel.shape, dilation, padding)
  return grad_x, grad_kernel.astype(kernel.dtype)


_conv_with_tap_grad.defvjp(_forward, _backward)


def use_tap_kernel_grad(backend: str, in_channels: int, out_channels: int,
                        out_pixels: int, strides: Sequence[int]) -> bool:
  """Whether `tap_kernel_grad` replaces XLA's kernel gradient: stride 1 on
  XLA:CPU, for the large layers where it was measured faster."""
  if backend != 'cpu' or tuple(strides) != (1, 1):
    return False
  if min(in_channels, out_channels) < _TAP_GRAD_MIN_CHANNELS:
    return False
  return (in_channels * out_channels >= _TAP_GRAD_CHANNEL_PAIRS or
          out_pixels >= _TAP_GRAD_PIXELS)


def conv2d_nhwc(x: jax.Array, kernel: jax.Array, *,
                strides: Sequence[int] = (1, 1), padding: Padding = ((0, 0),
                                                                     (0, 0)),
                dilation: Sequence[int] = (1, 1),
                backend: str | None = None) -> jax.Array:
  """`lax.conv_general_dilated` (NHWC, HWIO) with the two rewrites above.

  Args:
    x: (B, H, W, C).
    kernel: (K_h, K_w, C, O), same dtype as x.
    strides, dilation: per spatial axis.
    padding: ((lo, hi), (lo, hi)).
    backend: platform deciding the kernel gradient (default: JAX's default
      backend).

  Returns:
    (B, H', W', O), H' = `output_size` of each axis.
  """
  strides, dilation = tuple(strides), tuple(dilation)
  kernel, padding = prune_dead_taps(kernel, x.shape[1:3], strides, dilation,
                                    padding)
  out_pixels = x.shape[0] * output_size(
      x.shape[1], kernel.shape[0], strides[0], dilation[0],
      padding[0]) * output_size(x.shape[2], kernel.shape[1], strides[1],
                                dilation[1], padding[1])
  backend = backend or jax.default_backend()
  if (kernel.shape[:2] != (1, 1) and
      use_tap_kernel_grad(backend, x.shape[-1], kernel.shape[-1],
                          out_pixels, strides)):
    return _conv_with_tap_grad(x, kernel, padding, dilation)
  return _conv(x, kernel, strides, padding, dilation)


class Conv(nn.Module):
  """`nn.Conv` for NHWC inputs with square symmetric padding, computed by
  `conv2d_nhwc`.

  Same parameters as `nn.Conv` (`kernel` (K, K, C, O) HWIO, `bias` (O,), drawn
  with the same initialisers and keys), so weight files, checkpoints and
  initial values are unchanged.

  Attributes:
    features: O.
    kernel_size: K.
    stride, padding, dilation: PyTorch's `Conv2d` arguments.
    use_bias: adds `bias`.
    dtype: computation dtype; parameters are float32.
    kernel_init, bias_init: initialisers.
  """
  features: int
  kernel_size: int
  stride: int = 1
  padding: int = 0
  dilation: int = 1
  use_bias: bool = True
  dtype: Dtype = jnp.float32
  kernel_init: Initializer = nn.initializers.lecun_normal()
  bias_init: Initializer = nn.initializers.zeros

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """(B, H, W, C) -> (B, H', W', O) in `dtype`."""
    kernel = self.param(
        'kernel', self.kernel_init,
        (self.kernel_size, self.kernel_size, x.shape[-1], self.features),
        jnp.float32)
    pad = (self.padding, self.padding)
    y = conv2d_nhwc(x.astype(self.dtype), kernel.astype(self.dtype),
                    strides=(self.stride, self.stride), padding=(pad, pad),
                    dilation=(self.dilation, self.dilation))
    if self.use_bias:
      bias = self.param('bias', self.bias_init, (self.features,), jnp.float32)
      y = y + bias.astype(self.dtype)
    return y
