"""Loss building blocks shared by methods.

Every function here is finite, with finite gradients, when the region it
averages over is empty: normalisers are max(count, 1) so an empty region
contributes exactly 0.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from wsss_jax.data import schema


def safe_mean(values: jax.Array, weights: jax.Array) -> jax.Array:
  """Σ w·v / max(Σ w, eps): a weighted mean that is 0 (not NaN) for Σ w = 0."""
  weights = weights.astype(values.dtype)
  total = jnp.sum(weights)
  return jnp.sum(values * weights) / jnp.maximum(total, 1e-12)


def multilabel_soft_margin(scores: jax.Array, targets: jax.Array) -> jax.Array:
  """The multi-label classification loss of CAM classifiers: RRM's
  L_class (Sect. "Overview", unnumbered: L = L_class + L_joint_seg, and
  Algorithm 1 line 8), which the paper calls a softmax loss while its code and
  PMM's use PyTorch's MultiLabelSoftMarginLoss: the mean over classes and
  the batch of −[y log σ(s) + (1 − y) log σ(−s)] (docs/rrm.md).

  Args:
    scores: (B, K) float logits (e.g. globally average-pooled class maps).
    targets: (B, K) 0/1.
  Returns:
    A float32 scalar, finite with finite gradients for any finite scores.
  """
  scores = scores.astype(jnp.float32)
  return -jnp.mean(targets * jax.nn.log_sigmoid(scores)
                   + (1 - targets) * jax.nn.log_sigmoid(-scores))


def resize_labels_nearest(labels: jax.Array, height: int,
                          width: int) -> jax.Array:
  """Centre-sampling nearest resize of (B, H, W) integer labels.

  src = floor((i + 0.5)·in/out): PIL NEAREST / PyTorch 'nearest-exact', which
  is what the DeepLab ports use to bring labels to the logit grid (e.g. 321 ->
  41 picks rows 3, 11, ..., 317; docs/implementation_notes.md, "Resizing and
  sampling conventions").
  """
  in_h, in_w = labels.shape[1], labels.shape[2]
  rows = jnp.floor((jnp.arange(height) + 0.5) * in_h / height).astype(jnp.int32)
  cols = jnp.floor((jnp.arange(width) + 0.5) * in_w / width).astype(jnp.int32)
  return labels[:, rows][:, :, cols]


def softmax_cross_entropy(logits: jax.Array, labels: jax.Array,
                          ignore_label: int = schema.IGNORE_LABEL
                          ) -> tuple[jax.Array, jax.Array]:
  """Per-pixel cross-entropy −log softmax(logits)[label] and its validity.

  Args:
    logits: (..., C) float.
    labels: (...) integer; `ignore_label` and values outside 0..C-1 are invalid.
  Returns:
    (loss (...) float32, valid (...) bool); invalid pixels have loss 0.
  """
  num_classes = logits.shape[-1]
  labels = labels.astype(jnp.int32)
  valid = (labels != ignore_label) & (labels >= 0) & (labels < num_classes)
  safe_labels = jnp.where(valid, labels, 0)
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  picked = jnp.take_along_axis(log_probs, safe_labels[..., None], axis=-1)[..., 0]
  return jnp.where(valid, -picked, 0.0), valid


def segmentation_cross_entropy(logits: jax.Array, labels: jax.Array,
                               ignore_label: int = schema.IGNORE_LABEL
                               ) -> jax.Array:
  """Mean pixel cross-entropy over the valid pixels of the whole batch.

  The standard DeepLab loss: labels are brought to the logit grid with
  centre-sampling nearest (`resize_labels_nearest`) and 255 is ignored.
  Returns 0 when no pixel is valid.

  Args:
    logits: (B, h, w, C) at the network's output stride.
    labels: (B, H, W) integer labels at the input resolution.
  """
  labels = resize_labels_nearest(labels, logits.shape[1], logits.shape[2])
  loss, valid = softmax_cross_entropy(logits, labels, ignore_label)
  return safe_mean(loss, valid)
