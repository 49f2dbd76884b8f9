"""LPG's generator with the segmentation network that feeds it.

`LPGNet` holds a segmentation network f (`segmenter`, frozen: the E-step
trains only the generator, and the optimiser leaves f's parameters alone
through `frozen_modules=('segmenter',)`) and the generator g (`generator`,
an HourglassNet).  For every class an image's boxes carry (up to
`max_classes` slots, `classes.class_slots`), g sees [f's probability of the
class, the union mask of the class's boxes, the image] (Sec. 3.2; the
official code's channel order) and returns fg/bg logits at 1/4 resolution.
All slots of a batch go through g in one call.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from wsss_jax.methods.lpg import classes
from wsss_jax.models import build
from wsss_jax.models import hourglass
from wsss_jax.ops.resize import resize_bilinear


class LPGNet(nn.Module):
  """f (frozen) + g over every (image, class) slot.

  Attributes:
    segmenter: f, a segmentation network returning {'logits'} (B, h, w,
      K + 1); unused (and absent from the variables) when
      `with_segmentation` is False.
    generator: g, returning {'logits'} (N, H/4, W/4, 2) for inputs (N, H, W,
      C) with H, W multiples of 128.
    max_classes: M, the class slots per image.
    with_segmentation: 5-channel inputs with f's probability (the paper, every
      stage); False: the 4-channel [box mask, image] input of the released
      round-1 generator (`lpg.round1_input='box_image_only'`).
  """
  segmenter: nn.Module
  generator: nn.Module
  max_classes: int
  with_segmentation: bool = True

  def __call__(self, images: jax.Array, train: bool = False,
               boxes: jax.Array | None = None,
               box_labels: jax.Array | None = None) -> dict[str, Any]:
    """Args: images (B, H, W, 3) normalised; boxes (B, N, 4) half-open
    pixel-edge, box_labels (B, N) (1..K, -1 padding; absent: no class).

    Returns 'lpg_logits' float32 (B, M, ceil(H/4), ceil(W/4), 2) (channel 1
    foreground), 'slot_classes' (B, M) int32, 'slot_valid' (B, M) bool,
    'box_masks' (B, M, H, W) bool and, with f, 'seg_probs' (B, H, W, K + 1).
    """
    batch, height, width, _ = images.shape
    if boxes is None or box_labels is None:
      boxes = jnp.zeros((batch, 1, 4), jnp.float32)
      box_labels = jnp.full((batch, 1), -1, jnp.int32)
    slot_classes, slot_valid = classes.class_slots(box_labels,
                                                   self.max_classes)
    box_masks = classes.class_box_masks(boxes, box_labels, slot_classes,
                                        slot_valid, height, width)
    out = {'slot_classes': slot_classes, 'slot_valid': slot_valid,
           'box_masks': box_masks}
    class_probs = None
    if self.with_segmentation:
      # f is fixed in the E-step (and in deployment): running statistics,
      # no dropout, no gradient.
      logits = self.segmenter(images, train=False)['logits']
      logits = jax.lax.stop_gradient(logits.astype(jnp.float32))
      probs = jax.nn.softmax(
          resize_bilinear(logits, (height, width), align_corners=True))
      out['seg_probs'] = probs
      class_probs = classes.gather_class_probs(probs, slot_classes)
    inputs = classes.lpg_inputs(images.astype(jnp.float32), class_probs,
                                box_masks)
    # The hourglass halves its 1/4-resolution input once per level.
    multiple = hourglass.input_multiple(len(self.generator.dims) - 1)
    pad_h = math.ceil(height / multiple) * multiple - height
    pad_w = math.ceil(width / multiple) * multiple - width
    if pad_h or pad_w:
      # Zeros: the mean colour after normalisation, no box, no probability
      # (the official code pads its 512 canvas the same way).
      inputs = jnp.pad(inputs, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)))
    logits = self.generator(inputs, train=train)['logits']
    logits = logits[:, :math.ceil(height / 4), :math.ceil(width / 4)]
    out['lpg_logits'] = logits.astype(jnp.float32).reshape(
        (batch, self.max_classes) + logits.shape[1:])
    return out


def build_lpg_model(config, num_classes: int, dtype: Any = jnp.float32,
                    *, with_segmentation: bool = True) -> LPGNet:
  """The LPG network of `config.lpg` (generator width, class slots) on the
  segmenter of `config.model` with `num_classes` classes (the dataset's)."""
  section = config.lpg
  return LPGNet(
      segmenter=build.build_model(config.model, num_classes, dtype),
      generator=hourglass.HourglassNet(
          width=float(section.generator.width),
          dtype=build.compute_dtype(dtype)),
      max_classes=int(section.max_classes),
      with_segmentation=with_segmentation)
