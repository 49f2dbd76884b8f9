"""The E-step loss of LPG (Xie et al., CVPR 2021): training the generator g.

g (an HourglassNet) maps each (image, class slot) input of
`classes.lpg_inputs` to fg/bg logits at 1/4 of the input resolution.  Its
targets are binary masks of the slot's class built from pixel ground truth
(the auxiliary set's masks), brought to 1/4 resolution the way the official
code does (cv2 INTER_NEAREST, top-left sampling).  Shapes: B images, M class
slots (`classes.class_slots`), H × W the input, h × w = H/4 × W/4.
Labels are uint8 with 255 = ignore (wsss_jax/data/schema.py).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from wsss_jax.data import schema
from wsss_jax.losses import safe_mean, softmax_cross_entropy

# g's output stride (HourglassNet: input H, W -> logits H/4, W/4).
OUTPUT_STRIDE = 4


def quarter_labels(labels: jax.Array) -> jax.Array:
  """Labels at g's output resolution: top-left nearest, `labels[..., ::4, ::4]`.

  The official code resizes the targets with cv2 INTER_NEAREST, which samples
  source index floor(i · 4) = 4i (the top-left pixel of each 4 × 4 cell).
  This is NOT `jax.image.resize(..., 'nearest')` nor
  `wsss_jax.losses.resize_labels_nearest`, which sample the cell centres
  floor((i + ½) · 4) = 4i + 2.

  Sides that are not multiples of 4 give ceil(H/4) × ceil(W/4): the last,
  partial cell is still sampled at its top-left pixel, which matches g's
  logits cropped to ceil(H/4) × ceil(W/4) after padding the input to a
  multiple of 128 (the official code only sees multiples of 4).

  Args:
    labels: (..., H, W) integer (e.g. (B, H, W) or (B, M, H, W)).
  Returns:
    (..., ceil(H/4), ceil(W/4)), same dtype; H/4 × W/4 for multiples of 4.
  """
  return labels[..., ::OUTPUT_STRIDE, ::OUTPUT_STRIDE]


def binary_targets(mask: jax.Array, valid: jax.Array, slot_classes: jax.Array,
                   slot_valid: jax.Array, padding_as_background: bool = False
                   ) -> jax.Array:
  """g's fg/bg target for every class slot, LPG (Xie et al., CVPR 2021) Eq. (6).

  Per slot m of class c: 1 where the ground truth is c, 0 on every other
  labelled pixel (background and other classes), 255 (ignore) where the
  ground truth is 255 and on crop padding (`valid` False), and 255 on every
  pixel of an invalid slot (so it adds nothing to `e_step_loss`).

  `padding_as_background=True` reproduces the official code, which labels
  crop padding 0 (background) (a bug: the padding is not image; docs/
  fidelity.md, "Crop padding of labels").  Pixels whose ground truth is 255
  inside the image stay 255 either way.

  Args:
    mask: (B, H, W) uint8 ground truth, 0 bg, 1..K, 255 ignore.
    valid: (B, H, W) bool, False on crop padding.
    slot_classes, slot_valid: (B, M) from `classes.class_slots`.
    padding_as_background: the official code's padding label (default off).
  Returns:
    (B, M, H, W) uint8 in {0, 1, 255}.
  """
  mask = jnp.asarray(mask).astype(jnp.int32)[:, None]            # (B, 1, H, W)
  valid = jnp.asarray(valid, bool)[:, None]
  classes = jnp.asarray(slot_classes, jnp.int32)[:, :, None, None]
  ignore = jnp.uint8(schema.IGNORE_LABEL)
  target = (mask == classes).astype(jnp.uint8)
  target = jnp.where(mask == schema.IGNORE_LABEL, ignore, target)
  padding_label = jnp.uint8(0) if padding_as_background else ignore
  target = jnp.where(valid, target, padding_label)
  return jnp.where(jnp.asarray(slot_valid, bool)[:, :, None, None], target,
                   ignore)


def e_step_loss(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """The E-step cross-entropy of LPG (Xie et al., CVPR 2021) Eq. (6), upper
  problem: g's 2-way softmax cross-entropy against the binary targets.

  Reduction (the official code's): one mean over every non-ignored pixel of
  every slot of the batch (not per slot, not per image), so a large object
  weighs more than a small one.  Invalid slots are all 255 (`binary_targets`)
  and count nowhere.  0, with finite (zero) gradients, when every pixel is
  ignored.

  Args:
    logits: (B·M, h, w, 2) float at 1/4 resolution, channel 1 = foreground.
    targets: (B·M, h, w) uint8 in {0, 1, 255} (`quarter_labels` of
      `binary_targets`, reshaped to B·M rows).
  Returns:
    float32 scalar.
  """
  if logits.shape[-1] != 2 or logits.shape[:-1] != targets.shape:
    raise ValueError(f'e_step_loss expects logits (B*M, h, w, 2) and targets '
                     f'(B*M, h, w), got {logits.shape} and {targets.shape}.')
  ce, counted = softmax_cross_entropy(logits, targets)
  return safe_mean(ce, counted)
