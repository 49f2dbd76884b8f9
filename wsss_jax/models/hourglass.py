"""LPG's pseudo-mask generator: a one-stack CenterNet hourglass, shrunk.

Xie et al., "Learning Class-Agnostic Pseudo Mask Generation for
Box-Supervised Semantic Segmentation" (CVPR 2021) generate a pseudo mask per
box with the "exkp" HourglassNet of CenterNet (Zhou, Wang and Krähenbühl,
"Objects as Points", 2019; itself CornerNet's Hourglass-104 without corner
pooling), built in the official code as `HourglassNet({'fm': 2}, 1,
input_channel=4 or 5)`: one stack, channels cut from [256, 256, 384, 384,
384, 512] to [96, 96, 128, 128, 128, 192] and a 48-channel stem.  Input
channels are the caller's: LPG feeds [box mask, RGB] (4, first round) or
[segmentation probability of the box's class, box mask, RGB] (5, later
rounds).

Every block is CenterNet's `residual`: conv3x3(stride) -> BN -> ReLU ->
conv3x3 -> BN, plus a skip (identity, or 1x1 conv(stride) -> BN when the
stride is 2 or the channels change), ReLU of the sum; every convolution but
the head's is bias-free.  At width 1:

  module     structure                               channels        side
  pre        7x7/2 conv-BN-ReLU, residual (stride 2)  C -> 48 -> 96   H/4
  hourglass  5 levels (below), one stack              96              H/4
  cnv        3x3 conv-BN-ReLU                         96 -> 256       H/4
  fm         3x3 conv (bias)-ReLU, 1x1 conv (bias)    256 -> 96 -> 2  H/4

A hourglass level (CenterNet's `kp_module`; curr -> next channels, `m`
residuals per list) returns up1(x) + nearest-x2(low3(low2(low1(x)))):

  up1_0..up1_{m-1}    residuals at curr, full resolution
  low1_0..low1_{m-1}  residuals curr -> next, the first with stride 2 (the
                      pool layer is the identity: the strided conv pools)
  low2                the next level, or at the bottom 4 residuals at next
                      (low2_0..low2_3)
  low3_0..low3_{m-1}  residuals at next, the last next -> curr

Levels 96->96, 96->128, 128->128, 128->128, 128->192, m = 2 each; the
innermost map is H/128, so H and W must be multiples of 128 (512 and 640
work, 321 does not: up1 and the upsampled low3 would differ in size).
Output channel 1 is the foreground score (LPG's argmax).

Trainable parameters (conv kernels and biases, BN scale and bias; running
statistics not counted), `parameter_count`: 12,120,370 with 5 input
channels, 12,118,018 with 4; by module pre 141,456 (5 channels), hourglass
11,535,744, cnv 221,696, fm 221,474.

Module names follow the PyTorch state dict, so that
`wsss_jax.tools.convert_weights --layout=lpg_hourglass` is a rename: an
nn.Sequential's children inside a module become `<list>_<index>` (`up1.0`
-> `up1_0`), top-level ones `layers_<index>` (Flax's nn.Sequential naming:
`pre.1` -> `pre/layers_1`, `fm.0.1` -> `fm/layers_1`); a residual's skip
`skip.0`/`skip.1` becomes `skip_conv`/`skip_bn`; the one stack's
`kps.0`/`cnvs.0` become `hourglass`/`cnv`.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from wsss_jax.models import layers

STEM_CHANNELS = 48
# Channels and residuals per list of each hourglass level, outermost first;
# the last entry is the bottom (CenterNet's `dims` and `modules`).
DIMS = (96, 96, 128, 128, 128, 192)
BLOCKS = (2, 2, 2, 2, 2, 4)
CNV_CHANNELS = 256
HEAD_NAME = 'fm'
# The stem's two stride-2 layers divide the side by 4 before the hourglass.
STEM_STRIDE = 4

# PyTorch's default Conv2d initialisation (LPG trains the hourglass from it):
# kernel and bias uniform in ±1 / sqrt(fan_in) (kaiming_uniform with a=√5).
TORCH_KERNEL_INIT = nn.initializers.variance_scaling(1.0 / 3.0, 'fan_in',
                                                     'uniform')


def torch_bias_init(fan_in: int) -> layers.Initializer:
  """PyTorch's default Conv2d bias initialiser: U(±1 / sqrt(fan_in))."""
  bound = 1.0 / math.sqrt(fan_in)
  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)
  return init


def input_multiple(depth: int = len(DIMS) - 1) -> int:
  """The side an input must be a multiple of: the stem's 4 times 2**depth
  (128 for LPG's five levels)."""
  return STEM_STRIDE * 2 ** depth


def parameter_count(variables: Any) -> int:
  """Trainable parameters: elements of the 'params' collection of
  `variables` (arrays or ShapeDtypeStructs); BN running statistics and a
  frozen BN's affine vectors live in 'batch_stats' and are not counted."""
  params = variables.get('params', {}) if hasattr(variables, 'get') else {}
  return int(sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(params)))


def _conv(features: int, kernel: int, stride: int, use_bias: bool,
          fan_in: int, dtype: layers.Dtype, name: str) -> nn.Module:
  """A PyTorch-initialised convolution padded by (kernel - 1) // 2."""
  return layers.conv2d(features, kernel, stride=stride,
                       padding=(kernel - 1) // 2, use_bias=use_bias,
                       dtype=dtype, kernel_init=TORCH_KERNEL_INIT,
                       bias_init=torch_bias_init(fan_in), name=name)


class Convolution(nn.Module):
  """CenterNet's `convolution`: k x k conv (stride s) -> BN -> ReLU, or with
  `with_bn=False` conv with bias -> ReLU.  Children `conv`[, `bn`].

  Attributes:
    features: output channels.
    kernel_size: k (padding (k - 1) // 2).
    stride: s.
    with_bn: BN after a bias-free conv (else a conv bias, no BN).
    frozen_bn: `FrozenBatchNorm` instead of a trained `nn.BatchNorm`.
    dtype: computation dtype.
  """
  features: int
  kernel_size: int
  stride: int = 1
  with_bn: bool = True
  frozen_bn: bool = False
  dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """(B, H, W, C) -> (B, ceil(H / s), ceil(W / s), features)."""
    fan_in = self.kernel_size ** 2 * x.shape[-1]
    x = _conv(self.features, self.kernel_size, self.stride,
              not self.with_bn, fan_in, self.dtype, 'conv')(x)
    if self.with_bn:
      x = layers.batch_norm(self.frozen_bn, train, self.dtype, name='bn')(x)
    return nn.relu(x)


class Residual(nn.Module):
  """CenterNet's `residual`: ReLU(bn2(conv2(ReLU(bn1(conv1(x))))) + skip),
  3x3 convs (conv1 strided), skip = x or skip_bn(skip_conv(x)) (1x1,
  strided) when the stride or the channel count changes.

  Attributes:
    features: output channels.
    stride: of conv1 and the skip conv.
    frozen_bn: `FrozenBatchNorm` instead of a trained `nn.BatchNorm`.
    dtype: computation dtype.
  """
  features: int
  stride: int = 1
  frozen_bn: bool = False
  dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """(B, H, W, C) -> (B, ceil(H / stride), ceil(W / stride), features)."""
    norm = lambda name: layers.batch_norm(self.frozen_bn, train, self.dtype,
                                          name=name)
    channels = x.shape[-1]
    h = _conv(self.features, 3, self.stride, False, 9 * channels, self.dtype,
              'conv1')(x)
    h = nn.relu(norm('bn1')(h))
    h = _conv(self.features, 3, 1, False, 9 * self.features, self.dtype,
              'conv2')(h)
    h = norm('bn2')(h)
    if self.stride != 1 or channels != self.features:
      x = _conv(self.features, 1, self.stride, False, channels, self.dtype,
                'skip_conv')(x)
      x = norm('skip_bn')(x)
    return nn.relu(h + x.astype(h.dtype))


def upsample_nearest2(x: jax.Array) -> jax.Array:
  """PyTorch `nn.Upsample(scale_factor=2)` (nearest): every cell repeated
  2 x 2.  (B, h, w, C) -> (B, 2h, 2w, C)."""
  return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


class HourglassLevel(nn.Module):
  """One level of the hourglass and, recursively, those below it
  (CenterNet's `kp_module`; see the module docstring).

  Attributes:
    dims: channels of this level and those below, e.g. (96, 96, 128, ...).
    blocks: residuals per list, aligned with `dims`; blocks[0] for this
      level's up1/low1/low3, blocks[-1] for the bottom.
    frozen_bn, dtype: as in `Residual`.
  """
  dims: tuple[int, ...]
  blocks: tuple[int, ...]
  frozen_bn: bool = False
  dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """(B, H, W, dims[0]) -> the same shape; H, W divisible by
    2**(len(dims) - 1)."""
    curr, nxt = self.dims[0], self.dims[1]
    count = self.blocks[0]
    block = lambda features, name, stride=1: Residual(
        features, stride=stride, frozen_bn=self.frozen_bn, dtype=self.dtype,
        name=name)
    up1 = x
    for i in range(count):
      up1 = block(curr, f'up1_{i}')(up1, train)
    # make_hg_layer: the first residual halves the side (no max-pool).
    low = x
    for i in range(count):
      low = block(nxt, f'low1_{i}', stride=2 if i == 0 else 1)(low, train)
    if len(self.dims) > 2:
      low = HourglassLevel(self.dims[1:], self.blocks[1:],
                           frozen_bn=self.frozen_bn, dtype=self.dtype,
                           name='low2')(low, train)
    else:
      for i in range(self.blocks[1]):
        low = block(nxt, f'low2_{i}')(low, train)
    # make_layer_revr: all but the last at next, the last back to curr.
    for i in range(count):
      low = block(curr if i == count - 1 else nxt, f'low3_{i}')(low, train)
    return up1 + upsample_nearest2(low).astype(up1.dtype)


class Stem(nn.Module):
  """`pre`: layers_0 = 7x7/2 `Convolution` (-> stem channels), layers_1 =
  `Residual` (-> out channels, stride 2).  (B, H, W, C) -> (B, H/4, W/4,
  out)."""
  stem: int
  features: int
  frozen_bn: bool = False
  dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    x = Convolution(self.stem, 7, stride=2, frozen_bn=self.frozen_bn,
                    dtype=self.dtype, name='layers_0')(x, train)
    return Residual(self.features, stride=2, frozen_bn=self.frozen_bn,
                    dtype=self.dtype, name='layers_1')(x, train)


class Head(nn.Module):
  """A CenterNet head (`make_kp_layer`): layers_0 = 3x3 `Convolution` with
  bias, no BN (-> hidden), ReLU; layers_1 = 1x1 conv with bias (-> outputs).
  (B, H, W, C) -> (B, H, W, outputs) in `dtype`."""
  hidden: int
  outputs: int
  dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = Convolution(self.hidden, 3, with_bn=False, dtype=self.dtype,
                    name='layers_0')(x)
    return _conv(self.outputs, 1, 1, True, self.hidden, self.dtype,
                 'layers_1')(x)


def _validate_sizes(dims: Sequence[int], blocks: Sequence[int]) -> None:
  if len(dims) < 2 or len(dims) != len(blocks):
    raise ValueError(f'dims {tuple(dims)} and blocks {tuple(blocks)} must '
                     f'have the same length >= 2')
  if min(blocks) < 1:
    raise ValueError(f'blocks must be >= 1, got {tuple(blocks)}')


class HourglassNet(nn.Module):
  """LPG's one-stack hourglass (see the module docstring).

  Attributes:
    width: multiplies every channel count (stem 48, dims, cnv 256; rounded,
      at least 1), not the outputs; 1.0 is LPG's network.
    num_outputs: channels of the `fm` head (LPG: 2, background/foreground).
    dims: hourglass channels per level, outermost first, at width 1.
    blocks: residuals per list per level (the last: the bottom).
    frozen_bn: `FrozenBatchNorm` instead of a trained `nn.BatchNorm` (LPG
      trains every BN, so False).
    dtype: computation dtype; parameters are float32, logits float32.
  """
  width: float = 1.0
  num_outputs: int = 2
  dims: tuple[int, ...] = DIMS
  blocks: tuple[int, ...] = BLOCKS
  frozen_bn: bool = False
  dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> dict:
    """Runs the generator.

    Args:
      x: (B, H, W, C) inputs, H and W multiples of `input_multiple()` (128).
      train: batch statistics for a trained BN (update 'batch_stats', which
        must then be mutable).

    Returns:
      {'logits': (B, H / 4, W / 4, num_outputs) float32, 'features': the
      `cnv` output (B, H / 4, W / 4, 256 * width) in `dtype`}.

    Raises:
      ValueError: H or W not a multiple of `input_multiple()`, naming the
        shape; bad `width`, `dims` or `blocks`.
    """
    _validate_sizes(self.dims, self.blocks)
    if self.width <= 0:
      raise ValueError(f'width must be > 0, got {self.width}')
    multiple = input_multiple(len(self.dims) - 1)
    if x.ndim != 4 or x.shape[1] % multiple or x.shape[2] % multiple:
      raise ValueError(f'HourglassNet needs (B, H, W, C) inputs with H and W '
                       f'multiples of {multiple} (the stem /4 times 2**'
                       f'{len(self.dims) - 1} levels), got shape '
                       f'{tuple(x.shape)}')
    scaled = lambda channels: layers.scaled_channels(channels, self.width)
    dims = tuple(scaled(d) for d in self.dims)
    common = dict(frozen_bn=self.frozen_bn, dtype=self.dtype)
    x = x.astype(self.dtype)
    x = Stem(scaled(STEM_CHANNELS), dims[0], **common, name='pre')(x, train)
    x = HourglassLevel(dims, tuple(self.blocks), **common,
                       name='hourglass')(x, train)
    cnv = Convolution(scaled(CNV_CHANNELS), 3, **common, name='cnv')(x, train)
    logits = Head(dims[0], self.num_outputs, dtype=self.dtype,
                  name=HEAD_NAME)(cnv)
    return {'logits': logits.astype(jnp.float32), 'features': cnv}


def abstract_variables(model: HourglassNet, input_channels: int,
                       size: int | None = None) -> dict:
  """Variable shapes/dtypes of `model` for `input_channels`-channel inputs
  (jax.ShapeDtypeStruct leaves), traced at the smallest valid side unless
  `size` is given; nothing is computed."""
  side = size or input_multiple(len(model.dims) - 1)
  images = jax.ShapeDtypeStruct((1, side, side, input_channels), jnp.float32)
  return jax.eval_shape(
      lambda rng, x: model.init(rng, x, train=False),
      jax.ShapeDtypeStruct((2,), jnp.uint32), images)
