"""Colour jitter on uint8 RGB images with PIL's (torchvision's) arithmetic.

BANA jitters brightness, contrast and saturation with torchvision's
ColorJitter on PIL images; these functions reproduce PIL's `ImageEnhance`
results exactly (each step truncates to uint8).
"""

from __future__ import annotations

import numpy as np


def _luma(image: np.ndarray) -> np.ndarray:
  """PIL's RGB -> 'L' conversion (ITU-R 601-2, rounded), (H, W) int32."""
  rgb = image.astype(np.int32)
  # Weights 0.299/0.587/0.114 in 16-bit fixed point, PIL's exact arithmetic.
  return (rgb[..., 0] * 19595 + rgb[..., 1] * 38470 + rgb[..., 2] * 7471
          + 32768) >> 16


def _blend(degenerate: np.ndarray | float, image: np.ndarray,
           factor: float) -> np.ndarray:
  """PIL `Image.blend(degenerate, image, factor)`: d + f (x - d) in float32,
  clipped to [0, 255] and truncated to uint8."""
  degenerate = np.asarray(degenerate, np.float32)
  result = degenerate + np.float32(factor) * (image.astype(np.float32)
                                              - degenerate)
  return np.clip(result, 0, 255).astype(np.uint8)


def adjust_brightness(image: np.ndarray, factor: float) -> np.ndarray:
  """uint8 (H, W, 3) -> uint8: blend with black (x * f)."""
  return _blend(0.0, image, factor)


def adjust_contrast(image: np.ndarray, factor: float) -> np.ndarray:
  """uint8 (H, W, 3) -> uint8: blend with the grey level
  int(mean(luma) + 0.5) of the whole image."""
  mean = np.floor(_luma(image).mean() + 0.5)
  return _blend(mean, image, factor)


def adjust_saturation(image: np.ndarray, factor: float) -> np.ndarray:
  """uint8 (H, W, 3) -> uint8: blend with the per-pixel luma."""
  return _blend(_luma(image)[..., None], image, factor)


_ADJUSTMENTS = (adjust_brightness, adjust_contrast, adjust_saturation)


def color_jitter(image: np.ndarray, rng: np.random.Generator,
                 strength: float) -> np.ndarray:
  """Random brightness, contrast and saturation (hue 0), like torchvision
  `ColorJitter(s, s, s)` on a PIL image (BANA Sect. 5.9: factors U(0.5, 1.5)).

  Draws a random order of the three adjustments, then one factor per
  adjustment from U(max(0, 1 - s), 1 + s); each step returns uint8 (PIL
  truncation).  `strength` 0 returns `image` itself without drawing from
  `rng`.  The whole image is jittered, padding included, as in BANA.
  image: uint8 (H, W, 3) RGB -> uint8 (H, W, 3).
  """
  if not strength >= 0:
    raise ValueError(f'color_jitter strength must be >= 0, got {strength!r}.')
  if strength == 0:
    return image
  order = rng.permutation(len(_ADJUSTMENTS))
  factors = rng.uniform(max(0.0, 1.0 - strength), 1.0 + strength,
                        size=len(_ADJUSTMENTS))
  for index in order:
    image = _ADJUSTMENTS[index](image, factors[index])
  return image
