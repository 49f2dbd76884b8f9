"""UPerNet decoder (Xiao et al., ECCV 2018): pyramid pooling + FPN + fusion.

Used by Box2Seg ("our segmentation network architecture is similar to
UPerNet", Sect. 4.1).  Takes the backbone's pyramid levels (finest first),
runs a pyramid pooling module (PPM) on the coarsest, builds the top-down
feature pyramid with lateral 1×1 convs and 3×3 output convs, and fuses every
level at the finest resolution with a 3×3 conv.  Every conv is followed by a
trained BatchNorm (PyTorch momentum 0.1) and ReLU, as in the UPerNet
reference implementation's ConvModule (docs/box2seg.md, choices 18–20).
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from wsss_jax.models import layers
from wsss_jax.ops.resize import resize_bilinear


def adaptive_avg_pool(x: jax.Array, size: int) -> jax.Array:
  """PyTorch `AdaptiveAvgPool2d(size)` on (B, H, W, C): bin i covers
  [floor(i·H/size), ceil((i + 1)·H/size)), written as two small matmuls."""
  def matrix(n):
    starts = (jnp.arange(size) * n) // size
    ends = -((-(jnp.arange(size) + 1) * n) // size)
    idx = jnp.arange(n)
    inside = (idx[None, :] >= starts[:, None]) & (idx[None, :] < ends[:, None])
    return inside / jnp.sum(inside, axis=1, keepdims=True)
  rows = matrix(x.shape[1]).astype(x.dtype)
  cols = matrix(x.shape[2]).astype(x.dtype)
  return jnp.einsum('sh,bhwc,tw->bstc', rows, x, cols)


class ConvBNReLU(nn.Module):
  """k×k conv (padding k // 2, no bias) + trained BatchNorm + ReLU
  (MMSegmentation's ConvModule; under jit the BN statistics span the global
  batch, as its SyncBN's).  `kernel_init`: the conv's initialiser (PSPNet
  uses mmseg's He normal, fan_out)."""
  features: int
  kernel: int = 3
  dtype: layers.Dtype = jnp.float32
  kernel_init: layers.Initializer = layers.HE_NORMAL_FAN_IN

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    x = layers.conv2d(self.features, self.kernel, padding=self.kernel // 2,
                      use_bias=False, dtype=self.dtype,
                      kernel_init=self.kernel_init, name='conv')(
                          x.astype(self.dtype))
    x = layers.batch_norm(False, train, self.dtype, name='bn')(x)
    return nn.relu(x)


class UPerNetDecoder(nn.Module):
  """Fuses pyramid levels into one map at the finest level's resolution.

  Attributes:
    channels: width of every decoder conv (512 in UPerNet).
    pool_scales: PPM output sizes (1, 2, 3, 6 in UPerNet).
    dtype: computation dtype.
  """
  channels: int = 512
  pool_scales: Sequence[int] = (1, 2, 3, 6)
  dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, levels: Sequence[jax.Array],
               train: bool = False) -> jax.Array:
    """levels: (B, H_k, W_k, C_k), finest first.  Returns (B, H_0, W_0, C)."""
    if not levels:
      raise ValueError('UPerNetDecoder needs at least one pyramid level.')
    top = levels[-1].astype(self.dtype)
    size = top.shape[1:3]
    pooled = [top]
    for scale in self.pool_scales:
      branch = ConvBNReLU(self.channels, 1, self.dtype,
                          name=f'ppm_{scale}')(adaptive_avg_pool(top, scale),
                                               train)
      pooled.append(resize_bilinear(branch, size))
    top = ConvBNReLU(self.channels, 3, self.dtype,
                     name='ppm_bottleneck')(jnp.concatenate(pooled, -1),
                                            train)
    laterals = [ConvBNReLU(self.channels, 1, self.dtype,
                           name=f'lateral_{i}')(x.astype(self.dtype), train)
                for i, x in enumerate(levels[:-1])] + [top]
    for i in range(len(laterals) - 2, -1, -1):
      laterals[i] = laterals[i] + resize_bilinear(
          laterals[i + 1], laterals[i].shape[1:3])
    outputs = [ConvBNReLU(self.channels, 3, self.dtype,
                          name=f'fpn_{i}')(x, train)
               for i, x in enumerate(laterals[:-1])] + [top]
    finest = outputs[0].shape[1:3]
    fused = jnp.concatenate([resize_bilinear(x, finest) for x in outputs], -1)
    return ConvBNReLU(self.channels, 3, self.dtype, name='fuse')(fused, train)
