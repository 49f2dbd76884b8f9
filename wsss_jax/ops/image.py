"""On-device image normalisation (uint8 batches travel to devices unnormalised).

Two conventions are used by the papers (docs/implementation_notes.md,
"Resizing and sampling conventions"):
  'caffe':    BGR, 0–255, minus (104.008, 116.669, 122.675); for converted
              caffe weights (BANA, LPG: DeepLab vgg16_20M, MSRA ResNet-101).
  'imagenet': RGB / 255, minus ImageNet mean, divided by its std; for
              torchvision-style weights (PMM, RRM, Box2Seg).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from wsss_jax.data import schema

NORMALIZATIONS = ('caffe', 'imagenet')


def normalization_for(model_config, input_config) -> str:
  """The input normalisation: explicit `input.normalization`, else the one the
  backbone's weights were trained with (`model.weights_source`)."""
  if input_config.normalization:
    style = input_config.normalization
  else:
    style = {'caffe': 'caffe', 'torchvision': 'imagenet'}.get(
        model_config.weights_source, '')
  if style not in NORMALIZATIONS:
    raise ValueError(
        f'Cannot choose an input normalisation: input.normalization='
        f'{input_config.normalization!r}, model.weights_source='
        f'{model_config.weights_source!r}; expected one of {NORMALIZATIONS}.')
  return style


def pad_color(style: str) -> tuple[int, int, int]:
  """The RGB uint8 colour that becomes (about) zero after normalisation."""
  mean = schema.CAFFE_MEAN_RGB if style == 'caffe' else schema.IMAGENET_MEAN_RGB
  return tuple(int(round(v)) for v in mean)


def normalize_images(images: jax.Array, style: str,
                     dtype=jnp.float32) -> jax.Array:
  """uint8 RGB (..., 3) -> normalised float (..., 3) in `style` convention."""
  x = images.astype(jnp.float32)
  if style == 'caffe':
    mean_bgr = jnp.asarray(schema.CAFFE_MEAN_RGB[::-1], jnp.float32)
    x = x[..., ::-1] - mean_bgr
  elif style == 'imagenet':
    x = (x - jnp.asarray(schema.IMAGENET_MEAN_RGB, jnp.float32)) / jnp.asarray(
        schema.IMAGENET_STD_RGB, jnp.float32)
  else:
    raise ValueError(f'Unknown normalisation {style!r}; use one of '
                     f'{NORMALIZATIONS}.')
  return x.astype(dtype)
