"""RRM's online reliable labels (Zhang et al., AAAI 2020, Eqs. 3–7,
Algorithm 1), one pure function per rule, all inside the jitted step.

    P_fg = CAM / max CAM per class (Eq. 3), absent classes 0
    P_bg = (1 − max_c P_fg)^γ (Eq. 4), γ = 4
    I_crf = argmax DenseCRF(I, [P_bg, P_fg]) (Eq. 5)
    I_cam = argmax of [P_bg, P_fg] on the top `ratio` of each class's pixels
            (Eq. 6; 40 % in the paper), else 255
    I_final = I_cam where I_cam = I_crf, else 255 (Eq. 7)

Conventions: channel-last maps (B, H, W, C) with C = K + 1 (channel 0 the
background), label maps (B, H, W) int32 with 255 = unlabelled.  What the
paper leaves open follows the official code (docs/rrm.md): the top-40 % rule
ranks, per class, the pixels whose argmax is that class, and a foreground
class only among those with P_fg > 0.1.
"""

from __future__ import annotations

import fractions

import jax
import jax.numpy as jnp

from wsss_jax.data import schema
from wsss_jax.pseudo import cam as cam_lib
from wsss_jax.pseudo import regions

IGNORE = schema.IGNORE_LABEL


def foreground_background_probs(cam: jax.Array, present: jax.Array,
                                gamma: float, eps: float) -> jax.Array:
  """[P_bg, P_fg], RRM Eqs. (3)–(4): (B, H, W, K + 1) in [0, 1].

  Args:
    cam: (B, H, W, K) multi-scale CAM (Eq. 2) at the crop's resolution.
    present: (B, K) bool image labels; absent classes get P_fg = 0.
    gamma: γ of Eq. (4) (4 in the paper).
    eps: added to the per-class maximum (the official code's 1e-5).
  """
  p_fg = cam_lib.max_normalize(cam, present, eps=eps)
  p_bg = cam_lib.power_background(p_fg, gamma)
  return jnp.concatenate([p_bg[..., None], p_fg], axis=-1)


def _rank_fraction(ratio: float) -> fractions.Fraction:
  """1 − ratio as an exact fraction, so the threshold index int((1 − r)·n)
  is integer arithmetic (a float product would round 0.6 · 5 below 3)."""
  return fractions.Fraction(1.0 - float(ratio)).limit_denominator(10_000)


def top_ratio_labels(probs: jax.Array, valid: jax.Array, ratio: float,
                     fg_floor: float) -> jax.Array:
  """I_cam, RRM Eq. (6): each class keeps the top `ratio` of its pixels.

  A pixel is a candidate of class c = argmax_c probs when it is valid and,
  for a foreground class, probs_c > `fg_floor` (the code's 0.1; background
  candidates have no floor).  Per image and class, the n candidate scores
  sorted ascending give the threshold t at index floor((1 − ratio)·n); the
  candidates strictly above t keep their class (≈ the top `ratio`, "an α
  chosen with 40 % pixels selected as labeled pixels for each class"), the
  other pixels are 255.  A class without candidates labels nothing.

  Args:
    probs: (B, H, W, C) [P_bg, P_fg].
    valid: (B, H, W) bool, real (non-padded) pixels.
    ratio: kept share in (0, 1] (0.4 in the paper; Table 1 sweeps it).
    fg_floor: candidate floor of the foreground classes.
  Returns:
    (B, H, W) int32.
  """
  batch, height, width, classes = probs.shape
  label = jnp.argmax(probs, axis=-1).astype(jnp.int32)
  score = jnp.max(probs, axis=-1)
  floor = jnp.where(label > 0, fg_floor, -jnp.inf)
  candidate = valid & (score > floor)
  flat_label = label.reshape(batch, -1)
  flat_score = score.reshape(batch, -1)
  flat_candidate = candidate.reshape(batch, -1)
  of_class = flat_candidate[:, None, :] & (
      flat_label[:, None, :] == jnp.arange(classes)[None, :, None])
  ranked = jnp.sort(jnp.where(of_class, flat_score[:, None, :], jnp.inf),
                    axis=-1)                                   # (B, C, N)
  count = jnp.sum(of_class, axis=-1)                           # (B, C)
  fraction = _rank_fraction(ratio)
  index = (count * fraction.numerator) // fraction.denominator
  index = jnp.minimum(index, ranked.shape[-1] - 1)
  threshold = jnp.take_along_axis(ranked, index[..., None], axis=-1)[..., 0]
  pixel_threshold = jnp.take_along_axis(threshold, flat_label, axis=-1)
  keep = flat_candidate & (flat_score > pixel_threshold)
  return jnp.where(keep, flat_label, IGNORE).reshape(batch, height, width)


def reliable_labels(i_cam: jax.Array, i_crf: jax.Array,
                    valid: jax.Array) -> jax.Array:
  """I_final, RRM Eq. (7): I_cam where it equals I_crf and the pixel is
  valid, else 255; (B, H, W) int32."""
  _, agreed = regions.agreement(i_cam.astype(jnp.int32),
                                i_crf.astype(jnp.int32))
  return jnp.where(valid, agreed, IGNORE)


def label_statistics(labels: jax.Array, truth: jax.Array, valid: jax.Array,
                     num_classes: int) -> dict[str, jax.Array]:
  """Per-class counts of labelled and correctly labelled pixels.

  Args:
    labels: (B, H, W) reliable labels (255 unlabelled).
    truth: (B, H, W) ground truth (255 ignored: such pixels count as
      labelled but not as correct or wrong).
    valid: (B, H, W) bool real pixels.
  Returns:
    {'valid': () count of valid pixels, 'labelled': (C,), 'judged': (C,)
    labelled pixels with a ground truth, 'correct': (C,)}, float32.
  """
  classes = jnp.arange(num_classes)
  labelled = valid & (labels != IGNORE)
  judged = labelled & (truth != IGNORE)
  one_hot = (labels[..., None] == classes).astype(jnp.float32)
  count = lambda mask: jnp.sum(one_hot * mask[..., None], axis=(0, 1, 2))
  return {'valid': jnp.sum(valid).astype(jnp.float32),
          'labelled': count(labelled), 'judged': count(judged),
          'correct': count(judged & (labels == truth))}


def official_crf_label(q_low: jax.Array, q_high: jax.Array) -> jax.Array:
  """The official code's CRF label from its two CRFs (docs/rrm.md,
  "Defaults and switches"): argmax of the low-exponent CRF with its
  background made 255, then background wherever the high-exponent CRF's
  argmax is background.  q_low, q_high (B, H, W, C) marginals; (B, H, W)."""
  low = jnp.argmax(q_low, axis=-1).astype(jnp.int32)
  label = jnp.where(low == 0, IGNORE, low)
  return jnp.where(jnp.argmax(q_high, axis=-1) == 0, 0, label)


def official_reliable_labels(p_fg: jax.Array, q_low: jax.Array,
                             q_high: jax.Array, valid: jax.Array, *,
                             bg_exponent: float, ratio: float,
                             fg_floor: float, bg_threshold: float,
                             confidence: float) -> jax.Array:
  """The official code's reliable labels (`reliable_label_rule='official'`;
  the paper's rule is Eqs. 6–7 above).

  * CAM-sure pixels: with P = [(1 − max P_fg)^`bg_exponent`, P_fg] (32 in
    the code) and its argmax, a foreground class keeps the top `ratio` of its
    candidates with P_fg > `fg_floor` (`top_ratio_labels`), background the
    pixels whose background score exceeds `bg_threshold` (0.8); only the
    classes the low-exponent CRF's argmax shows somewhere in the image count.
  * The label is the CRF's (`official_crf_label`), not the CAM's: the code
    never checks that the two agree.
  * Unlabelled (255) unless CAM-sure, valid and CRF-confident: the larger of
    the high-exponent CRF's background marginal and the low-exponent CRF's
    foreground marginals reaches `confidence` (0.8).

  Args:
    p_fg: (B, H, W, K) P_fg (Eq. 3), absent classes 0.
    q_low, q_high: (B, H, W, K + 1) marginals of the CRFs over [P_bg, P_fg]
      with the low (4) and high (32) background exponents.
    valid: (B, H, W) bool.
  Returns:
    (B, H, W) int32.
  """
  classes = q_low.shape[-1]
  bg = cam_lib.power_background(p_fg, bg_exponent)
  probs = jnp.concatenate([bg[..., None], p_fg], axis=-1)
  top = top_ratio_labels(probs, valid, ratio, fg_floor)
  cam_label = jnp.argmax(probs, axis=-1)
  low = jnp.argmax(q_low, axis=-1)
  shown = jnp.any((low[..., None] == jnp.arange(classes)) & valid[..., None],
                  axis=(1, 2))                                     # (B, C)
  shown_here = jnp.take_along_axis(
      shown[:, None, None, :], cam_label[..., None], axis=-1)[..., 0]
  sure_fg = (top != IGNORE) & (top > 0)
  sure_bg = (cam_label == 0) & (bg > bg_threshold) & valid
  sure = (sure_fg | sure_bg) & shown_here
  trust = jnp.maximum(q_high[..., 0], jnp.max(q_low[..., 1:], axis=-1))
  keep = sure & valid & (trust >= confidence)
  return jnp.where(keep, official_crf_label(q_low, q_high), IGNORE)
