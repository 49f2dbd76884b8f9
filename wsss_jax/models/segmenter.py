"""Backbone + head composition with the project-wide output contract.

The top-level parameter collections are exactly `backbone` and `head` (the
attribute names), so optimisers can pick the 10x/20x learning-rate head group
by the top-level key.  Methods that need extra heads (e.g. an attention head)
write their own small module with more attributes next to these two and reuse
`wsss_jax.models.build.build_backbone` / `build_head`.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp


def check_images(images: jax.Array) -> None:
  """Raises ValueError unless `images` is a float (B, H, W, 3) array."""
  if images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f'images must be (B, H, W, 3) NHWC, got shape '
                     f'{tuple(images.shape)}')
  if not jnp.issubdtype(images.dtype, jnp.floating):
    raise ValueError(f'images must be float and already normalised, got '
                     f'dtype {images.dtype} (normalise uint8 images first)')


def assemble_outputs(backbone_out: dict, head_out: dict) -> dict:
  """The model output dict from a backbone's and a head's outputs.

  'logits' and 'features' are cast to float32 (losses and cosine classifiers
  need the precision); 'levels' (pyramid features) stay in the computation dtype
  because decoders consume them as conv inputs.  'features' is the head's own
  representation when it has one (BANA's ASPP), else the backbone's.
  """
  out = {
      'logits': head_out['logits'].astype(jnp.float32),
      'features': head_out.get('features',
                               backbone_out['features']).astype(jnp.float32),
  }
  if 'cosines' in head_out:       # cosine classifiers (BANA)
    out['cosines'] = head_out['cosines'].astype(jnp.float32)
  if 'levels' in backbone_out:
    out['levels'] = dict(backbone_out['levels'])
  return out


class Segmenter(nn.Module):
  """A segmentation network: `backbone` then `head`.

  Attributes:
    backbone: returns {'features', optionally 'levels'} (see `vgg`, `resnet`).
    head: returns {'logits', optionally 'features'} (see `heads`).
  """
  backbone: nn.Module
  head: nn.Module

  def __call__(self, images: jax.Array, train: bool = False) -> dict:
    """Forward pass.

    Args:
      images: (B, H, W, 3) float, already normalised, channels in the
        order the weights expect (BGR for 'caffe', see wsss_jax.ops.image).
      train: dropout on / batch statistics for trained BN.

    Returns:
      {'logits': (B, h, w, K) float32, 'features': (B, h, w, D) float32,
      'levels': {'c3'..'c5'} (VGG) or {'c2'..'c5'} (ResNet)}, h = H / output
      stride rounded up.
    """
    check_images(images)
    backbone_out = self.backbone(images, train=train)
    head_out = self.head(backbone_out['features'], train=train)
    return assemble_outputs(backbone_out, head_out)
