"""Segmentation scores from a confusion matrix (mIoU and friends).

Conventions used by every function here:

* The confusion matrix `conf` is (C, C) with rows = ground truth and columns =
  prediction: conf[g, p] counts pixels of true class g predicted as p.
* Pixels whose ground truth is outside 0..C-1 (the ignore label 255, crop
  padding) are not counted.
* Scores are reported in **percent** (x100), the unit of every table in the
  papers.
* IoU_c = TP_c / (TP_c + FP_c + FN_c).  A class absent from both the ground
  truth and the prediction has no IoU (NaN in `per_class_iou`) and is excluded
  from the mean: mIoU = mean of IoU_c over the classes present in the ground
  truth **or** the prediction.  A class predicted but absent from the ground
  truth therefore counts with IoU 0.  This is the detectron2 rule used by BANA's
  evaluation; on VOC val every class is present, so it is the plain mean.
"""

from __future__ import annotations

import itertools
import logging
import os
from typing import Any, Iterable, Mapping, Sequence

import jax.numpy as jnp
import numpy as np

from wsss_jax import progress as progress_lib
from wsss_jax.data import schema
from wsss_jax.data.label_png import LabelFolder, MissingLabelsError

log = logging.getLogger(__name__)

_NUM_LISTED = 5


def confusion_matrix(gt: np.ndarray, pred: np.ndarray,
                     num_classes: int) -> np.ndarray:
  """Confusion matrix of one label map (or a batch), numpy.

  Args:
    gt: integer array, any shape; values outside 0..C-1 (e.g. 255) ignored.
    pred: integer array of the same shape with values in 0..C-1 wherever the
      ground truth is counted.
    num_classes: C.

  Returns:
    int64 (C, C), rows = ground truth, columns = prediction.

  Raises:
    ValueError: shapes differ, non-integer inputs, or a counted pixel has a
      prediction outside 0..C-1.
  """
  gt = np.asarray(gt)
  pred = np.asarray(pred)
  if gt.shape != pred.shape:
    raise ValueError(f'confusion_matrix: gt shape {gt.shape} differs from '
                     f'pred shape {pred.shape}.')
  for name, array in (('gt', gt), ('pred', pred)):
    if not np.issubdtype(array.dtype, np.integer):
      raise ValueError(f'confusion_matrix: {name} must be an integer array, '
                       f'got {array.dtype}.')
  gt = gt.reshape(-1).astype(np.int64)
  pred = pred.reshape(-1).astype(np.int64)
  counted = (gt >= 0) & (gt < num_classes)
  gt, pred = gt[counted], pred[counted]
  bad = (pred < 0) | (pred >= num_classes)
  if bad.any():
    raise ValueError(
        f'confusion_matrix: {int(bad.sum())} predicted pixels have values '
        f'{np.unique(pred[bad])[:_NUM_LISTED].tolist()} outside 0..'
        f'{num_classes - 1}.')
  counts = np.bincount(gt * num_classes + pred,
                       minlength=num_classes * num_classes)
  return counts.reshape(num_classes, num_classes).astype(np.int64)


def confusion_matrix_jax(gt: jnp.ndarray, pred: jnp.ndarray, num_classes: int,
                         valid: jnp.ndarray | None = None) -> jnp.ndarray:
  """Confusion matrix on device (jittable; `num_classes` must be static).

  Same semantics as `confusion_matrix`, except that a pixel whose prediction
  is outside 0..C-1 is not counted (no error is possible inside `jit`; an
  argmax over C logits is always in range).

  Args:
    gt: integer (...) ground truth; values outside 0..C-1 are not counted.
    pred: integer (...) predictions, same shape.
    num_classes: C (a Python int).
    valid: optional bool (...) mask; False pixels (e.g. padding) not counted.

  Returns:
    int32 (C, C).  Per-batch counts fit easily in int32; accumulate over a
    split on the host in int64 (`np.asarray(m, np.int64)`).
  """
  if gt.shape != pred.shape:
    raise ValueError(f'confusion_matrix_jax: gt shape {gt.shape} differs from '
                     f'pred shape {pred.shape}.')
  gt = gt.astype(jnp.int32)
  pred = pred.astype(jnp.int32)
  counted = ((gt >= 0) & (gt < num_classes) & (pred >= 0) &
             (pred < num_classes))
  if valid is not None:
    if valid.shape != gt.shape:
      raise ValueError(f'confusion_matrix_jax: valid shape {valid.shape} '
                       f'differs from gt shape {gt.shape}.')
    counted = counted & valid.astype(bool)
  # Uncounted pixels go to one extra bin that is dropped afterwards.
  dump = num_classes * num_classes
  index = jnp.where(counted, gt * num_classes + pred, dump).reshape(-1)
  counts = jnp.bincount(index, length=dump + 1)[:dump]
  return counts.reshape(num_classes, num_classes).astype(jnp.int32)


def scores(conf: np.ndarray,
           class_names: Sequence[str] | None = None) -> dict[str, Any]:
  """Segmentation scores of a confusion matrix, in percent.

  Args:
    conf: (C, C) non-negative counts, rows = ground truth, cols = prediction.
    class_names: C names (default: '0'..'C-1').

  Returns:
    A dict with
      'miou': mean IoU over the classes present in GT or prediction (%),
      'per_class_iou': {name: IoU (%) or NaN if absent from GT and prediction},
      'pixel_acc': correct / counted pixels (%),
      'mean_acc': mean over classes present in GT of TP_c / GT_c (%),
      'fw_iou': sum over classes present in GT of (GT_c / N) * IoU_c (%),
      'present_gt', 'present_pred': names of classes with pixels in each,
      'num_pixels': N, the number of counted pixels.

  Raises:
    ValueError: conf is not square, has negative entries, names do not match,
      or no pixel was counted (the scores would be undefined).
  """
  conf = np.asarray(conf)
  if conf.ndim != 2 or conf.shape[0] != conf.shape[1]:
    raise ValueError(f'scores: expected a square (C, C) confusion matrix, got '
                     f'shape {conf.shape}.')
  if (conf < 0).any():
    raise ValueError('scores: the confusion matrix has negative counts.')
  num_classes = conf.shape[0]
  if class_names is None:
    class_names = [str(i) for i in range(num_classes)]
  class_names = list(class_names)
  if len(class_names) != num_classes:
    raise ValueError(f'scores: {len(class_names)} class names for a '
                     f'{num_classes}x{num_classes} confusion matrix.')
  conf = conf.astype(np.float64)
  total = conf.sum()
  if total == 0:
    raise ValueError('scores: the confusion matrix is empty (no labelled '
                     'pixel was counted).')
  tp = np.diag(conf)
  gt_count = conf.sum(axis=1)
  pred_count = conf.sum(axis=0)
  union = gt_count + pred_count - tp
  present = union > 0
  in_gt = gt_count > 0
  iou = np.full(num_classes, np.nan)
  iou[present] = tp[present] / union[present]
  recall = tp[in_gt] / gt_count[in_gt]
  return {
      'miou': 100.0 * float(iou[present].mean()),
      'per_class_iou': {name: 100.0 * float(value)
                        for name, value in zip(class_names, iou)},
      'pixel_acc': 100.0 * float(tp.sum() / total),
      'mean_acc': 100.0 * float(recall.mean()),
      'fw_iou': 100.0 * float((gt_count[in_gt] / total * iou[in_gt]).sum()),
      'present_gt': [n for n, p in zip(class_names, in_gt) if p],
      'present_pred': [n for n, p in zip(class_names, pred_count > 0) if p],
      'num_pixels': int(total),
  }


def _examples(source, max_images: int) -> tuple[Iterable[Any], int | None]:
  """Iterates a random-access source by index (or any iterable), capped."""
  if hasattr(source, '__len__') and hasattr(source, '__getitem__'):
    total = len(source)
    if max_images:
      total = min(total, max_images)
    return (source[i] for i in range(total)), total
  if max_images:
    return itertools.islice(source, max_images), None
  return source, None


def evaluate_label_folder(
    folder: LabelFolder | str | os.PathLike,
    source: Sequence[Mapping[str, Any]] | Iterable[Mapping[str, Any]],
    class_names: Sequence[str],
    *,
    allow_missing: bool = False,
    pred_ignore_label: int | None = None,
    max_images: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
  """Scores a folder of label PNGs against a split's ground-truth masks.

  This measures pseudo-mask quality (the "mIoU of pseudo labels on train" of
  every method) or saved predictions.

  Args:
    folder: a `LabelFolder` (or its path) holding `<image_id>.png` files.
    source: the split's decoded examples in the schema layout (e.g.
      `Dataset.source(split)`), each with 'mask' (uint8 (H, W)) and
      'image_id'.
    class_names: the C class names; label values are 0..C-1.
    allow_missing: False: any missing PNG raises `MissingLabelsError` (after
      the pass, listing the count and the first ids).  True: missing images
      are skipped and counted in 'num_missing'.
    pred_ignore_label: if set (e.g. 255 for pseudo-masks that leave pixels
      unlabelled), predicted pixels with this value are left out of the
      matrix and their share of the ground-truth-labelled pixels is reported
      as 'unlabeled_pct'.  If None, such values raise an error.
    max_images: evaluate only the first `max_images` examples (0 = all).
    progress: show a tqdm progress bar.

  Returns:
    `scores(...)` plus 'num_images' (scored), 'num_missing', 'missing_ids'
    (the first few), 'unlabeled_pct' and 'confusion' (int64 (C, C)).

  Raises:
    MissingLabelsError: missing files and not `allow_missing`, or nothing to
      score.
    LabelMapError: a PNG is unreadable or its size differs from the mask.
    ValueError: a PNG holds a value outside 0..C-1 (and not the ignore label).
  """
  if not isinstance(folder, LabelFolder):
    folder = LabelFolder(folder)
  if not os.path.isdir(folder.root):
    raise MissingLabelsError(f'Label folder {folder.root} does not exist.')
  num_classes = len(class_names)
  conf = np.zeros((num_classes, num_classes), np.int64)
  missing: list[str] = []
  num_images = 0
  num_unlabeled = 0
  existing = folder.existing_ids()
  examples, total = _examples(source, max_images)
  with progress_lib.bar(total=total, desc=f'eval {folder.root}',
                        show=progress, leave=False) as bar:
    for example in examples:
      bar.update(1)
      image_id = str(example[schema.IMAGE_ID])
      if image_id not in existing:
        missing.append(image_id)
        continue
      gt = np.asarray(example[schema.MASK])
      pred = folder.read(image_id, expected_hw=gt.shape)
      if pred_ignore_label is not None:
        unlabeled = (pred == pred_ignore_label) & (gt < num_classes)
        num_unlabeled += int(unlabeled.sum())
        gt = np.where(unlabeled, schema.IGNORE_LABEL, gt)
      try:
        conf += confusion_matrix(gt, pred, num_classes)
      except ValueError as exc:
        raise ValueError(f'Label map {folder.path(image_id)}: {exc}') from exc
      num_images += 1
  if missing:
    message = (f'{len(missing)} of {len(missing) + num_images} label maps are '
               f'missing in {folder.root} (first: '
               f'{", ".join(missing[:_NUM_LISTED])}).')
    if not allow_missing:
      raise MissingLabelsError(message)
    log.warning('%s Scored the remaining %d.', message, num_images)
  if num_images == 0:
    raise MissingLabelsError(f'No label map of the split was found in '
                             f'{folder.root}; nothing to score.')
  result = scores(conf, class_names)
  labelled = conf.sum() + num_unlabeled
  result.update(
      num_images=num_images,
      num_missing=len(missing),
      missing_ids=missing[:_NUM_LISTED],
      unlabeled_pct=100.0 * num_unlabeled / labelled if labelled else 0.0,
      confusion=conf,
  )
  return result
