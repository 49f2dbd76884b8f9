"""SEAM's training losses as PMM uses them (docs/pmm.md).

PMM (Li et al., ICCV 2021) trains its CAM network (`seam.SEAMNet`) with
SEAM's objective (Wang et al., CVPR 2020; PMM Sect. 4.1: "Our baseline of
classification framework is SEAM") plus a term of PMM's code only:

    L = (L_cls¹ + L_cls²)/2 + L_ER + L_ECR [+ (L_rvmin¹ + L_rvmin²)/2]

with view 1 the images and view 2 their 0.3× rescale.  Maps are channel-last
(B, H, W, C), C = K + 1 with the background as channel 0; image labels are
(B, K) 0/1 and `labels_bg` = concat([1], labels) (B, C).  The comparisons
happen at view 2's size: view 1's max-normalised maps are resized there
bilinearly with align_corners=True.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from wsss_jax import losses
from wsss_jax.ops.resize import resize_bilinear

# SEAM's max_norm epsilon.
MAX_NORM_EPS = 1e-5
# SEAM's ECR keeps the top 20 % of the per-pixel-and-channel errors.
ECR_TOP = 0.2


def _check_maps(name: str, x: jax.Array) -> None:
  if x.ndim != 4 or x.shape[-1] < 2:
    raise ValueError(f'{name} must be (B, H, W, C) with C >= 2 (background '
                     f'channel 0), got shape {tuple(x.shape)}')


def _check_labels_bg(labels_bg: jax.Array, cam: jax.Array) -> None:
  if labels_bg.ndim != 2 or labels_bg.shape != (cam.shape[0], cam.shape[-1]):
    expected = (cam.shape[0], cam.shape[-1])
    raise ValueError(f'labels_bg must be (B, C) = {expected}, got shape '
                     f'{tuple(labels_bg.shape)}')


def labels_with_background(labels: jax.Array) -> jax.Array:
  """(B, K) image labels -> (B, K + 1) float32 with a leading 1 (SEAM's
  background score: the background is present in every image)."""
  if labels.ndim != 2:
    raise ValueError(f'labels must be (B, K), got shape {tuple(labels.shape)}')
  labels = labels.astype(jnp.float32)
  return jnp.concatenate([jnp.ones_like(labels[:, :1]), labels], axis=-1)


def max_norm(cam: jax.Array) -> jax.Array:
  """SEAM's max_norm of 4-D maps, per image and channel.

  p = ReLU(cam); (p − min p − 1e-5)_+ / (max p − min p + 1e-5), min and max
  over the pixels.  The denominator is at least 1e-5, so constant channels
  give zeros with finite gradients.

  Args:
    cam: (B, H, W, C) float.
  Returns:
    (B, H, W, C) float32 in [0, 1).
  """
  if cam.ndim != 4:
    raise ValueError(f'cam must be (B, H, W, C), got shape '
                     f'{tuple(cam.shape)}')
  p = jax.nn.relu(cam.astype(jnp.float32))
  low = jnp.min(p, axis=(1, 2), keepdims=True)
  high = jnp.max(p, axis=(1, 2), keepdims=True)
  return jax.nn.relu(p - low - MAX_NORM_EPS) / (high - low + MAX_NORM_EPS)


def background_from_foreground(cam: jax.Array) -> jax.Array:
  """Channel 0 := 1 − max over the foreground channels (SEAM's background
  of a normalised map); the foreground channels are unchanged."""
  fg = cam[..., 1:]
  return jnp.concatenate([1.0 - jnp.max(fg, axis=-1, keepdims=True), fg],
                         axis=-1)


def max_onehot(cam: jax.Array) -> jax.Array:
  """SEAM's max_onehot: foreground channels not equal to the per-pixel
  foreground maximum are set to 0 (the maximum keeps its value, ties all
  keep theirs); channel 0 is unchanged.  (B, H, W, C) -> same."""
  fg = cam[..., 1:]
  fg_max = jnp.max(fg, axis=-1, keepdims=True)
  return jnp.concatenate([cam[..., :1], jnp.where(fg == fg_max, fg, 0.0)],
                         axis=-1)


def classification_loss(class_logits: jax.Array, labels: jax.Array
                        ) -> jax.Array:
  """SEAM's L_cls: multi-label soft margin of the GAP scores (B, K) against
  the image labels (B, K) (`wsss_jax.losses.multilabel_soft_margin`)."""
  if class_logits.shape != labels.shape or class_logits.ndim != 2:
    raise ValueError(f'class_logits and labels must both be (B, K), got '
                     f'{tuple(class_logits.shape)} and {tuple(labels.shape)}')
  return losses.multilabel_soft_margin(class_logits,
                                       labels.astype(jnp.float32))


def equivariance_loss(cam1_small: jax.Array, cam2: jax.Array,
                      labels_bg: jax.Array) -> jax.Array:
  """SEAM's equivariant regularisation, L_ER = mean |Ĉ¹[1:] − Ĉ²[1:]| over
  batch, pixels and foreground channels.

  Ĉ = cam · labels_bg with channel 0 := 1 − max foreground (the background
  replacement does not change this loss, which reads the foreground only).

  Args:
    cam1_small: (B, h, w, C) max_norm(view-1 CAM) resized (bilinear,
      align_corners=True) to view 2's size (h, w).
    cam2: (B, h, w, C) max_norm(view-2 CAM).
    labels_bg: (B, C) labels with the background's 1 first.
  Returns:
    A float32 scalar; 0 for an image without classes.
  """
  _check_maps('cam1_small', cam1_small)
  _check_maps('cam2', cam2)
  _check_labels_bg(labels_bg, cam2)
  if cam1_small.shape != cam2.shape:
    raise ValueError(f'cam1_small {tuple(cam1_small.shape)} and cam2 '
                     f'{tuple(cam2.shape)} must have the same shape')
  mask = labels_bg.astype(jnp.float32)[:, None, None, :]
  a = background_from_foreground(cam1_small.astype(jnp.float32) * mask)
  b = background_from_foreground(cam2.astype(jnp.float32) * mask)
  return jnp.mean(jnp.abs(a[..., 1:] - b[..., 1:]))


def top_k_mean(errors: jax.Array, top: float) -> jax.Array:
  """Mean over the batch of the mean of each image's k largest values,
  k = int(C·h·w·top) (SEAM's rule, C counting the background), at least 1.

  Args:
    errors: (B, h, w, C) float.
    top: fraction in (0, 1].
  """
  if not 0.0 < top <= 1.0:
    raise ValueError(f'ecr_top (top) must be in (0, 1], got {top}')
  batch, h, w, channels = errors.shape
  k = max(1, int(channels * h * w * top))
  flat = errors.reshape(batch, h * w * channels)
  return jnp.mean(jax.lax.top_k(flat, k)[0])


def equivariant_cross_loss(cam1_small: jax.Array, cam2: jax.Array,
                           cam_rv1_small: jax.Array, cam_rv2: jax.Array,
                           labels_bg: jax.Array, *, top: float = ECR_TOP
                           ) -> jax.Array:
  """SEAM's equivariant cross regularisation, L_ECR, with SEAM's top-k
  selection, in both directions:

      top-k mean |max_onehot(sg(Ĉ²)) − R̂¹| + top-k mean |max_onehot(sg(Ĉ¹))
      − R̂²|

  Ĉ = cam · labels_bg with channel 0 := 1 − max foreground; R̂ = cam_rv ·
  labels_bg (its background channel as PCM produced it); sg stops the
  gradient; k = int(C·h·w·top) per image (`top_k_mean`).

  Args:
    cam1_small, cam_rv1_small: (B, h, w, C) max_norm of view 1's CAM and
      cam_rv, resized (bilinear, align_corners=True) to view 2's size.
    cam2, cam_rv2: (B, h, w, C) max_norm of view 2's CAM and cam_rv.
    labels_bg: (B, C) labels with the background's 1 first.
    top: the kept fraction (SEAM: 0.2).
  Returns:
    A float32 scalar.
  """
  for name, x in (('cam1_small', cam1_small), ('cam2', cam2),
                  ('cam_rv1_small', cam_rv1_small), ('cam_rv2', cam_rv2)):
    _check_maps(name, x)
    if x.shape != cam2.shape:
      raise ValueError(f'{name} has shape {tuple(x.shape)}, expected '
                       f'{tuple(cam2.shape)} (view 2\'s size)')
  _check_labels_bg(labels_bg, cam2)
  mask = labels_bg.astype(jnp.float32)[:, None, None, :]
  target = lambda c: max_onehot(jax.lax.stop_gradient(
      background_from_foreground(c.astype(jnp.float32) * mask)))
  rv1 = cam_rv1_small.astype(jnp.float32) * mask
  rv2 = cam_rv2.astype(jnp.float32) * mask
  return (top_k_mean(jnp.abs(target(cam2) - rv1), top)
          + top_k_mean(jnp.abs(target(cam1_small) - rv2), top))


def adaptive_min_pooling_loss(cam_rv: jax.Array, labels_bg: jax.Array
                              ) -> jax.Array:
  """PMM's code-only adaptive min-pooling term (switch `rvmin_loss`).

  m = max over the foreground channels of cam_rv · labels_bg per pixel; the
  k = int(h·w/4) lowest m of each image (at least 1), ReLU'd, summed over
  them and the batch and divided by k·B.  It pushes the least activated
  quarter of every image towards zero.

  Args:
    cam_rv: (B, h, w, C) the network's cam_rv (PCM output, not max_norm'ed).
    labels_bg: (B, C) labels with the background's 1 first.
  Returns:
    A float32 scalar; 0 for an image without classes.
  """
  _check_maps('cam_rv', cam_rv)
  _check_labels_bg(labels_bg, cam_rv)
  batch, h, w, _ = cam_rv.shape
  masked = cam_rv.astype(jnp.float32) * labels_bg.astype(
      jnp.float32)[:, None, None, :]
  peak = jnp.max(masked[..., 1:], axis=-1).reshape(batch, h * w)
  k = max(1, (h * w) // 4)
  lowest = -jax.lax.top_k(-peak, k)[0]
  return jnp.sum(jax.nn.relu(lowest)) / (k * batch)


def seam_loss(outputs: dict, labels: jax.Array, *, ecr_top: float = ECR_TOP,
              rvmin: bool = True) -> tuple[jax.Array, dict]:
  """PMM's CAM objective (SEAM's losses plus the code's min-pooling term):

      total = (cls¹ + cls²)/2 + ER + ECR [+ (rvmin¹ + rvmin²)/2 if rvmin]

  Args:
    outputs: `seam.SEAMNet(train=True)` outputs: 'cam1', 'cam_rv1' (B, H, W,
      C), 'cam2', 'cam_rv2' (B, h, w, C), 'class_logits1', 'class_logits2'
      (B, K).
    labels: (B, K) 0/1 image labels.
    ecr_top: ECR's kept fraction.
    rvmin: adds the adaptive min-pooling term (PMM's code: on).
  Returns:
    (total float32 scalar, {'cls', 'er', 'ecr', 'rvmin'}); 'rvmin' is
    reported even when not added.
  """
  missing = [k for k in ('cam1', 'cam2', 'cam_rv1', 'cam_rv2',
                         'class_logits1', 'class_logits2')
             if k not in outputs]
  if missing:
    raise ValueError(f'outputs lack {missing} (run the SEAM network with '
                     f'train=True)')
  labels_bg = labels_with_background(labels)
  cls = (classification_loss(outputs['class_logits1'], labels)
         + classification_loss(outputs['class_logits2'], labels)) / 2
  size = outputs['cam2'].shape[1:3]
  small = lambda x: resize_bilinear(max_norm(x), size, align_corners=True)
  cam1_small, cam_rv1_small = small(outputs['cam1']), small(outputs['cam_rv1'])
  cam2, cam_rv2 = max_norm(outputs['cam2']), max_norm(outputs['cam_rv2'])
  er = equivariance_loss(cam1_small, cam2, labels_bg)
  ecr = equivariant_cross_loss(cam1_small, cam2, cam_rv1_small, cam_rv2,
                               labels_bg, top=ecr_top)
  rv = (adaptive_min_pooling_loss(outputs['cam_rv1'], labels_bg)
        + adaptive_min_pooling_loss(outputs['cam_rv2'], labels_bg)) / 2
  total = cls + er + ecr
  if rvmin:
    total = total + rv
  return total, {'cls': cls, 'er': er, 'ecr': ecr, 'rvmin': rv}
