"""PSA/AffinityNet's wide ResNet-38 (pre-activation), output stride 8.

Wu, Shen and van den Hengel, "Wider or Deeper: Revisiting the ResNet Model
for Visual Recognition" (Pattern Recognition 2019), the 38-layer wide network
in the form PSA/AffinityNet (Ahn and Kwak, CVPR 2018) released with
MXNet-converted ImageNet weights, the backbone of RRM and PMM.  Every block is
pre-activation (BN -> ReLU before each convolution), every convolution is
bias-free, and the last three stages keep stride 1 with dilations 2 and 4:

  module             block                          channels (width 1)  side
  conv1a             3x3 conv                       3 -> 64             H
  b2, b2_1, b2_2     ResBlock, b2 stride 2          128                 H/2
  b3, b3_1, b3_2     ResBlock, b3 stride 2          256                 H/4
  b4, b4_1..b4_5     ResBlock, b4 stride 2          512                 H/8
  b5, b5_1, b5_2     ResBlock, mid 512, dilation 2  1024                H/8
                     (b5's first 3x3 dilation 1)
  b6                 Bottleneck, dilation 4,        2048                H/8
                     Dropout2d 0.3
  b7                 Bottleneck, dilation 4,        4096                H/8
                     Dropout2d 0.5
  bn7 -> ReLU        = conv6, the features          4096                H/8

(sides rounded up: 321 -> 161 -> 81 -> 41).  A block's output is the raw sum
of its two branches; the next block's `bn_branch2a` -> ReLU normalises it
(its "x_bn_relu"), and `bn7` closes the network.  The intermediate features
PSA returns and later methods read are such normalised inputs: conv3 = b4's
(256 ch, H/4), conv4 = b5's (512 ch, H/8), conv5 = b6's (1024 ch, H/8).

Module names are PSA's PyTorch names (`conv1a`, `b2`..`b7`, `bn7`; inside a
block `bn_branch2a`, `conv_branch1`, `conv_branch2a`, `bn_branch2b1`,
`conv_branch2b1`, `bn_branch2b2`, `conv_branch2b2`), which is what
`wsss_jax.tools.convert_weights --layout=psa_resnet38` produces.  PSA's
weights expect RGB input normalised with the ImageNet mean and std
(`defaults.resnet38_model` sets `weights_source='torchvision'`).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from wsss_jax.models import layers

STEM_CHANNELS = 64
# (name, in, mid, out, stride, first dilation, dilation) of the two-conv
# blocks, at width 1.
RES_BLOCKS = (
    ('b2', 64, 128, 128, 2, 1, 1),
    ('b2_1', 128, 128, 128, 1, 1, 1),
    ('b2_2', 128, 128, 128, 1, 1, 1),
    ('b3', 128, 256, 256, 2, 1, 1),
    ('b3_1', 256, 256, 256, 1, 1, 1),
    ('b3_2', 256, 256, 256, 1, 1, 1),
    ('b4', 256, 512, 512, 2, 1, 1),
    ('b4_1', 512, 512, 512, 1, 1, 1),
    ('b4_2', 512, 512, 512, 1, 1, 1),
    ('b4_3', 512, 512, 512, 1, 1, 1),
    ('b4_4', 512, 512, 512, 1, 1, 1),
    ('b4_5', 512, 512, 512, 1, 1, 1),
    ('b5', 512, 512, 1024, 1, 1, 2),
    ('b5_1', 1024, 512, 1024, 1, 2, 2),
    ('b5_2', 1024, 512, 1024, 1, 2, 2),
)
# (name, in, out, dilation, Dropout2d rate) of the bottleneck blocks, width 1.
BOTTLENECK_BLOCKS = (
    ('b6', 1024, 2048, 4, 0.3),
    ('b7', 2048, 4096, 4, 0.5),
)


def _conv(features: int, kernel: int, stride: int, dilation: int,
          dtype: layers.Dtype, name: str) -> nn.Module:
  """A bias-free convolution, padded to keep the side (÷ stride)."""
  return layers.conv2d(features, kernel, stride=stride,
                       padding=dilation * (kernel // 2), dilation=dilation,
                       use_bias=False, dtype=dtype,
                       kernel_init=layers.HE_NORMAL_FAN_OUT, name=name)


class PreActBlock(nn.Module):
  """One pre-activation block of PSA's ResNet-38, either kind.

  x_bn_relu = ReLU(bn_branch2a(x)); branch 2 runs `convs` on it in turn
  (conv_branch2a, conv_branch2b1[, conv_branch2b2]) with BN -> ReLU ->
  Dropout2d between them (bn_branch2b1, bn_branch2b2); branch 1 is the 1x1
  `conv_branch1` of x_bn_relu (stride of the first conv) with `projection`,
  else the raw input x itself, not its BN-ReLU, as in PSA.  The two kinds:

    ResBlock      3x3 (in -> mid, stride s, first dilation), 3x3 (-> out,
                  dilation); no dropout.
    Bottleneck    1x1 (-> out/4), 3x3 (-> out/2, dilation), 1x1 (-> out);
                  Dropout2d after both inner BN-ReLUs.

  Attributes:
    convs: (features, kernel, stride, dilation) of each branch-2 conv;
      padding = dilation * (kernel // 2).
    projection: a 1x1 `conv_branch1` shortcut (PSA: in != out or stride 2).
    dropout: Dropout2d rate, active only when `train` (0: none).
    frozen_bn: `FrozenBatchNorm` instead of a trained `nn.BatchNorm`.
    dtype: computation dtype.
  """
  convs: tuple[tuple[int, int, int, int], ...]
  projection: bool = False
  dropout: float = 0.0
  frozen_bn: bool = True
  dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array,
               train: bool = False) -> tuple[jax.Array, jax.Array]:
    """(B, H, W, C) -> ((B, H', W', out) branch sum, (B, H, W, C)
    x_bn_relu), H' = ceil(H / stride of the first conv)."""
    norm = lambda name: layers.batch_norm(self.frozen_bn, train, self.dtype,
                                          name=name)
    x_bn_relu = nn.relu(norm('bn_branch2a')(x))
    h = x_bn_relu
    for index, (features, kernel, stride, dilation) in enumerate(self.convs):
      if index:
        h = nn.relu(norm(f'bn_branch2b{index}')(h))
        h = layers.channel_dropout(self.dropout, train)(h)
      name = 'conv_branch2a' if index == 0 else f'conv_branch2b{index}'
      h = _conv(features, kernel, stride, dilation, self.dtype, name)(h)
    if self.projection:
      x = _conv(self.convs[-1][0], 1, self.convs[0][2], 1, self.dtype,
                'conv_branch1')(x_bn_relu)
    return x.astype(self.dtype) + h, x_bn_relu


class ResNet38(nn.Module):
  """PSA's ResNet-38 (see the module docstring), output stride 8.

  Attributes:
    width: multiplies every channel count (stem 64 .. features 4096).
    frozen_bn: frozen statistics and affine parameters (RRM's practice).
    dtype: computation dtype; parameters are float32.
  """
  width: float = 1.0
  frozen_bn: bool = True
  dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> dict:
    """Runs the backbone.

    Args:
      x: (B, H, W, 3) normalised RGB images.
      train: Dropout2d in b6/b7 (needs the 'dropout' rng) and batch
        statistics for a trained BN (ignored by frozen BN).

    Returns:
      {'features': conv6 (B, h, w, 4096 * width), 'conv4': (B, h, w,
      512 * width), 'conv5': (B, h, w, 1024 * width), 'levels': {'c2':
      conv3 (B, ceil(H / 4), ceil(W / 4), 256 * width), 'c3': conv4, 'c4':
      conv5, 'c5': conv6}} in `dtype`, h = ceil(ceil(ceil(H / 2) / 2) / 2)
      (321 -> 41); the levels feed pyramid decoders as ResNet-101's do.
    """
    scaled = lambda channels: layers.scaled_channels(channels, self.width)
    x = _conv(scaled(STEM_CHANNELS), 3, 1, 1, self.dtype, 'conv1a')(
        x.astype(self.dtype))
    normalised = {}      # each block's x_bn_relu, by block name
    for name, c_in, mid, c_out, stride, first_dilation, dilation in RES_BLOCKS:
      x, normalised[name] = PreActBlock(
          convs=((scaled(mid), 3, stride, first_dilation),
                 (scaled(c_out), 3, 1, dilation)),
          projection=c_in != c_out or stride != 1, frozen_bn=self.frozen_bn,
          dtype=self.dtype, name=name)(x, train)
    for name, c_in, c_out, dilation, dropout in BOTTLENECK_BLOCKS:
      x, normalised[name] = PreActBlock(
          convs=((scaled(c_out // 4), 1, 1, 1),
                 (scaled(c_out // 2), 3, 1, dilation),
                 (scaled(c_out), 1, 1, 1)),
          projection=c_in != c_out, dropout=dropout,
          frozen_bn=self.frozen_bn, dtype=self.dtype, name=name)(x, train)
    conv6 = nn.relu(layers.batch_norm(self.frozen_bn, train, self.dtype,
                                      name='bn7')(x))
    conv3, conv4, conv5 = (normalised[name] for name in ('b4', 'b5', 'b6'))
    return {'features': conv6, 'conv4': conv4, 'conv5': conv5,
            'levels': {'c2': conv3, 'c3': conv4, 'c4': conv5, 'c5': conv6}}
