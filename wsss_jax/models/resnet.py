"""ResNet-101 backbone for DeepLab-v2 (MSRA/caffe or torchvision layout).

He et al., "Deep Residual Learning for Image Recognition" (CVPR 2016) with
the DeepLab-v2 changes (Chen et al., TPAMI 2018): the last two stages keep
stride 1 and use dilation 2 and 4, giving output stride 8 (321 -> 41).

Two layouts of the bottleneck exist and pretrained weights only work with
their own (docs/implementation_notes.md, "Networks and initialisation"):
  * MSRA/caffe (DeepLab-v2 init, kazuto1011/deeplab-pytorch, BANA): the
    stride-2 sits on the first 1x1 conv; the stem max-pool uses ceil mode.
  * torchvision v1.5 (LPG, Box2Seg): the stride sits on the 3x3 conv; the
    stem max-pool uses floor mode.

Module names (stem `conv1`/`bn1`, stages `layer1`..`layer4` = C2..C5, blocks
`block1`.., inside a block `conv1/bn1` (1x1 reduce), `conv2/bn2` (3x3),
`conv3/bn3` (1x1 expand), `shortcut_conv/shortcut_bn` (projection)) are what
`wsss_jax.tools.convert_weights` produces.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from wsss_jax.models import layers

STAGE_CHANNELS = (256, 512, 1024, 2048)
STEM_CHANNELS = 64
BOTTLENECK_EXPANSION = 4

# output stride -> (per-stage strides, per-stage dilations) for C2..C5.
STAGE_GEOMETRY = {
    8: ((1, 2, 1, 1), (1, 1, 2, 4)),     # DeepLab-v2
    16: ((1, 2, 2, 1), (1, 1, 1, 2)),
    32: ((1, 2, 2, 2), (1, 1, 1, 1)),    # plain ResNet (UPerNet, Box2Seg)
}


class Bottleneck(nn.Module):
  """One bottleneck residual unit: 1x1 -> 3x3 (dilated) -> 1x1, plus shortcut.

  Every block of a stage uses the stage's dilation (DeepLab-v2 practice, also
  LPG's dilation surgery); only the first block strides and projects.

  Attributes:
    features: output channels (the bottleneck width is features // 4).
    stride: spatial stride of the block.
    dilation: dilation (= padding) of the 3x3 conv.
    projection: 1x1 conv + BN shortcut instead of the identity.
    stride_in_1x1: stride on the first 1x1 conv (MSRA) or on the 3x3 (v1.5).
    frozen_bn: `FrozenBatchNorm` instead of a trained `nn.BatchNorm`.
    dtype: computation dtype.
  """
  features: int
  stride: int = 1
  dilation: int = 1
  projection: bool = False
  stride_in_1x1: bool = True
  frozen_bn: bool = True
  dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """(B, H, W, C_in) -> (B, H', W', features), H' = ceil(H / stride)."""
    mid = max(1, self.features // BOTTLENECK_EXPANSION)
    def conv(features, kernel, stride, dilation, name):
      return layers.conv2d(
          features, kernel, stride=stride, padding=dilation * (kernel // 2),
          dilation=dilation, use_bias=False, dtype=self.dtype,
          kernel_init=layers.HE_NORMAL_FAN_OUT, name=name)
    def norm(name):
      return layers.batch_norm(self.frozen_bn, train, self.dtype, name=name)

    stride_1x1, stride_3x3 = ((self.stride, 1) if self.stride_in_1x1
                              else (1, self.stride))
    h = nn.relu(norm('bn1')(conv(mid, 1, stride_1x1, 1, 'conv1')(x)))
    h = conv(mid, 3, stride_3x3, self.dilation, 'conv2')(h)
    h = nn.relu(norm('bn2')(h))
    h = norm('bn3')(conv(self.features, 1, 1, 1, 'conv3')(h))
    if self.projection:
      x = conv(self.features, 1, self.stride, 1, 'shortcut_conv')(x)
      x = norm('shortcut_bn')(x)
    return nn.relu(h + x.astype(h.dtype))


class ResLayer(nn.Module):
  """One stage: `num_blocks` bottlenecks named block1.., the first projecting.

  Attributes are those of `Bottleneck`; `stride` applies to the first block.
  """
  features: int
  num_blocks: int
  stride: int = 1
  dilation: int = 1
  stride_in_1x1: bool = True
  frozen_bn: bool = True
  dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """(B, H, W, C_in) -> (B, ceil(H / stride), ceil(W / stride), features)."""
    for index in range(self.num_blocks):
      x = Bottleneck(
          features=self.features,
          stride=self.stride if index == 0 else 1,
          dilation=self.dilation,
          projection=index == 0,
          stride_in_1x1=self.stride_in_1x1,
          frozen_bn=self.frozen_bn,
          dtype=self.dtype,
          name=f'block{index + 1}')(x, train)
    return x


class ResNetDeepLab(nn.Module):
  """Dilated ResNet (default: ResNet-101, MSRA layout, output stride 8).

  Attributes:
    blocks: bottlenecks per stage C2..C5; (3, 4, 23, 3) = ResNet-101.
    width: multiplies every channel count (stem 64, stages 256..2048).
    stride_in_1x1: MSRA layout (True) or torchvision v1.5 layout (False).
    stem_ceil_mode: ceil-mode stem max-pool (MSRA/DeepLab) or floor (torchvision).
    output_stride: 8 (DeepLab-v2), 16, or 32 (no dilation).
    frozen_bn: frozen statistics and affine parameters (DeepLab-v2 practice).
    dtype: computation dtype; parameters are float32.
  """
  blocks: Sequence[int] = (3, 4, 23, 3)
  width: float = 1.0
  stride_in_1x1: bool = True
  stem_ceil_mode: bool = True
  output_stride: int = 8
  frozen_bn: bool = True
  dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> dict:
    """Runs the backbone.

    Args:
      x: (B, H, W, 3) normalised images.
      train: batch statistics for a trained BN (ignored by frozen BN).

    Returns:
      {'features': C5 (B, h, w, 2048 * width), 'levels': {'c2': stride 4,
      'c3': stride 8, 'c4', 'c5': stride `output_stride` (at most 8 for c3)}},
      all in `dtype`.
    """
    if len(self.blocks) != 4 or min(self.blocks) < 1:
      raise ValueError(f'resnet blocks must be 4 positive counts, got '
                       f'{tuple(self.blocks)}')
    if self.output_stride not in STAGE_GEOMETRY:
      raise ValueError(f'output_stride must be one of '
                       f'{sorted(STAGE_GEOMETRY)}, got {self.output_stride}')
    strides, dilations = STAGE_GEOMETRY[self.output_stride]
    x = x.astype(self.dtype)
    x = layers.conv2d(layers.scaled_channels(STEM_CHANNELS, self.width), 7,
                      stride=2, padding=3, use_bias=False, dtype=self.dtype,
                      kernel_init=layers.HE_NORMAL_FAN_OUT, name='conv1')(x)
    x = nn.relu(layers.batch_norm(self.frozen_bn, train, self.dtype,
                                  name='bn1')(x))
    x = layers.max_pool2d(x, 3, stride=2, padding=1,
                          ceil_mode=self.stem_ceil_mode)
    levels = {}
    for stage, count in enumerate(self.blocks):
      x = ResLayer(
          features=layers.scaled_channels(STAGE_CHANNELS[stage], self.width),
          num_blocks=count,
          stride=strides[stage],
          dilation=dilations[stage],
          stride_in_1x1=self.stride_in_1x1,
          frozen_bn=self.frozen_bn,
          dtype=self.dtype,
          name=f'layer{stage + 1}')(x, train)
      levels[f'c{stage + 2}'] = x
    return {'features': x, 'levels': levels}
