"""Bilinear resizing with explicit PyTorch semantics.

The conventions: docs/implementation_notes.md, "Resizing and sampling
conventions".

`jax.image.resize` antialiases when downsampling by default and has no
align_corners=True mode; the official codes use both conventions, so every
resize in this project states which one it means.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def resize_bilinear(x: jax.Array, size: tuple[int, int],
                    align_corners: bool = False) -> jax.Array:
  """Resizes (B, H, W, C) to (B, size[0], size[1], C), no antialiasing.

  align_corners=False: src = (i + 0.5)·in/out − 0.5 (PyTorch default,
  F.interpolate(..., size=...)).  align_corners=True: src = i·(in − 1)/(out −
  1) (BANA's and LPG's upsampling of logits and features).
  """
  batch, in_h, in_w, channels = x.shape
  out_h, out_w = int(size[0]), int(size[1])
  if (in_h, in_w) == (out_h, out_w):
    return x
  dtype = x.dtype
  x = x.astype(jnp.float32)
  if not align_corners:
    y = jax.image.resize(x, (batch, out_h, out_w, channels), 'bilinear',
                         antialias=False)
    return y.astype(dtype)
  # An output side of 1 samples input index 0 (i·(in − 1)/(out − 1) is 0/0):
  # keep that row/column and resize it 1 -> 1.
  if out_h == 1:
    x, in_h = x[:, :1], 1
  if out_w == 1:
    x, in_w = x[:, :, :1], 1
  scale = jnp.asarray([(out_h - 1) / (in_h - 1) if in_h > 1 else
                       (float(out_h - 1) if out_h > 1 else 1.0),
                       (out_w - 1) / (in_w - 1) if in_w > 1 else
                       (float(out_w - 1) if out_w > 1 else 1.0)], jnp.float32)
  translation = 0.5 * (1.0 - scale)
  y = jax.image.scale_and_translate(x, (batch, out_h, out_w, channels), (1, 2),
                                    scale, translation, method='linear',
                                    antialias=False)
  return y.astype(dtype)
