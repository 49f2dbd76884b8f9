"""PSPNet (Zhao et al., CVPR 2017) + auxiliary FCN head: PMM's FSSS network.

PMM trains its fully-supervised segmentation network on the pseudo-masks with
MMSegmentation 0.8's PSPNet: a PSP head on the backbone's final features and
an auxiliary FCN head on an intermediate level, both with trained
(synchronised) BatchNorm and align_corners=False resizing (docs/pmm.md):

  PSP head      features (B, h, w, D)
                -> for s in pool_scales: adaptive avg-pool to (s, s), 1x1 conv
                   (no bias) + BN + ReLU, bilinear upsampling back to (h, w)
                -> concat [features, pooled maps] -> 3x3 conv (no bias) + BN
                   + ReLU (the bottleneck, 'features')
                -> Dropout2d -> 1x1 classifier with bias ('logits')
  aux FCN head  levels[aux_level] -> 3x3 conv (no bias) + BN + ReLU
                -> Dropout2d -> 1x1 classifier with bias ('aux_logits'),
                   resized to (h, w) when that level has another grid

Initialisation follows MMSegmentation's: conv-BN-ReLU kernels He normal
(fan_out), BN scale 1 and bias 0, classifiers N(0, 0.01) with zero bias.
Top-level parameter entries are 'backbone', 'head' and 'aux_head', so the
optimiser's new-layer group is ('head', 'aux_head').
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from wsss_jax.models import layers
from wsss_jax.models import upernet
from wsss_jax.models import segmenter
from wsss_jax.ops.resize import resize_bilinear


def adaptive_pool_matrix(in_size: int, out_size: int) -> np.ndarray:
  """The averaging matrix of PyTorch's 1-D adaptive average pooling.

  PSPNet's pyramid pooling module (Zhao et al., CVPR 2017, Sect. 3.2) pools
  to (s, s) bins with `AdaptiveAvgPool2d(s)`, whose bin i covers
  [floor(i·n/s), ceil((i + 1)·n/s)).  Every bin is non-empty, also when
  s > n (bins then overlap), so no division by zero can occur.

  Args:
    in_size: n, input length (>= 1).
    out_size: s, number of bins (>= 1).

  Returns:
    (s, n) float32 numpy array; row i holds 1 / |bin i| on bin i, 0 elsewhere
    (rows sum to 1).  Built on the host at trace time (static shapes).
  """
  in_size, out_size = int(in_size), int(out_size)
  if in_size < 1:
    raise ValueError(f'in_size must be >= 1, got {in_size}')
  if out_size < 1:
    raise ValueError(f'out_size (pool scale) must be >= 1, got {out_size}')
  bins = np.arange(out_size)
  starts = (bins * in_size) // out_size
  ends = -((-(bins + 1) * in_size) // out_size)
  index = np.arange(in_size)
  inside = ((index[None, :] >= starts[:, None])
            & (index[None, :] < ends[:, None]))
  return (inside / inside.sum(axis=1, keepdims=True)).astype(np.float32)


def adaptive_avg_pool2d(x: jax.Array, size: int) -> jax.Array:
  """PyTorch `AdaptiveAvgPool2d(size)` on NHWC input, as two matrix products.

  Pools rows with `adaptive_pool_matrix(H, size)` and columns with
  `adaptive_pool_matrix(W, size)` (separable: the 2-D bin average is the
  product of the row and column averages), accumulating in float32.

  Args:
    x: (B, H, W, C) float array.
    size: output side s (>= 1).

  Returns:
    (B, s, s, C) array of x's dtype.
  """
  if x.ndim != 4:
    raise ValueError(f'x must be (B, H, W, C), got shape {tuple(x.shape)}')
  rows = jnp.asarray(adaptive_pool_matrix(x.shape[1], size))
  cols = jnp.asarray(adaptive_pool_matrix(x.shape[2], size))
  pooled = jnp.einsum('sh,bhwc->bswc', rows, x.astype(jnp.float32))
  pooled = jnp.einsum('tw,bswc->bstc', cols, pooled)
  return pooled.astype(x.dtype)


def _conv_bn_relu(features: int, kernel: int, dtype: layers.Dtype, *,
                  name: str) -> nn.Module:
  """`upernet.ConvBNReLU` with mmseg's He normal (fan_out) kernels."""
  return upernet.ConvBNReLU(features, kernel, dtype,
                            kernel_init=layers.HE_NORMAL_FAN_OUT, name=name)


def _classifier(num_classes: int, dtype: layers.Dtype) -> nn.Module:
  """The 1x1 classifier with bias, N(0, 0.01) weights (mmseg `conv_seg`)."""
  return layers.conv2d(num_classes, 1, use_bias=True, dtype=dtype,
                       kernel_init=layers.CLASSIFIER_INIT, name='classifier')


class PSPHead(nn.Module):
  """PSPNet's pyramid pooling head (Zhao et al., CVPR 2017, Fig. 3).

  Submodules: `ppm_{s}` (one per pool scale), `bottleneck`, `dropout`,
  `classifier`.

  Attributes:
    num_classes: classifier outputs.
    channels: width of the pooled branches and the bottleneck (512 in PMM).
    pool_scales: pooled grid sides (1, 2, 3, 6).
    dropout: Dropout2d rate before the classifier (0.1).
    dtype: computation dtype.
  """
  num_classes: int
  channels: int = 512
  pool_scales: Sequence[int] = (1, 2, 3, 6)
  dropout: float = 0.1
  dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, features: jax.Array, train: bool = False) -> dict:
    """(B, h, w, D) -> {'logits': (B, h, w, num_classes), 'features':
    (B, h, w, channels)} in `dtype` ('features' is the bottleneck output,
    before dropout)."""
    features = features.astype(self.dtype)
    size = features.shape[1:3]
    branches = [features]
    for scale in self.pool_scales:
      pooled = adaptive_avg_pool2d(features, int(scale))
      pooled = _conv_bn_relu(self.channels, 1, self.dtype,
                          name=f'ppm_{int(scale)}')(pooled, train)
      branches.append(resize_bilinear(pooled, size, align_corners=False))
    bottleneck = _conv_bn_relu(self.channels, 3, self.dtype, name='bottleneck')(
        jnp.concatenate(branches, axis=-1), train)
    x = layers.channel_dropout(self.dropout, train, name='dropout')(bottleneck)
    return {'logits': _classifier(self.num_classes, self.dtype)(x),
            'features': bottleneck}


class FCNHead(nn.Module):
  """MMSegmentation's FCNHead with one conv and no input concatenation.

  Submodules: `conv` (conv-BN-ReLU 3x3), `dropout`, `classifier`.

  Attributes:
    num_classes: classifier outputs.
    channels: width of the 3x3 conv (256 in PMM).
    dropout: Dropout2d rate before the classifier (0.1).
    dtype: computation dtype.
  """
  num_classes: int
  channels: int = 256
  dropout: float = 0.1
  dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> dict:
    """(B, h', w', C) -> {'logits': (B, h', w', num_classes)} in `dtype`."""
    x = _conv_bn_relu(self.channels, 3, self.dtype, name='conv')(x, train)
    x = layers.channel_dropout(self.dropout, train, name='dropout')(x)
    return {'logits': _classifier(self.num_classes, self.dtype)(x)}


class PSPNet(nn.Module):
  """Backbone + PSP head + auxiliary FCN head (PMM's FSSS network).

  Attributes:
    backbone: returns {'features', 'levels'} (see `vgg`, `resnet`,
      `resnet38`); `levels` must contain `aux_level`.
    num_classes: classifier outputs (background included).
    channels: PSP head width (512 in PMM).
    pool_scales: PSP pooled grid sides ((1, 2, 3, 6)).
    aux_level: backbone level read by the aux head ('c4': ResNet layer3 /
      ResNet-38 conv5, mmseg's in_index 2).
    aux_channels: aux head width (256).
    dropout: Dropout2d rate of both heads (0.1).
    dtype: computation dtype; parameters float32, logits returned float32.
  """
  backbone: nn.Module
  num_classes: int
  channels: int = 512
  pool_scales: Sequence[int] = (1, 2, 3, 6)
  aux_level: str = 'c4'
  aux_channels: int = 256
  dropout: float = 0.1
  dtype: layers.Dtype = jnp.float32

  def __post_init__(self):
    if int(self.num_classes) < 1:
      raise ValueError(f'num_classes must be >= 1, got {self.num_classes}')
    if int(self.channels) < 1:
      raise ValueError(f'channels (model.psp_channels) must be >= 1, got '
                       f'{self.channels}')
    if int(self.aux_channels) < 1:
      raise ValueError(f'aux_channels (model.psp_aux_channels) must be >= 1, '
                       f'got {self.aux_channels}')
    scales = tuple(self.pool_scales)
    if not scales or any(int(s) != s or int(s) < 1 for s in scales):
      raise ValueError(f'pool_scales (model.psp_pool_scales) must be a '
                       f'non-empty sequence of integers >= 1, got {scales}')
    if len(set(int(s) for s in scales)) != len(scales):
      raise ValueError(f'pool_scales (model.psp_pool_scales) has duplicates: '
                       f'{scales}')
    if not 0.0 <= float(self.dropout) < 1.0:
      raise ValueError(f'dropout (model.psp_dropout) must be in [0, 1), got '
                       f'{self.dropout}')
    if not isinstance(self.aux_level, str) or not self.aux_level:
      raise ValueError(f'aux_level (model.psp_aux_level) must be a level name '
                       f'such as "c4", got {self.aux_level!r}')
    super().__post_init__()

  @nn.compact
  def __call__(self, images: jax.Array, train: bool = False) -> dict:
    """Forward pass.

    Args:
      images: (B, H, W, 3) float, already normalised.
      train: dropout on (needs the 'dropout' rng when dropout > 0) and batch
        statistics for the heads' BN (mutable 'batch_stats').

    Returns:
      {'logits': (B, h, w, num_classes) float32, 'aux_logits': (B, h, w,
      num_classes) float32, 'features': the PSP bottleneck (B, h, w, channels)
      float32, 'levels': the backbone's levels (computation dtype)}; (h, w) is
      the grid of the backbone's final features.
    """
    segmenter.check_images(images)
    backbone_out = self.backbone(images, train=train)
    levels = backbone_out.get('levels', {})
    if self.aux_level not in levels:
      raise ValueError(f'aux_level (model.psp_aux_level)={self.aux_level!r} '
                       f'is not a backbone level; available: '
                       f'{sorted(levels)}')
    head_out = PSPHead(num_classes=int(self.num_classes),
                       channels=int(self.channels),
                       pool_scales=tuple(int(s) for s in self.pool_scales),
                       dropout=float(self.dropout), dtype=self.dtype,
                       name='head')(backbone_out['features'], train)
    aux_logits = FCNHead(num_classes=int(self.num_classes),
                         channels=int(self.aux_channels),
                         dropout=float(self.dropout), dtype=self.dtype,
                         name='aux_head')(levels[self.aux_level],
                                          train)['logits']
    size = head_out['logits'].shape[1:3]
    aux_logits = resize_bilinear(aux_logits.astype(jnp.float32), size,
                                 align_corners=False)
    out = segmenter.assemble_outputs(backbone_out, head_out)
    out['aux_logits'] = aux_logits
    return out
