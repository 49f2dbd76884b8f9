"""Tests of wsss_jax.data.label_png (label maps on disk)."""

from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

from wsss_jax.data import label_png
from wsss_jax.data import schema

VOC_MINI = os.path.join(os.path.dirname(__file__), 'data', 'voc_mini')


def _random_map(height=7, width=9, seed=0):
  label_map = np.random.RandomState(seed).randint(0, 21, (height, width))
  label_map = label_map.astype(np.uint8)
  label_map[0, 0] = 255
  return label_map


@pytest.mark.parametrize('palette, mode', [(True, 'P'), (False, 'L')])
def test_round_trip_keeps_class_ids(tmp_path, palette, mode):
  label_map = _random_map()
  path = tmp_path / 'a.png'
  label_png.write_label_png(path, label_map, palette=palette)
  with Image.open(path) as image:
    assert image.mode == mode
    if palette:
      stored = np.asarray(image.getpalette(), np.uint8).reshape(-1, 3)
      np.testing.assert_array_equal(stored, schema.voc_palette())
  read = label_png.read_label_png(path)
  assert read.dtype == np.uint8
  np.testing.assert_array_equal(read, label_map)


def test_write_accepts_wider_integer_dtypes(tmp_path):
  label_map = np.array([[0, 3], [20, 255]], np.int64)
  label_png.write_label_png(tmp_path / 'a.png', label_map)
  np.testing.assert_array_equal(label_png.read_label_png(tmp_path / 'a.png'),
                                label_map)


def test_official_voc_png_gives_ids_not_colours():
  path = os.path.join(VOC_MINI, 'SegmentationClass', '2007_000032.png')
  label_map = label_png.read_label_png(path)
  assert label_map.shape == (281, 500)
  # aeroplane (1), person (15), boundary (255), background (0).
  assert set(np.unique(label_map).tolist()) == {0, 1, 15, 255}


@pytest.mark.parametrize('bad, message', [
    (np.zeros((2, 3, 3), np.uint8), 'shape'),
    (np.zeros((2, 3), np.float32), 'integer'),
    (np.array([[0, 256]]), '0..255'),
    (np.array([[-1, 0]]), '0..255'),
])
def test_write_rejects_bad_label_maps(tmp_path, bad, message):
  with pytest.raises(label_png.LabelMapError, match=message):
    label_png.write_label_png(tmp_path / 'a.png', bad)
  assert not os.listdir(tmp_path)


def test_write_is_atomic_on_failure(tmp_path, monkeypatch):
  path = tmp_path / 'a.png'
  original = _random_map(seed=1)
  label_png.write_label_png(path, original)

  def failing_save(self, *args, **kwargs):
    raise OSError('disk full')

  monkeypatch.setattr(Image.Image, 'save', failing_save)
  with pytest.raises(OSError, match='disk full'):
    label_png.write_label_png(path, _random_map(seed=2))
  monkeypatch.undo()
  # The old file is intact and no temporary file is left behind.
  assert os.listdir(tmp_path) == ['a.png']
  np.testing.assert_array_equal(label_png.read_label_png(path), original)


def test_read_missing_file_names_it(tmp_path):
  with pytest.raises(FileNotFoundError, match='nothere.png'):
    label_png.read_label_png(tmp_path / 'nothere.png')


def test_read_corrupt_file_names_it(tmp_path):
  good = tmp_path / 'good.png'
  label_png.write_label_png(good, np.zeros((50, 60), np.uint8))
  data = good.read_bytes()
  truncated = tmp_path / 'truncated.png'
  truncated.write_bytes(data[:len(data) // 2])
  garbage = tmp_path / 'garbage.png'
  garbage.write_bytes(b'not a png at all')
  for path in (truncated, garbage):
    with pytest.raises(label_png.LabelMapError, match=path.name):
      label_png.read_label_png(path)


def test_read_rejects_colour_and_jpeg_files(tmp_path):
  rgb = tmp_path / 'rgb.png'
  Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(rgb)
  with pytest.raises(label_png.LabelMapError, match="mode 'RGB'"):
    label_png.read_label_png(rgb)
  jpeg = tmp_path / 'grey.png'
  Image.fromarray(np.zeros((4, 4), np.uint8)).save(jpeg, format='JPEG')
  with pytest.raises(label_png.LabelMapError, match='expected a PNG'):
    label_png.read_label_png(jpeg)


def test_label_folder_write_read_and_size_check(tmp_path):
  folder = label_png.LabelFolder(tmp_path / 'sub' / 'labels')
  label_map = _random_map(5, 6)
  path = folder.write('2007_000032', label_map)
  assert path == os.path.join(folder.root, '2007_000032.png')
  assert folder.exists('2007_000032') and not folder.exists('x')
  np.testing.assert_array_equal(folder.read('2007_000032', (5, 6)), label_map)
  with pytest.raises(label_png.LabelMapError) as info:
    folder.read('2007_000032', expected_hw=(6, 5))
  message = str(info.value)
  assert '2007_000032.png' in message
  assert '(5, 6)' in message and '(6, 5)' in message


def test_label_folder_missing_and_check_complete(tmp_path):
  folder = label_png.LabelFolder(tmp_path)
  ids = [f'img{i}' for i in range(10)]
  folder.write('img3', np.zeros((2, 2), np.uint8))
  assert folder.existing_ids() == {'img3'}
  missing = folder.missing(ids)
  assert missing == [i for i in ids if i != 'img3']
  folder.check_complete(['img3'])
  with pytest.raises(label_png.MissingLabelsError) as info:
    folder.check_complete(ids)
  message = str(info.value)
  assert '9 of 10' in message
  assert 'img0, img1, img2, img4, img5' in message
  assert 'img9' not in message          # only the first few are listed


def test_label_folder_missing_folder_means_all_missing(tmp_path):
  folder = label_png.LabelFolder(tmp_path / 'absent')
  assert folder.missing(['a', 'b']) == ['a', 'b']


@pytest.mark.parametrize('image_id', ['', '..', 'a/b', 'a\\b'])
def test_label_folder_rejects_unsafe_ids(tmp_path, image_id):
  with pytest.raises(ValueError, match='Invalid image id'):
    label_png.LabelFolder(tmp_path).path(image_id)


def test_label_folder_mode_l(tmp_path):
  folder = label_png.LabelFolder(tmp_path, palette=False)
  folder.write('a', np.ones((3, 3), np.uint8))
  with Image.open(folder.path('a')) as image:
    assert image.mode == 'L'


def test_overlay_hand_computed():
  image = np.full((1, 3, 3), 100, np.uint8)
  label_map = np.array([[0, 1, 255]], np.uint8)
  out = label_png.overlay(image, label_map, alpha=0.5)
  # Palette: 0 -> (0, 0, 0), 1 -> (128, 0, 0), 255 -> (224, 224, 192).
  np.testing.assert_array_equal(
      out[0], [[50, 50, 50], [114, 50, 50], [162, 162, 146]])
  np.testing.assert_array_equal(label_png.overlay(image, label_map, 0.0),
                                image)


def test_overlay_rejects_bad_inputs():
  image = np.zeros((2, 3, 3), np.uint8)
  with pytest.raises(ValueError, match='size'):
    label_png.overlay(image, np.zeros((3, 2), np.uint8))
  with pytest.raises(ValueError, match='uint8'):
    label_png.overlay(image.astype(np.float32), np.zeros((2, 3), np.uint8))
  with pytest.raises(ValueError, match='alpha'):
    label_png.overlay(image, np.zeros((2, 3), np.uint8), alpha=1.5)
