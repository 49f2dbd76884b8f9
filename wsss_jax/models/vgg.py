"""VGG-16 DeepLab-LargeFOV backbone (BANA and LPG segmentation networks).

Topology (docs/implementation_notes.md, "Networks and initialisation"; Chen
et al., "Semantic Image Segmentation
with Deep Convolutional Nets and Fully Connected CRFs", ICLR 2015):

  conv1_1..conv5_3   3x3, bias, ReLU; conv5_* dilation 2 (padding 2)
  pool1..pool3       max 3x3, stride 2, pad 1 (floor mode, -inf padding)
  pool4, pool5       max 3x3, stride 1, pad 1
  pool5a             average 3x3, stride 1, pad 1, zero padding counted (/9)
  fc6                3x3, dilation `fc6_dilation` (12 = LargeFOV, 1 = BANA's
                     stage-1 Labeler), -> fc_dim, ReLU, channel dropout
  fc7                1x1 -> fc_dim, ReLU, channel dropout

Output stride 8: 321 -> 161 -> 81 -> 41.  Module names are those of the
DeepLab caffe weights, so converted `vgg16_20M` weights map one to one.

`batch_norm=True` adds a trained BatchNorm after every conv1..conv5 layer (the
torchvision VGG16-BN placement; `conv1_1_bn`, ...).  The papers' networks do
not have it; the embedded benchmark's small from-scratch backbone uses it so
that it trains in a few hundred steps.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from wsss_jax.models import layers

# (base channels, number of 3x3 convs) of the five VGG-16 blocks.
VGG16_BLOCKS = ((64, 2), (128, 2), (256, 3), (512, 3), (512, 3))


class VGG16LargeFOV(nn.Module):
  """DeepLab-LargeFOV VGG-16 feature extractor (everything before fc8).

  Attributes:
    width: multiplies the conv1..conv5 channel counts (64..512, at least 1).
    fc6_dilation: dilation (= padding) of the 3x3 fc6 conv.
    fc_dim: channels of fc6 and fc7 (1024 in DeepLab-LargeFOV).
    dropout: channel-dropout rate after fc6 and fc7 (PyTorch `Dropout2d`).
    batch_norm: trained BatchNorm after each conv1..conv5 layer.
    dtype: computation dtype; parameters are float32.
  """
  width: float = 1.0
  fc6_dilation: int = 12
  fc_dim: int = 1024
  dropout: float = 0.5
  batch_norm: bool = False
  dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> dict:
    """Runs the backbone.

    Args:
      x: (B, H, W, 3) normalised images.
      train: enables dropout (needs the 'dropout' rng when dropout > 0).

    Returns:
      {'features': (B, h, w, fc_dim) fc7 activation after dropout, in
      `dtype`, h = ceil(ceil(ceil(H / 2) / 2) / 2); 'levels': {'c3': conv3_3
      (stride 4), 'c4': conv4_3 (stride 8), 'c5': the fc7 features} for
      pyramid decoders}.
    """
    x = x.astype(self.dtype)
    levels = {}
    for block, (base, repeats) in enumerate(VGG16_BLOCKS, start=1):
      dilation = 2 if block == 5 else 1
      for index in range(1, repeats + 1):
        x = layers.conv2d(
            layers.scaled_channels(base, self.width), 3, padding=dilation,
            dilation=dilation, dtype=self.dtype,
            name=f'conv{block}_{index}')(x)
        if self.batch_norm:
          x = layers.batch_norm(False, train, self.dtype,
                                name=f'conv{block}_{index}_bn')(x)
        x = nn.relu(x)
      if block in (3, 4):
        levels[f'c{block}'] = x
      x = layers.max_pool2d(x, 3, stride=2 if block <= 3 else 1, padding=1)
    x = layers.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=True)
    x = layers.conv2d(self.fc_dim, 3, padding=self.fc6_dilation,
                      dilation=self.fc6_dilation, dtype=self.dtype,
                      name='fc6')(x)
    x = layers.channel_dropout(self.dropout, train)(nn.relu(x))
    x = layers.conv2d(self.fc_dim, 1, dtype=self.dtype, name='fc7')(x)
    x = layers.channel_dropout(self.dropout, train)(nn.relu(x))
    levels['c5'] = x
    return {'features': x, 'levels': levels}
