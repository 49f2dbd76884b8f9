"""Tests of wsss_jax.host.grabcut (GrabCut pseudo-masks) and of host-only
label folders (`wsss_jax.pseudo.engine.generate_label_folder`)."""

from __future__ import annotations

import functools
import os
import xml.etree.ElementTree as ElementTree

import cv2
import numpy as np
import pytest
from PIL import Image

from wsss_jax.data import boxes as box_lib
from wsss_jax.data import label_png
from wsss_jax.data import schema
from wsss_jax.host import grabcut
from wsss_jax.host import pool
from wsss_jax.pseudo import engine

VOC_MINI = os.path.join(os.path.dirname(__file__), 'data', 'voc_mini')


def _voc_example(image_id):
  """Image, GT mask and XML boxes (1-based inclusive -> half-open edges)."""
  with Image.open(os.path.join(VOC_MINI, 'JPEGImages',
                               f'{image_id}.jpg')) as image:
    rgb = np.asarray(image.convert('RGB'))
  mask = label_png.read_label_png(
      os.path.join(VOC_MINI, 'SegmentationClass', f'{image_id}.png'))
  root = ElementTree.parse(
      os.path.join(VOC_MINI, 'Annotations', f'{image_id}.xml')).getroot()
  boxes, labels = [], []
  for obj in root.iter('object'):
    bndbox = obj.find('bndbox')
    xmin, ymin, xmax, ymax = (int(float(bndbox.find(k).text))
                              for k in ('xmin', 'ymin', 'xmax', 'ymax'))
    boxes.append((xmin - 1, ymin - 1, xmax, ymax))
    labels.append(schema.VOC_CLASSES.index(obj.find('name').text))
  return {schema.IMAGE: rgb, schema.MASK: mask,
          schema.BOXES: np.asarray(boxes, np.int32),
          schema.BOX_LABELS: np.asarray(labels, np.int32),
          schema.IMAGE_ID: image_id}


def _iou(a, b):
  return (a & b).sum() / (a | b).sum()


# 2007_000243 (one aeroplane, box 180,126,274,193): GrabCut IoU 0.90 vs 0.33
# for the filled box.  2007_000039 (one tvmonitor): 0.89 vs 0.82.  On
# 2007_000042 (two trains) and 2007_000033 (small planes) GrabCut does worse
# than the box, so those images are not used for this check.
@pytest.mark.parametrize('image_id, min_gain', [('2007_000243', 0.4),
                                                ('2007_000039', 0.03)])
def test_grabcut_beats_filled_box_on_real_image(image_id, min_gain):
  example = _voc_example(image_id)
  image, gt = example[schema.IMAGE], example[schema.MASK]
  box, label = example[schema.BOXES][0], example[schema.BOX_LABELS][0]
  mask, fallback = grabcut.grabcut_box(image, box)
  assert fallback is None
  assert mask.dtype == bool and mask.shape == gt.shape
  filled = box_lib.box_coverage(box[None], *gt.shape)[0]
  assert not (mask & ~filled).any()                  # inside the box
  fraction = mask.sum() / filled.sum()
  assert 0.2 < fraction < 0.95
  target = (gt == label) & filled
  assert _iou(mask, target) > _iou(filled, target) + min_gain


def test_grabcut_is_deterministic():
  # On this box OpenCV's k-means initialisation depends on the RNG state
  # (seeds 0 and 1 give different masks), so reseeding per call matters.
  example = _voc_example('2007_000032')
  image, box = example[schema.IMAGE], example[schema.BOXES][0]
  first, _ = grabcut.grabcut_box(image, box)
  cv2.setRNGSeed(12345)
  cv2.randu(np.zeros((10, 10), np.float32), 0, 1)     # disturb the RNG
  second, _ = grabcut.grabcut_box(image, box)
  np.testing.assert_array_equal(first, second)
  other_seed, _ = grabcut.grabcut_box(image, box, seed=1)
  assert (other_seed != first).any()


def test_grabcut_label_map_on_real_image():
  example = _voc_example('2007_000032')     # 2 aeroplanes, 2 persons
  label_map, stats = grabcut.grabcut_label_map(
      example[schema.IMAGE], example[schema.BOXES],
      example[schema.BOX_LABELS])
  assert label_map.dtype == np.uint8 and label_map.shape == (281, 500)
  assert set(np.unique(label_map).tolist()) == {0, 1, 15}
  assert stats == {'boxes': 4, 'fallbacks': 0, 'fallback_small': 0,
                   'fallback_error': 0, 'fallback_empty': 0,
                   'boxes_dropped': 0}
  filled = grabcut.box_label_map(example[schema.IMAGE], example[schema.BOXES],
                                 example[schema.BOX_LABELS])[0]
  assert not (label_map[filled == 0]).any()         # nothing outside boxes
  # Per-class foregrounds lie inside the union of that class's boxes.
  for label in (1, 15):
    assert ((label_map == label) <= (filled > 0)).all()


def _nested_squares():
  """Grey image, blue 40x60 rectangle, red 15x20 square inside it."""
  image = np.full((60, 80, 3), 128, np.uint8)
  image[10:50, 10:70] = (0, 0, 255)
  image[20:35, 25:45] = (255, 0, 0)
  return image


@pytest.mark.parametrize('order', [(0, 1), (1, 0)])
def test_overlapping_boxes_smaller_on_top(order):
  boxes = np.array([[5, 5, 75, 55], [25, 20, 45, 35]])[list(order)]
  labels = np.array([1, 2])[list(order)]
  label_map, stats = grabcut.grabcut_label_map(_nested_squares(), boxes,
                                               labels)
  assert stats['fallbacks'] == 0
  assert (label_map[20:35, 25:45] == 2).all()       # small box wins
  assert label_map[45, 60] == 1 and label_map[12, 12] == 1
  assert label_map[2, 2] == 0 and label_map[57, 77] == 0
  # Inside the big box, the grey margin is GrabCut background.
  assert label_map[7, 40] == 0


def test_degenerate_and_failing_boxes_fall_back(monkeypatch):
  image = _nested_squares()
  thin = np.array([30, 10, 32, 40])                 # 2 px wide
  mask, fallback = grabcut.grabcut_box(image, thin)
  assert fallback == grabcut.FALLBACK_SMALL
  np.testing.assert_array_equal(mask, box_lib.box_coverage(thin[None],
                                                           60, 80)[0])
  # A box covering the whole image leaves GrabCut no background sample
  # (OpenCV raises).
  whole = np.array([0, 0, 80, 60])
  mask, fallback = grabcut.grabcut_box(image, whole)
  assert fallback == grabcut.FALLBACK_ERROR and mask.all()

  def no_foreground(*args, **kwargs):
    del args, kwargs                                  # leaves the mask at 0

  monkeypatch.setattr(cv2, 'grabCut', no_foreground)
  mask, fallback = grabcut.grabcut_box(image, [5, 5, 30, 30])
  assert fallback == grabcut.FALLBACK_EMPTY
  assert mask.sum() == 25 * 25

  def failing(*args, **kwargs):
    raise cv2.error('synthetic failure')

  monkeypatch.setattr(cv2, 'grabCut', failing)
  boxes = np.array([[5, 5, 75, 55], [30, 10, 32, 40], [-20, -20, -5, -5]])
  label_map, stats = grabcut.grabcut_label_map(image, boxes,
                                               np.array([1, 2, 3]))
  assert stats['fallback_error'] == 1 and stats['fallback_small'] == 1
  assert stats['fallbacks'] == 2 and stats['boxes'] == 2
  assert stats['boxes_dropped'] == 1                # outside the image
  np.testing.assert_array_equal(
      label_map, box_lib.fill_boxes(boxes[:2], np.array([1, 2]), 60, 80))


def test_no_boxes_gives_background():
  label_map, stats = grabcut.grabcut_label_map(
      _nested_squares(), np.zeros((0, 4), np.int32), np.zeros((0,), np.int32))
  assert not label_map.any() and stats['boxes'] == 0


def test_box_label_map_is_fill_boxes():
  boxes = np.array([[5, 5, 75, 55], [25, 20, 45, 35], [0, 0, 4, 4]])
  labels = np.array([1, 2, 0])                        # label 0 is ignored
  label_map, stats = grabcut.box_label_map(_nested_squares(), boxes, labels)
  np.testing.assert_array_equal(
      label_map, box_lib.fill_boxes(boxes[:2], labels[:2], 60, 80))
  assert stats == {'boxes': 2, 'boxes_dropped': 0}


def test_bad_inputs_raise():
  with pytest.raises(ValueError, match='uint8'):
    grabcut.grabcut_box(np.zeros((10, 10, 3), np.float32), [0, 0, 5, 5])
  with pytest.raises(ValueError, match='2 boxes but 1 box labels'):
    grabcut.grabcut_label_map(_nested_squares(), np.zeros((2, 4)), [1])


def _small_source():
  examples = []
  for index in range(3):
    image = np.roll(_nested_squares(), 3 * index, axis=1)
    examples.append({
        schema.IMAGE: image,
        schema.BOXES: np.array([[5 + 3 * index, 5, 75, 55]], np.int32),
        schema.BOX_LABELS: np.array([index + 1], np.int32),
        schema.IMAGE_ID: f'img{index}'})
  return examples


def test_generate_label_folder_is_resumable(tmp_path):
  source = _small_source()
  folder = label_png.LabelFolder(tmp_path / 'gc')
  fn = functools.partial(grabcut.grabcut_example, iterations=3)
  stats = engine.generate_label_folder(source, folder, fn, progress=False)
  assert stats['written'] == 3 and stats['skipped_existing'] == 0
  assert stats['total'] == 3 and stats['boxes'] == 3
  assert stats['fallbacks'] == 0
  for example in source:
    expected, _ = grabcut.grabcut_label_map(
        example[schema.IMAGE], example[schema.BOXES],
        example[schema.BOX_LABELS], iterations=3)
    np.testing.assert_array_equal(folder.read(example[schema.IMAGE_ID]),
                                  expected)
  again = engine.generate_label_folder(source, folder, fn, progress=False)
  assert again['written'] == 0 and again['skipped_existing'] == 3
  os.remove(folder.path('img1'))
  resumed = engine.generate_label_folder(source, folder, fn, progress=False)
  assert resumed['written'] == 1 and resumed['skipped_existing'] == 2
  assert resumed['boxes'] == 1
  folder.check_complete(['img0', 'img1', 'img2'])


def test_generate_label_folder_with_workers(tmp_path):
  source = _small_source()
  folder = label_png.LabelFolder(tmp_path / 'box')
  stats = engine.generate_label_folder(source, folder,
                                       grabcut.box_fill_example, workers=2,
                                       progress=False)
  assert stats == {'total': 3, 'written': 3, 'skipped_existing': 0,
                   'boxes': 3, 'boxes_dropped': 0}
  for example in source:
    np.testing.assert_array_equal(
        folder.read(example[schema.IMAGE_ID], expected_hw=(60, 80)),
        box_lib.fill_boxes(example[schema.BOXES], example[schema.BOX_LABELS],
                           60, 80))


def _wrong_size_labels(example):
  height, width = example[schema.IMAGE].shape[:2]
  return np.zeros((height + 1, width), np.uint8)


def _plain_labels(example):
  """A label function returning only the map (no stats)."""
  return np.full(example[schema.IMAGE].shape[:2], 7, np.uint8)


def test_generate_label_folder_accepts_plain_label_maps(tmp_path):
  folder = label_png.LabelFolder(tmp_path)
  stats = engine.generate_label_folder(_small_source(), folder, _plain_labels,
                                       progress=False)
  assert stats == {'total': 3, 'written': 3, 'skipped_existing': 0}
  assert (folder.read('img2') == 7).all()


def test_generate_label_folder_checks_label_fn_output(tmp_path):
  folder = label_png.LabelFolder(tmp_path)
  with pytest.raises(pool.WorkerError, match="item 0.*'img0'.*expected uint8"):
    engine.generate_label_folder(_small_source(), folder, _wrong_size_labels,
                                 progress=False)
  assert not folder.existing_ids()
