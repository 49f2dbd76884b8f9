"""Fusing LPG's per-class masks into one label map, LPG (Xie et al., CVPR
2021) Eq. (7) and supplement A.

For each class slot (`classes.class_slots`) the generator g says fg/bg per
pixel; Eq. (7) keeps fg only inside the class's boxes, ψ(p) • y^{b_i}, and the
per-class masks are fused into one map (0 background, class ids elsewhere).
Pixels claimed by several classes are resolved by a rule:

  'overlap_rate': the supplement's "overlapping rate = overlapping area /
      predicted semantic area": the smallest predicted class wins
      (`fuse_overlap_rate`).
  'first_come':   the official code's: the first class (order of first
      appearance in the annotation) wins (`fuse_first_come`).

Shapes: B images, M slots, H × W pixels.  Outputs are uint8, so class ids
must be <= 254 (255 is the ignore label).  jnp, jit friendly.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

FUSIONS = ('overlap_rate', 'first_come')


def class_predictions(lpg_logits: jax.Array, box_masks: jax.Array,
                      slot_valid: jax.Array) -> jax.Array:
  """ψ(p) • y^{b_i} of LPG (Xie et al., CVPR 2021) Eq. (7), per class slot.

  ψ(p) = argmax over g's two channels == 1 (foreground); an exact tie goes to
  channel 0 (background), as argmax takes the first maximum.  A class is
  never predicted outside the union of its boxes nor on an invalid slot.

  Args:
    lpg_logits: (B, M, H, W, 2) g's logits (upsampled to the label grid by
      the caller), channel 1 = foreground.
    box_masks: (B, M, H, W) bool (`classes.class_box_masks`).
    slot_valid: (B, M) bool.
  Returns:
    (B, M, H, W) bool.
  """
  foreground = lpg_logits[..., 1] > lpg_logits[..., 0]
  return foreground & box_masks & slot_valid[:, :, None, None]


def fuse_overlap_rate(preds: jax.Array, slot_classes: jax.Array,
                      slot_valid: jax.Array) -> jax.Array:
  """Eq. (7) of LPG (Xie et al., CVPR 2021) with supplement A's overlap rule.

  Supplement A: "For overlapping objects from two classes, we calculate
  overlapping rate = overlapping area / predicted semantic area, and assign
  this region to the class with higher overlapping rate."  Our
  generalisation to any number of classes (our choice; the paper states only
  the two-class case): the pixels with several candidate classes are grouped
  by their exact candidate set K into overlap regions O_K; for c in K,
  rate_c = |O_K| / |pred_c|; O_K goes to the argmax rate, ties to the lower
  class id.

  Implemented per pixel: among its candidates, the class with the smallest
  predicted area |pred_c| wins, ties to the lower class id.  Equivalence: a
  pixel p with candidate set K lies in O_K, and the rates of the classes in K
  share the numerator |O_K| >= 1 while every |pred_c| >= |O_K| > 0, so
  argmax_c |O_K| / |pred_c| = argmin_c |pred_c| with the same ties (a single
  candidate wins trivially).  Two slots never hold the same class, so the
  class-id tie-break is total.  A pixel with no candidate is background 0.

  Args:
    preds: (B, M, H, W) bool (`class_predictions`).
    slot_classes, slot_valid: (B, M).
  Returns:
    (B, H, W) uint8.
  """
  claims = preds & slot_valid[:, :, None, None]
  classes = jnp.asarray(slot_classes, jnp.int32)
  # |pred_c| over the whole image (not only the overlap), per slot.
  areas = jnp.sum(claims, axis=(2, 3), dtype=jnp.int32)          # (B, M)
  never = jnp.iinfo(jnp.int32).max
  candidate_area = jnp.where(claims, areas[:, :, None, None], never)
  best_area = jnp.min(candidate_area, axis=1, keepdims=True)    # (B, 1, H, W)
  # Among the candidates of minimal area, the lowest class id.
  tied = claims & (candidate_area == best_area)
  winner = jnp.min(jnp.where(tied, classes[:, :, None, None], never), axis=1)
  return jnp.where(jnp.any(claims, axis=1), winner, 0).astype(jnp.uint8)


def fuse_first_come(preds: jax.Array, slot_classes: jax.Array,
                    slot_valid: jax.Array) -> jax.Array:
  """The official LPG code's fusion: a pixel keeps the first slot claiming it.

  The code paints the classes one after another, in order of first
  appearance in the annotation XML (the slot order of `class_slots`), and a
  pixel already painted is not repainted.  A pixel with no claim is 0.

  Args:
    preds: (B, M, H, W) bool (`class_predictions`).
    slot_classes, slot_valid: (B, M).
  Returns:
    (B, H, W) uint8.
  """
  claims = preds & slot_valid[:, :, None, None]
  first_slot = jnp.argmax(claims, axis=1)                        # first True
  classes = jnp.asarray(slot_classes, jnp.int32)
  winner = jnp.take_along_axis(classes[:, :, None, None],
                               first_slot[:, None], axis=1)[:, 0]
  return jnp.where(jnp.any(claims, axis=1), winner, 0).astype(jnp.uint8)


def fuse(name: str, preds: jax.Array, slot_classes: jax.Array,
         slot_valid: jax.Array) -> jax.Array:
  """The fusion rule `name` (one of FUSIONS; static, pass it outside jit).

  Returns:
    (B, H, W) uint8.
  Raises:
    ValueError: unknown name.
  """
  if name == 'overlap_rate':
    return fuse_overlap_rate(preds, slot_classes, slot_valid)
  if name == 'first_come':
    return fuse_first_come(preds, slot_classes, slot_valid)
  raise ValueError(f'lpg.fusion={name!r}; expected one of {FUSIONS}.')
