"""Per-class slots of LPG (Xie et al., CVPR 2021) and the generator's inputs.

LPG's class-agnostic pseudo-mask generator g runs once per (image, class
present in the image's boxes).  To keep shapes fixed on device, every image
gets M = `max_classes` *slots*; slot m of image b holds one class
(`slot_classes[b, m]`) or is padding (`slot_valid[b, m]` False, class 0).
The slots of an image are its distinct box classes in order of first
appearance among its box rows, which is the order in which the official code
walks the objects of the annotation XML (it matters for the `first_come`
fusion, `fusion.fuse_first_come`).  Two slots of one image never hold the
same class.

Conventions (wsss_jax/data/schema.py): boxes (B, N, 4) float32 half-open
pixel-edge [x0, y0, x1, y1]; box_labels (B, N) int32, 1..K real, -1 padding.
A pixel (i, j) is inside a box iff x0 <= j + .5 < x1 and y0 <= i + .5 < y1
(`wsss_jax.ops.boxes.centre_membership`).  Everything here is jnp, jit
friendly (the sizes are static Python ints), with no Python loop over boxes,
classes or pixels.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from wsss_jax.ops import boxes as boxes_ops


def _first_appearance(box_labels: jax.Array) -> jax.Array:
  """(B, N) bool: row n is real and no earlier row of its image has its label.

  An (N, N) comparison per image; N (boxes per image) is small.
  """
  labels = jnp.asarray(box_labels, jnp.int32)
  n = labels.shape[-1]
  same = labels[..., :, None] == labels[..., None, :]           # (B, N, N)
  earlier = jnp.arange(n)[None, :] < jnp.arange(n)[:, None]     # m < n
  seen_before = jnp.any(same & earlier, axis=-1)
  return (labels >= 1) & ~seen_before


def class_slots(box_labels: jax.Array, max_classes: int
                ) -> tuple[jax.Array, jax.Array]:
  """The distinct classes of each image's boxes, in order of first appearance.

  LPG (Xie et al., CVPR 2021), Sect. 3: g is applied to every class c present
  in the image (y^{b_i} of Eq. (7) ranges over them).  Slot m holds the m-th
  distinct label met when reading the box rows in order (rows labelled < 1
  are padding and skipped).

  Truncation: an image with more than M = `max_classes` distinct classes
  keeps its first M (in that order); the others get no slot, hence no pseudo
  mask (their pixels end as background after fusion).  The pipeline sizes M
  from the dataset and counts truncations on the host
  (`num_distinct_classes(box_labels) > M`).

  Args:
    box_labels: (B, N) int, 1..K real, < 1 padding.
    max_classes: M, a static Python int >= 1.
  Returns:
    (slot_classes (B, M) int32, 0 on padding slots;
     slot_valid (B, M) bool, True on the first num_distinct_classes slots).
  """
  max_classes = int(max_classes)
  if max_classes < 1:
    raise ValueError(f'max_classes must be >= 1, got {max_classes}.')
  labels = jnp.asarray(box_labels, jnp.int32)
  first = _first_appearance(labels)
  # The slot of a first-appearance row is the number of first-appearance rows
  # before it; rows whose slot is >= M (truncated) match no one-hot column.
  slot_of_row = jnp.cumsum(first, axis=-1) - 1
  onehot = (slot_of_row[..., None] == jnp.arange(max_classes)) & first[..., None]
  slot_valid = jnp.any(onehot, axis=-2)                          # (B, M)
  slot_classes = jnp.sum(jnp.where(onehot, labels[..., None], 0), axis=-2)
  return slot_classes.astype(jnp.int32), slot_valid


def num_distinct_classes(box_labels: jax.Array) -> jax.Array:
  """(B,) int32: how many distinct real classes each image's boxes have.

  `class_slots` truncates images where this exceeds `max_classes`.
  """
  return jnp.sum(_first_appearance(box_labels), axis=-1).astype(jnp.int32)


def class_box_masks(boxes: jax.Array, box_labels: jax.Array,
                    slot_classes: jax.Array, slot_valid: jax.Array,
                    height: int, width: int) -> jax.Array:
  """y^{b_i} of LPG (Xie et al., CVPR 2021) Eq. (7): the union of class c's boxes.

  A pixel belongs to slot m's mask iff its centre lies inside at least one
  box labelled slot_classes[b, m] (`centre_membership`, stride 1).  Computed
  as a contraction over boxes of separable row/column memberships, so no
  (B, N, H, W) array is built.

  Args:
    boxes: (B, N, 4) float [x0, y0, x1, y1], half-open, pixels.
    box_labels: (B, N) int, < 1 padding.
    slot_classes, slot_valid: (B, M) from `class_slots`.
    height, width: H, W of the pixel grid (static ints).
  Returns:
    (B, M, H, W) bool; all False on invalid slots.
  """
  labels = jnp.asarray(box_labels, jnp.int32)
  in_y, in_x = boxes_ops.centre_membership(boxes, labels,
                                           (int(height), int(width)))
  # (B, M, N): box n is one of slot m's boxes.  Padding rows (label < 1)
  # never match a valid slot (classes are >= 1) and cover nothing anyway.
  owns = ((labels[:, None, :] == slot_classes[:, :, None])
          & slot_valid[:, :, None] & (labels[:, None, :] >= 1))
  counts = jnp.einsum('bmn,bnh,bnw->bmhw', owns.astype(jnp.float32),
                      in_y.astype(jnp.float32), in_x.astype(jnp.float32),
                      precision=jax.lax.Precision.HIGHEST)
  # Counts are small non-negative integers: > 0.5 is "covered by a box".
  return counts > 0.5


def gather_class_probs(probs: jax.Array, slot_classes: jax.Array) -> jax.Array:
  """The segmentation network's probability of each slot's class.

  LPG (Xie et al., CVPR 2021) Sect. 3: g's first input channel is the
  segmentation network's softmax probability of class c (the caller
  upsamples it to the image first).  Invalid slots hold class 0 and so get
  the background channel; their outputs are never used (their targets are
  all ignore, their predictions are masked out).

  Args:
    probs: (B, H, W, K + 1) float, channel 0 background.
    slot_classes: (B, M) int in 0..K.
  Returns:
    (B, M, H, W), the dtype of `probs`.
  """
  num_channels = probs.shape[-1]
  index = jnp.clip(jnp.asarray(slot_classes, jnp.int32), 0, num_channels - 1)
  channels_first = jnp.moveaxis(probs, -1, 1)                    # (B, K+1, H, W)
  return jnp.take_along_axis(channels_first, index[:, :, None, None], axis=1)


def lpg_inputs(images_normalised: jax.Array, class_probs: jax.Array | None,
               box_masks: jax.Array) -> jax.Array:
  """The input of g, one row per (image, slot), LPG (Xie et al., CVPR 2021).

  Channel order (the official code's): [P_c, y^{b}_c, image] with C = 5,
  or [y^{b}_c, image] with C = 4 when `class_probs` is None (the round-1
  variant `box_image_only`, before a segmentation network exists).  The box
  mask channel is 0/1.  The official code's image channels are BGR minus the
  caffe mean (`normalize_images(..., 'caffe')`); the normalisation is the
  caller's choice and is passed in already applied.

  Args:
    images_normalised: (B, H, W, 3) float.
    class_probs: (B, M, H, W) float (`gather_class_probs`), or None.
    box_masks: (B, M, H, W) bool (`class_box_masks`).
  Returns:
    (B·M, H, W, C) in the dtype of `images_normalised`; row b·M + m is image
    b, slot m.  Invalid slots get rows too (fixed shapes); the caller ignores
    their outputs.
  """
  batch, height, width, _ = images_normalised.shape
  if box_masks.shape[0] != batch or box_masks.shape[2:] != (height, width):
    raise ValueError(f'box_masks {box_masks.shape} does not match images '
                     f'{images_normalised.shape} (expected (B, M, H, W)).')
  if class_probs is not None and class_probs.shape != box_masks.shape:
    raise ValueError(f'class_probs {class_probs.shape} must have the shape of '
                     f'box_masks {box_masks.shape}.')
  dtype = images_normalised.dtype
  num_slots = box_masks.shape[1]
  image = jnp.broadcast_to(images_normalised[:, None],
                           (batch, num_slots, height, width, 3))
  planes = [box_masks.astype(dtype)[..., None], image]
  if class_probs is not None:
    planes.insert(0, class_probs.astype(dtype)[..., None])
  stacked = jnp.concatenate(planes, axis=-1)
  return stacked.reshape((batch * num_slots, height, width, stacked.shape[-1]))
