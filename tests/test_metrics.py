"""Tests of wsss_jax.evaluation.metrics (confusion matrix, mIoU)."""

from __future__ import annotations

import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from wsss_jax.data import label_png
from wsss_jax.data import schema
from wsss_jax.evaluation import metrics

VOC_MINI = os.path.join(os.path.dirname(__file__), 'data', 'voc_mini')

# Hand-made example, C = 3.  The 255 pixel is ignored.
#   gt   = 0 0 1 / 1 2 255
#   pred = 0 1 1 / 1 0 2
GT = np.array([[0, 0, 1], [1, 2, 255]], np.uint8)
PRED = np.array([[0, 1, 1], [1, 0, 2]], np.uint8)
CONF = np.array([[1, 1, 0],
                 [0, 2, 0],
                 [1, 0, 0]])


def test_confusion_matrix_hand_made():
  conf = metrics.confusion_matrix(GT, PRED, 3)
  assert conf.dtype == np.int64
  np.testing.assert_array_equal(conf, CONF)


def test_scores_hand_made():
  result = metrics.scores(CONF, ['bg', 'a', 'b'])
  # IoU: bg 1/(2+2-1) = 1/3, a 2/(2+3-2) = 2/3, b 0/(1+0-0) = 0.
  assert result['per_class_iou']['bg'] == pytest.approx(100 / 3)
  assert result['per_class_iou']['a'] == pytest.approx(200 / 3)
  assert result['per_class_iou']['b'] == 0.0
  assert result['miou'] == pytest.approx(100 / 3)
  assert result['pixel_acc'] == pytest.approx(60.0)          # 3 / 5
  assert result['mean_acc'] == pytest.approx(50.0)           # (1/2 + 1 + 0)/3
  # fw = 2/5 * 1/3 + 2/5 * 2/3 + 1/5 * 0 = 6/15.
  assert result['fw_iou'] == pytest.approx(40.0)
  assert result['present_gt'] == ['bg', 'a', 'b']
  assert result['present_pred'] == ['bg', 'a']
  assert result['num_pixels'] == 5


def test_class_absent_from_gt_and_pred_is_nan_and_excluded():
  conf = np.zeros((4, 4), np.int64)
  conf[:3, :3] = CONF
  result = metrics.scores(conf)
  assert math.isnan(result['per_class_iou']['3'])
  assert result['miou'] == pytest.approx(100 / 3)
  assert result['mean_acc'] == pytest.approx(50.0)


def test_class_only_predicted_counts_as_zero():
  # Class 2 never in the GT but predicted once: IoU 0, included in the mean.
  conf = np.array([[3, 0, 1],
                   [0, 2, 0],
                   [0, 0, 0]])
  result = metrics.scores(conf)
  assert result['per_class_iou']['2'] == 0.0
  assert result['miou'] == pytest.approx(100 * (3 / 4 + 1 + 0) / 3)
  # Mean accuracy only averages classes with GT pixels.
  assert result['mean_acc'] == pytest.approx(100 * (3 / 4 + 1) / 2)
  assert result['present_gt'] == ['0', '1']
  assert result['present_pred'] == ['0', '1', '2']


def test_scores_rejects_bad_matrices():
  with pytest.raises(ValueError, match='empty'):
    metrics.scores(np.zeros((3, 3)))
  with pytest.raises(ValueError, match='square'):
    metrics.scores(np.zeros((3, 2)))
  with pytest.raises(ValueError, match='class names'):
    metrics.scores(CONF, ['a', 'b'])
  with pytest.raises(ValueError, match='negative'):
    metrics.scores(-CONF)


def test_confusion_matrix_rejects_bad_inputs():
  with pytest.raises(ValueError, match='outside 0..2'):
    metrics.confusion_matrix(GT, np.where(PRED == 1, 7, PRED), 3)
  with pytest.raises(ValueError, match='shape'):
    metrics.confusion_matrix(GT, PRED[:, :2], 3)
  with pytest.raises(ValueError, match='integer'):
    metrics.confusion_matrix(GT, PRED.astype(np.float32), 3)
  # A bad prediction on an ignored pixel is not an error.
  pred = PRED.copy()
  pred[1, 2] = 200
  np.testing.assert_array_equal(metrics.confusion_matrix(GT, pred, 3), CONF)


def _reference_confusion(gt, pred, num_classes, valid):
  conf = np.zeros((num_classes, num_classes), np.int64)
  keep = valid & (gt < num_classes)
  np.add.at(conf, (gt[keep], pred[keep]), 1)
  return conf


def test_confusion_matrix_jax_matches_numpy_and_reference():
  rng = np.random.RandomState(0)
  gt = rng.randint(0, 5, (2, 9, 11)).astype(np.uint8)
  gt[rng.rand(*gt.shape) < 0.2] = 255
  pred = rng.randint(0, 5, gt.shape).astype(np.int32)
  valid = rng.rand(*gt.shape) < 0.8
  fn = jax.jit(metrics.confusion_matrix_jax, static_argnums=2)
  conf_all = np.asarray(fn(jnp.asarray(gt), jnp.asarray(pred), 5))
  np.testing.assert_array_equal(conf_all, metrics.confusion_matrix(gt, pred, 5))
  conf_valid = np.asarray(fn(jnp.asarray(gt), jnp.asarray(pred), 5,
                             jnp.asarray(valid)))
  np.testing.assert_array_equal(
      conf_valid, _reference_confusion(gt, pred, 5, valid))
  np.testing.assert_array_equal(
      metrics.confusion_matrix(np.where(valid, gt, 255), pred, 5), conf_valid)


def test_confusion_matrix_jax_drops_out_of_range_predictions():
  pred = jnp.asarray(np.where(PRED == 1, 9, PRED))
  conf = np.asarray(metrics.confusion_matrix_jax(jnp.asarray(GT), pred, 3))
  expected = CONF.copy()
  expected[:, 1] = 0
  np.testing.assert_array_equal(conf, expected)
  assert conf.dtype == np.int32


def _voc_example(image_id):
  mask = label_png.read_label_png(
      os.path.join(VOC_MINI, 'SegmentationClass', f'{image_id}.png'))
  return {schema.IMAGE_ID: image_id, schema.MASK: mask}


@pytest.fixture
def voc_source():
  return [_voc_example('2007_000032'), _voc_example('2007_000039')]


def test_evaluate_label_folder_on_real_masks(tmp_path, voc_source):
  folder = label_png.LabelFolder(tmp_path / 'labels')
  with pytest.raises(label_png.MissingLabelsError, match='does not exist'):
    metrics.evaluate_label_folder(folder, voc_source, schema.VOC_CLASSES,
                                  progress=False)
  for example in voc_source:
    folder.write(example[schema.IMAGE_ID],
                 np.where(example[schema.MASK] == 255, 0, example[schema.MASK]))
  result = metrics.evaluate_label_folder(folder, voc_source,
                                         schema.VOC_CLASSES, progress=False)
  assert result['miou'] == 100.0
  assert result['num_images'] == 2 and result['num_missing'] == 0
  assert result['present_gt'] == ['background', 'aeroplane', 'person',
                                  'tvmonitor']
  # Predict everything as background: IoU(bg) = bg / all counted pixels.
  for example in voc_source:
    folder.write(example[schema.IMAGE_ID],
                 np.zeros_like(example[schema.MASK]))
  result = metrics.evaluate_label_folder(folder, voc_source,
                                         schema.VOC_CLASSES, progress=False)
  masks = np.concatenate([e[schema.MASK].ravel() for e in voc_source])
  masks = masks[masks != 255]
  bg_iou = 100 * np.mean(masks == 0)
  assert result['per_class_iou']['background'] == pytest.approx(bg_iou)
  assert result['miou'] == pytest.approx(bg_iou / 4)
  assert result['num_pixels'] == masks.size


def test_evaluate_label_folder_missing_files(tmp_path, voc_source):
  folder = label_png.LabelFolder(tmp_path)
  folder.write('2007_000039', voc_source[1][schema.MASK] % 255)
  with pytest.raises(label_png.MissingLabelsError) as info:
    metrics.evaluate_label_folder(str(tmp_path), voc_source,
                                  schema.VOC_CLASSES, progress=False)
  assert '1 of 2' in str(info.value) and '2007_000032' in str(info.value)
  result = metrics.evaluate_label_folder(folder, voc_source,
                                         schema.VOC_CLASSES,
                                         allow_missing=True, progress=False)
  assert result['num_missing'] == 1
  assert result['missing_ids'] == ['2007_000032']
  assert result['num_images'] == 1
  assert result['present_gt'] == ['background', 'tvmonitor']
  # max_images=1 only looks at the first (missing) example: nothing to score.
  with pytest.raises(label_png.MissingLabelsError, match='nothing to score'):
    metrics.evaluate_label_folder(folder, voc_source, schema.VOC_CLASSES,
                                  allow_missing=True, max_images=1,
                                  progress=False)


def test_evaluate_label_folder_size_mismatch_names_file(tmp_path, voc_source):
  folder = label_png.LabelFolder(tmp_path)
  folder.write('2007_000032', np.zeros((10, 10), np.uint8))
  with pytest.raises(label_png.LabelMapError) as info:
    metrics.evaluate_label_folder(folder, voc_source[:1], schema.VOC_CLASSES,
                                  progress=False)
  message = str(info.value)
  assert '2007_000032.png' in message and '(281, 500)' in message


def test_evaluate_label_folder_unlabelled_pixels(tmp_path):
  gt = np.array([[0, 0, 1, 1], [1, 1, 255, 0]], np.uint8)
  pred = np.array([[0, 255, 1, 255], [1, 0, 255, 0]], np.uint8)
  source = [{schema.IMAGE_ID: 'x', schema.MASK: gt}]
  folder = label_png.LabelFolder(tmp_path)
  folder.write('x', pred)
  with pytest.raises(ValueError, match='x.png.*outside 0..1'):
    metrics.evaluate_label_folder(folder, source, ['bg', 'fg'],
                                  progress=False)
  result = metrics.evaluate_label_folder(folder, source, ['bg', 'fg'],
                                         pred_ignore_label=255,
                                         progress=False)
  # 7 labelled GT pixels, 2 of them unlabelled in pred; the 255/255 pixel is
  # ignored by the GT.  Remaining: bg->bg 2, fg->fg 2, fg->bg 1.
  np.testing.assert_array_equal(result['confusion'], [[2, 0], [1, 2]])
  assert result['unlabeled_pct'] == pytest.approx(100 * 2 / 7)
  assert result['miou'] == pytest.approx(100 * (2 / 3 + 2 / 3) / 2)


class _IndexOnlySource:
  """Random access without __iter__, like registry.DecodedSource."""

  def __init__(self, examples):
    self._examples = examples

  def __len__(self):
    return len(self._examples)

  def __getitem__(self, index):
    return self._examples[index]


def test_evaluate_label_folder_random_access_source(tmp_path, voc_source):
  folder = label_png.LabelFolder(tmp_path)
  for example in voc_source:
    folder.write(example[schema.IMAGE_ID], example[schema.MASK])
  result = metrics.evaluate_label_folder(
      folder, _IndexOnlySource(voc_source), schema.VOC_CLASSES,
      max_images=1, progress=False)
  assert result['num_images'] == 1 and result['miou'] == 100.0
