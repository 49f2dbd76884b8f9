"""The Box2Seg network: one encoder, a UPerNet decoder, three 2-conv branches.

Box2Seg Sect. 3.1 and 4.1: y = Softmax(S(I, θ_y)), α = σ(S(I, θ_α)),
β = S(I, θ_β); "decoders consist of 2 convolutional layers", outputs at 1/4
of the input resolution.  Only the y branch is used at test time (the
evaluator reads 'logits'), so inference has no extra parameters.

Parameter tree: `backbone`, `decoder` (UPerNet), `head` (y), `attention_head`
(α), `embedding_head` (β); the optimiser puts all but the backbone in the
head learning-rate group (docs/box2seg.md, choice 22).
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from wsss_jax.models import build, layers
from wsss_jax.models.segmenter import check_images
from wsss_jax.models.upernet import ConvBNReLU, UPerNetDecoder

BRANCHES = ('head', 'attention_head', 'embedding_head')
MODULES = ('decoder',) + BRANCHES


class BranchDecoder(nn.Module):
  """3×3 conv + BN + ReLU, then a 1×1 conv to `features` outputs (its bias
  starts at `bias_init`)."""
  features: int
  hidden: int
  bias_init: float = 0.0
  dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    x = ConvBNReLU(self.hidden, 3, self.dtype, name='conv1')(x, train)
    conv = layers.conv2d(self.features, 1, dtype=self.dtype,
                         bias_init=nn.initializers.constant(self.bias_init),
                         name='conv2')
    return conv(x).astype(jnp.float32)


class Box2SegNet(nn.Module):
  """Encoder + UPerNet decoder + y / α / β branches.

  Attributes:
    backbone: returns {'features', 'levels'} (VGG c3..c5, ResNet c2..c5).
    num_classes: L + 1 (background included).
    embed_dim: d, the embedding size (docs/box2seg.md, choice 1).
    decoder_channels: UPerNet width.
    branch_channels: hidden width of each 2-conv branch.
    levels: backbone levels fed to the decoder, finest first; the outputs
      have the finest level's resolution (1/4 for c2 of ResNet, c3 of VGG).
    pool_scales: PPM sizes.
    attention_bias_init: initial bias of the α logits (σ(3) = 0.95: the
      attention starts by passing every box pixel's loss).
  """
  backbone: nn.Module
  num_classes: int
  embed_dim: int = 64
  decoder_channels: int = 512
  branch_channels: int = 256
  levels: Sequence[str] = ('c2', 'c3', 'c4', 'c5')
  pool_scales: Sequence[int] = (1, 2, 3, 6)
  attention_bias_init: float = 0.0
  dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, images: jax.Array, train: bool = False) -> dict:
    """Returns {'logits' (y before softmax), 'attention_logits' (α before
    the sigmoid), 'embeddings' (β), 'features' (fused decoder map)}, all
    float32 at the finest level's resolution."""
    check_images(images)
    out = self.backbone(images, train=train)
    missing = [name for name in self.levels if name not in out['levels']]
    if missing:
      raise ValueError(f'box2seg.levels {tuple(self.levels)}: the backbone '
                       f"has no {missing} (it has {sorted(out['levels'])}).")
    fused = UPerNetDecoder(self.decoder_channels, tuple(self.pool_scales),
                           self.dtype, name='decoder')(
                               [out['levels'][name] for name in self.levels],
                               train)
    return {
        'logits': BranchDecoder(self.num_classes, self.branch_channels,
                                dtype=self.dtype, name='head')(fused, train),
        'attention_logits': BranchDecoder(
            self.num_classes - 1, self.branch_channels,
            self.attention_bias_init, self.dtype,
            name='attention_head')(fused, train),
        'embeddings': BranchDecoder(self.embed_dim, self.branch_channels,
                                    dtype=self.dtype,
                                    name='embedding_head')(fused, train),
        'features': fused.astype(jnp.float32),
    }


def build_box2seg_model(config, num_classes: int,
                        dtype=jnp.float32) -> Box2SegNet:
  """The network of `config.model` (encoder) and `config.box2seg` (rest)."""
  cfg = config.box2seg
  return Box2SegNet(
      backbone=build.build_backbone(config.model, dtype),
      num_classes=int(num_classes), embed_dim=int(cfg.embed_dim),
      decoder_channels=int(cfg.decoder_channels),
      branch_channels=int(cfg.branch_channels), levels=tuple(cfg.levels),
      pool_scales=tuple(cfg.pool_scales),
      attention_bias_init=float(cfg.attention_bias_init), dtype=dtype)
