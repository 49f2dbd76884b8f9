"""Tests for wsss_jax.data.transforms (numpy augmentation, grain transforms)."""

from __future__ import annotations

import logging
import pickle

import grain
import hypothesis
import numpy as np
import pytest
from hypothesis import strategies as st
from PIL import Image, ImageEnhance

from wsss_jax import defaults
from wsss_jax.data import schema
from wsss_jax.data import color as C
from wsss_jax.data import pipeline
from wsss_jax.data import transforms as T

PSEUDO = 'pseudo'            # an extra label map: PSEUDO = mask + 100 off-pad
NUM_FG = 6
SETTINGS = hypothesis.settings(max_examples=150, deadline=None,
                               suppress_health_check=list(
                                   hypothesis.HealthCheck))


def make_example(seed: int, height: int, width: int, num_objects: int,
                 shapes: str = 'mixed', num_fg: int = NUM_FG) -> dict:
  """Objects painted into an instance map (later ones occlude earlier ones);
  each box is the exact extent of its object's visible pixels and its label
  is the object's id, which is also its value in `mask`."""
  rng = np.random.default_rng(seed)
  mask = np.zeros((height, width), np.uint8)
  rows, cols = np.ogrid[:height, :width]
  taken = np.zeros((height, width), bool)
  for k in range(1, num_objects + 1):
    y0, y1 = np.sort(rng.integers(0, height + 1, 2))
    x0, x1 = np.sort(rng.integers(0, width + 1, 2))
    y1, x1 = max(y1, y0 + 1), max(x1, x0 + 1)
    if shapes == 'rect_disjoint':
      if taken[y0:y1, x0:x1].any():
        continue
      taken[y0:y1, x0:x1] = True
    if shapes == 'mixed' and rng.random() < 0.5:
      cy, cx = (y0 + y1) / 2, (x0 + x1) / 2
      ry, rx = (y1 - y0) / 2, (x1 - x0) / 2
      inside = ((rows + .5 - cy) / ry) ** 2 + ((cols + .5 - cx) / rx) ** 2 <= 1
    else:
      inside = np.zeros((height, width), bool)
      inside[y0:y1, x0:x1] = True
    mask[inside] = k
  boxes, labels = [], []
  for k in range(1, num_objects + 1):
    ys, xs = np.nonzero(mask == k)
    if ys.size:
      boxes.append((xs.min(), ys.min(), xs.max() + 1, ys.max() + 1))
      labels.append(k)
  return {
      schema.IMAGE: rng.integers(0, 256, (height, width, 3), np.uint8),
      schema.MASK: mask,
      PSEUDO: np.where(mask > 0, mask + 100, 0).astype(np.uint8),
      schema.BOXES: np.asarray(boxes, np.int32).reshape(-1, 4),
      schema.BOX_LABELS: np.asarray(labels, np.int32),
      schema.IMAGE_LABELS: schema.image_labels_from_ids(labels, num_fg),
      schema.IMAGE_ID: f'img{seed}',
  }


def assert_boxes_match_objects(out: dict, tight: bool) -> None:
  """Every kept box bounds its object's visible pixels within 1 px and lies
  inside the image; objects visible on >= 2x2 pixels keep their box; with
  `tight` (unoccluded rectangles) box edges equal the visible extent +- 1."""
  mask = out[schema.MASK]
  height, width = mask.shape
  labels = out[schema.BOX_LABELS]
  boxes = out[schema.BOXES][labels >= 1]
  labels = labels[labels >= 1]
  assert len(set(labels.tolist())) == len(labels)
  assert np.all(boxes[:, [0, 1]] >= 0) and np.all(boxes[:, 2] <= width)
  assert np.all(boxes[:, 3] <= height)
  assert np.all(boxes[:, 2] > boxes[:, 0]) and np.all(boxes[:, 3] > boxes[:, 1])
  for k in range(1, NUM_FG + 1):
    ys, xs = np.nonzero(mask == k)
    if k not in labels:
      assert ys.size == 0 or np.ptp(ys) < 1 or np.ptp(xs) < 1, k
      continue
    x0, y0, x1, y1 = boxes[list(labels).index(k)]
    if ys.size == 0:
      if tight:
        assert min(x1 - x0, y1 - y0) <= 1
      continue
    assert xs.min() + .5 >= x0 - 1 and xs.max() + .5 <= x1 + 1
    assert ys.min() + .5 >= y0 - 1 and ys.max() + .5 <= y1 + 1
    if tight:
      np.testing.assert_allclose([xs.min(), ys.min(), xs.max() + 1,
                                  ys.max() + 1], [x0, y0, x1, y1], atol=1)


def check_label_maps(out: dict) -> None:
  mask, valid = out[schema.MASK], out[schema.VALID]
  np.testing.assert_array_equal(valid, mask != schema.IGNORE_LABEL)
  expected = np.where((mask > 0) & valid, mask + 100, mask).astype(np.uint8)
  np.testing.assert_array_equal(out[PSEUDO], expected)


# ----------------------------------------------------------------------------
# Invariants under random scale / crop / flip
# ----------------------------------------------------------------------------
@SETTINGS
@hypothesis.given(
    seed=st.integers(0, 2**16), height=st.integers(1, 48),
    width=st.integers(1, 48), num_objects=st.integers(0, 5),
    scale=st.floats(0.3, 2.5), crop=st.integers(1, 40),
    pad_mode=st.sampled_from(T.PAD_MODES), flip=st.booleans())
def test_boxes_follow_objects(seed, height, width, num_objects, scale, crop,
                              pad_mode, flip):
  for shapes, tight in (('mixed', False), ('rect_disjoint', True)):
    example = make_example(seed, height, width, num_objects, shapes)
    rng = np.random.default_rng(seed)
    out = T.random_scale(example, scale, (PSEUDO,))
    out = T.pad_and_crop(out, crop, rng, pad_mode, (1, 2, 3), (PSEUDO,))
    if flip:
      out = T.hflip(out, (PSEUDO,))
    assert out[schema.IMAGE].shape == (crop, crop, 3)
    check_label_maps(out)
    assert_boxes_match_objects(out, tight)


@SETTINGS
@hypothesis.given(
    seed=st.integers(0, 2**16), height=st.integers(1, 60),
    width=st.integers(1, 60), num_objects=st.integers(0, 5),
    crop=st.integers(1, 32), jitter=st.sampled_from([0.0, 0.5]),
    scales=st.sampled_from([(), (0.5, 0.75, 1.0, 1.25, 1.5)]))
def test_train_transform_fixed_shapes_and_consistency(
    seed, height, width, num_objects, crop, jitter, scales):
  example = make_example(seed, height, width, num_objects)
  transform = T.TrainTransform(
      crop_size=crop, num_foreground=NUM_FG, max_boxes=8,
      scale_range=(0.5, 1.5), scales=scales, color_jitter=jitter,
      pad_mode='symmetric', image_pad_value=(123, 117, 104),
      label_keys=(PSEUDO,))
  out = transform.random_map(example, np.random.default_rng(seed))
  expected = {schema.IMAGE: ((crop, crop, 3), np.uint8),
              schema.MASK: ((crop, crop), np.uint8),
              PSEUDO: ((crop, crop), np.uint8),
              schema.VALID: ((crop, crop), np.bool_),
              schema.BOXES: ((8, 4), np.float32),
              schema.BOX_LABELS: ((8,), np.int32),
              schema.IMAGE_LABELS: ((NUM_FG,), np.float32),
              T.NUM_BOXES_DROPPED: ((), np.int32)}
  assert set(out) == set(expected) | {schema.IMAGE_ID}
  for key, (shape, dtype) in expected.items():
    assert out[key].shape == shape and out[key].dtype == dtype, key
  assert out[T.NUM_BOXES_DROPPED] == 0
  padded_rows = out[schema.BOX_LABELS] == schema.BOX_PAD_LABEL
  assert np.all(out[schema.BOXES][padded_rows] == 0)
  check_label_maps(out)
  assert_boxes_match_objects(out, tight=False)
  again = transform.random_map(example, np.random.default_rng(seed))
  for key in expected:
    np.testing.assert_array_equal(out[key], again[key])


@SETTINGS
@hypothesis.given(seed=st.integers(0, 2**16), height=st.integers(1, 30),
                  width=st.integers(1, 30), num_objects=st.integers(0, 4))
def test_hflip_twice_is_identity(seed, height, width, num_objects):
  example = T.random_scale(make_example(seed, height, width, num_objects), 1.3)
  example[schema.VALID] = np.random.default_rng(seed).random(
      example[schema.MASK].shape) < 0.5
  twice = T.hflip(T.hflip(example, (PSEUDO,)), (PSEUDO,))
  for key in (schema.IMAGE, schema.MASK, PSEUDO, schema.VALID,
              schema.BOX_LABELS):
    np.testing.assert_array_equal(twice[key], example[key])
  # W - (W - x) in float32 may differ from x by one ulp.
  np.testing.assert_allclose(twice[schema.BOXES], example[schema.BOXES],
                             rtol=0, atol=1e-5)


def test_hflip_mirrors_boxes_and_pixels():
  example = make_example(0, 3, 4, 0)
  example[schema.BOXES] = np.array([[0, 0, 1, 2], [1, 1, 4, 3]], np.int32)
  example[schema.BOX_LABELS] = np.array([1, 2], np.int32)
  out = T.hflip(example)
  np.testing.assert_array_equal(out[schema.BOXES], [[3, 0, 4, 2], [0, 1, 3, 3]])
  assert out[schema.BOXES].dtype == np.float32
  np.testing.assert_array_equal(out[schema.IMAGE][:, 0],
                                example[schema.IMAGE][:, 3])


# ----------------------------------------------------------------------------
# Scale, pad, crop by hand
# ----------------------------------------------------------------------------
def test_random_scale_sizes_and_boxes():
  example = make_example(1, 10, 20, 0)
  example[schema.BOXES] = np.array([[2, 4, 10, 8]], np.int32)
  example[schema.BOX_LABELS] = np.array([1], np.int32)
  out = T.random_scale(example, 0.25, (PSEUDO,))
  # round(2.5) = 2 (Python rounds half to even), round(5.0) = 5.
  assert out[schema.IMAGE].shape == (2, 5, 3) and out[PSEUDO].shape == (2, 5)
  # Realised ratios 5/20 and 2/10.
  np.testing.assert_allclose(out[schema.BOXES], [[0.5, 0.8, 2.5, 1.6]])
  assert out[schema.BOXES].dtype == np.float32
  tiny = T.random_scale(example, 0.01)
  assert tiny[schema.IMAGE].shape == (1, 1, 3)
  # Nearest resizing creates no new label values.
  big = T.random_scale(make_example(3, 9, 9, 4), 1.7)
  assert set(np.unique(big[schema.MASK])) <= set(
      np.unique(make_example(3, 9, 9, 4)[schema.MASK]))
  with pytest.raises(ValueError, match='scale'):
    T.random_scale(example, 0.0)


def test_pad_bottom_right_values():
  example = make_example(2, 5, 7, 2)
  out = T.pad_and_crop(example, (10, 12), np.random.default_rng(0),
                       'bottom_right', (10, 20, 30), (PSEUDO,))
  for key in (schema.IMAGE, schema.MASK, PSEUDO):
    np.testing.assert_array_equal(out[key][:5, :7], example[key])
  pad = np.ones((10, 12), bool)
  pad[:5, :7] = False
  assert np.all(out[schema.IMAGE][pad] == (10, 20, 30))
  assert np.all(out[schema.MASK][pad] == 255)
  assert np.all(out[PSEUDO][pad] == 255)
  np.testing.assert_array_equal(out[schema.VALID], ~pad)
  np.testing.assert_array_equal(out[schema.BOXES], example[schema.BOXES])


def test_pad_symmetric_centres_image():
  example = make_example(2, 4, 5, 0)
  # Rows short by 6 -> 3 on each side exactly; columns short by 5 -> 3 on
  # each side (BANA's ceil), so the image starts at column 2 or 3.
  starts = set()
  for seed in range(20):
    out = T.pad_and_crop(example, (10, 10), np.random.default_rng(seed),
                         'symmetric')
    rows, cols = np.nonzero(out[schema.VALID])
    assert rows.min() == 3 and rows.max() == 6
    starts.add(int(cols.min()))
  assert starts == {2, 3}


def test_crop_of_a_large_image_is_a_window_and_clips_boxes():
  example = make_example(4, 30, 40, 0)
  example[schema.BOXES] = np.array([[0, 0, 40, 30], [0, 0, 2, 2]], np.int32)
  example[schema.BOX_LABELS] = np.array([1, 2], np.int32)
  out = T.pad_and_crop(example, 10, np.random.default_rng(5))
  assert out[schema.VALID].all()
  image = example[schema.IMAGE]
  found = [(y, x) for y in range(21) for x in range(31)
           if np.array_equal(image[y:y + 10, x:x + 10], out[schema.IMAGE])]
  assert len(found) == 1
  y, x = found[0]
  np.testing.assert_array_equal(out[schema.MASK],
                                example[schema.MASK][y:y + 10, x:x + 10])
  if x >= 2 or y >= 2:        # the small box left the crop
    np.testing.assert_array_equal(out[schema.BOXES], [[0, 0, 10, 10]])
    np.testing.assert_array_equal(out[schema.BOX_LABELS], [1])


def test_pad_to_and_eval_transform():
  example = make_example(6, 5, 7, 3)
  out = T.EvalTransform(bucket_size=8, num_foreground=NUM_FG, max_boxes=4,
                        label_keys=(PSEUDO,)).map(example)
  assert out[schema.IMAGE].shape == (8, 8, 3)
  assert out[T.HEIGHT] == 5 and out[T.WIDTH] == 7
  assert out[T.HEIGHT].dtype == np.int32
  np.testing.assert_array_equal(out[schema.MASK][:5, :7], example[schema.MASK])
  assert out[schema.VALID].sum() == 35
  np.testing.assert_array_equal(out[schema.BOXES][:len(example[schema.BOXES])],
                                example[schema.BOXES])
  with pytest.raises(ValueError, match=r"'img6' is 5x7.*bucket 6x6"):
    T.pad_to(example, 6)


# ----------------------------------------------------------------------------
# finalize
# ----------------------------------------------------------------------------
@pytest.mark.parametrize('num_boxes', [0, 3, 40])
def test_finalize_fixed_shapes(num_boxes, caplog, monkeypatch):
  example = make_example(7, 6, 6, 0)
  rng = np.random.default_rng(num_boxes)
  corners = rng.integers(0, 6, (num_boxes, 2))
  example[schema.BOXES] = np.concatenate([corners, corners + 1 + np.arange(
      num_boxes)[:, None] % 5], axis=1).astype(np.int32)
  example[schema.BOX_LABELS] = rng.integers(1, NUM_FG + 1, num_boxes,
                                            dtype=np.int32)
  monkeypatch.setattr(T, '_warned_box_overflow', False)
  with caplog.at_level(logging.WARNING):
    out = T.finalize(example, 4, NUM_FG)
    T.finalize(example, 4, NUM_FG)
  warnings = [r for r in caplog.records if 'max_boxes=4' in r.getMessage()]
  assert len(warnings) == (1 if num_boxes > 4 else 0)   # logged once only
  assert out[schema.BOXES].shape == (4, 4)
  assert out[schema.BOXES].dtype == np.float32
  assert out[schema.BOX_LABELS].shape == (4,)
  assert out[schema.BOX_LABELS].dtype == np.int32
  assert out[schema.VALID].dtype == np.bool_ and out[schema.VALID].all()
  assert out[T.NUM_BOXES_DROPPED] == max(0, num_boxes - 4)
  kept = min(num_boxes, 4)
  assert np.all(out[schema.BOX_LABELS][kept:] == -1)
  assert np.all(out[schema.BOX_LABELS][:kept] >= 1)
  assert np.all(out[schema.BOXES][kept:] == 0)


def test_finalize_keeps_largest_boxes_in_order():
  example = make_example(8, 10, 10, 0)
  example[schema.BOXES] = np.array(
      [[0, 0, 1, 1], [0, 0, 5, 5], [0, 0, 2, 2], [0, 0, 9, 9], [0, 0, 3, 3]],
      np.int32)
  example[schema.BOX_LABELS] = np.array([1, 2, 3, 4, 5], np.int32)
  out = T.finalize(example, 3, NUM_FG)
  np.testing.assert_array_equal(out[schema.BOX_LABELS], [2, 4, 5])
  np.testing.assert_array_equal(out[schema.BOXES][:, 2], [5, 9, 3])
  assert out[T.NUM_BOXES_DROPPED] == 2


def test_bad_inputs_raise_clear_errors():
  example = make_example(9, 6, 6, 2)
  with pytest.raises(ValueError, match="'img9'.*image_labels"):
    T.finalize(example, 4, NUM_FG + 1)
  bad = dict(example, box_labels=np.array([1, 9], np.int32))
  with pytest.raises(ValueError, match='box_labels must be in 1..6'):
    T.finalize(bad, 4, NUM_FG)
  with pytest.raises(KeyError, match="'img9'.*'missing'"):
    T.check_example(example, ('missing',))
  with pytest.raises(ValueError, match="label map 'pseudo'"):
    T.check_example(dict(example, pseudo=np.zeros((5, 6), np.uint8)),
                    (PSEUDO,))
  with pytest.raises(ValueError, match='"image" must be uint8'):
    T.check_example(dict(example, image=example['image'].astype(np.float32)))
  with pytest.raises(ValueError, match='pad_mode'):
    T.pad_and_crop(example, 4, np.random.default_rng(0), 'reflect')
  with pytest.raises(ValueError, match='crop_size'):
    T.pad_and_crop(example, 0, np.random.default_rng(0))
  with pytest.raises(ValueError, match='image_pad_value'):
    T.TrainTransform(crop_size=4, num_foreground=2, image_pad_value=(0, 300, 0))


# ----------------------------------------------------------------------------
# Colour jitter
# ----------------------------------------------------------------------------
def test_color_jitter_zero_is_identity_without_draw():
  image = make_example(10, 7, 9, 0)[schema.IMAGE]
  rng = np.random.default_rng(3)
  state = rng.bit_generator.state
  out = T.color_jitter(image, rng, 0.0)
  np.testing.assert_array_equal(out, image)
  assert rng.bit_generator.state == state


@SETTINGS
@hypothesis.given(seed=st.integers(0, 2**16), strength=st.floats(0.0, 3.0))
def test_color_jitter_stays_uint8(seed, strength):
  image = make_example(seed, 5, 6, 0)[schema.IMAGE]
  out = T.color_jitter(image, np.random.default_rng(seed), strength)
  assert out.dtype == np.uint8 and out.shape == image.shape
  if strength < 1e-3:
    # Each of the 3 steps truncates like PIL, so a factor just below 1 can
    # lower a value by 1 per step.
    assert np.abs(out.astype(int) - image).max() <= 3


def test_adjustments_by_hand():
  image = np.array([[[3, 5, 7], [250, 200, 1]]], np.uint8)
  # Brightness: x * f, truncated: 1.5 -> 1, 6.5 -> 6; 325 -> 255.
  np.testing.assert_array_equal(C.adjust_brightness(image, 0.5),
                                [[[1, 2, 3], [125, 100, 0]]])
  np.testing.assert_array_equal(C.adjust_brightness(image, 1.3),
                                [[[3, 6, 9], [255, 255, 1]]])
  # Luma (0.299, 0.587, 0.114, rounded): 4.8 -> 5 and 192.3 -> 192; the mean
  # grey is int(98.5 + .5) = 99, so contrast 0 gives a flat 99 image.
  np.testing.assert_array_equal(C.adjust_contrast(image, 0.0),
                                np.full((1, 2, 3), 99))
  # Saturation 0 gives the luma in every channel; 2 gives 2x - luma.
  np.testing.assert_array_equal(C.adjust_saturation(image, 0.0),
                                [[[5, 5, 5], [192, 192, 192]]])
  np.testing.assert_array_equal(C.adjust_saturation(image, 2.0),
                                [[[1, 5, 9], [255, 208, 0]]])


@pytest.mark.parametrize('factor', [0.0, 0.37, 0.8, 0.99999, 1.0, 1.45, 2.0])
def test_adjustments_match_pil_exactly(factor):
  image = np.random.default_rng(11).integers(0, 256, (9, 13, 3), np.uint8)
  pil = Image.fromarray(image)
  for ours, enhancer in ((C.adjust_brightness, ImageEnhance.Brightness),
                         (C.adjust_contrast, ImageEnhance.Contrast),
                         (C.adjust_saturation, ImageEnhance.Color)):
    expected = np.asarray(enhancer(pil).enhance(factor))
    np.testing.assert_array_equal(ours(image, factor), expected)


# ----------------------------------------------------------------------------
# Scale sampling, configuration, determinism, grain
# ----------------------------------------------------------------------------
def test_sample_scale():
  rng = np.random.default_rng(0)
  listed = (0.5, 0.75, 1.0, 1.25, 1.5)
  drawn = {T.sample_scale(rng, (9.0, 10.0), listed) for _ in range(200)}
  assert drawn == set(listed)
  values = [T.sample_scale(rng, (0.5, 1.5)) for _ in range(200)]
  assert 0.5 <= min(values) and max(values) <= 1.5 and len(set(values)) == 200
  with pytest.raises(ValueError, match='scale_range'):
    T.sample_scale(rng, (1.5, 0.5))


def test_from_config():
  config = defaults.input_pipeline(crop_size=24)
  config.scales = (0.5, 1.0)
  config.pad_mode = 'symmetric'
  pad = (123, 117, 104)
  transform = T.TrainTransform.from_config(config, num_foreground=NUM_FG,
                                           image_pad_value=pad)
  assert transform.crop_size == (24, 24) and transform.scales == (0.5, 1.0)
  assert transform.pad_mode == 'symmetric' and transform.max_boxes == 16
  config.pad_mode = 'reflect'
  with pytest.raises(ValueError, match='input.pad_mode'):
    T.TrainTransform.from_config(config, num_foreground=NUM_FG,
                                 image_pad_value=pad)


def test_grain_pipeline_is_deterministic():
  records = [make_example(s, 10 + s, 30 - s, s % 4) for s in range(6)]
  transform = T.TrainTransform(crop_size=16, num_foreground=NUM_FG,
                               max_boxes=3, scale_range=(0.5, 1.5),
                               color_jitter=0.5, label_keys=(PSEUDO,))

  def batches(seed):
    dataset = grain.MapDataset.source(records).seed(seed).random_map(
        transform).batch(3)
    return [dataset[i] for i in range(len(dataset))]

  first, second, other = batches(0), batches(0), batches(1)
  assert first[0][schema.IMAGE].shape == (3, 16, 16, 3)
  assert first[0][schema.BOXES].shape == (3, 3, 4)
  for a, b in zip(first, second):
    for key in (schema.IMAGE, schema.MASK, PSEUDO, schema.BOXES):
      np.testing.assert_array_equal(a[key], b[key])
  assert any(not np.array_equal(a[schema.IMAGE], b[schema.IMAGE])
             for a, b in zip(first, other))


# Slow: two loaders with a worker process each, and a resume.
@pytest.mark.slow
def test_one_grain_worker_gives_the_batches_of_none_and_resumes(tmp_path):
  # The benchmark default input.worker_count=1 must not change what is
  # trained on: same batches as inline loading, and a restorable state.
  from wsss_jax.data import pipeline, registry  # pylint: disable=g-import-not-at-top
  data_config = defaults.shapes_data('main')
  data_config.data_dir = str(tmp_path)
  data_config.shapes.update(image_size=32, num_train=24, num_val=4)
  source = registry.open_dataset(data_config).source('train')
  transform = T.TrainTransform.from_config(
      defaults.input_pipeline(crop_size=32, batch_size=4), num_foreground=6,
      image_pad_value=(0, 0, 0))

  def batches(iterator, count):
    return [next(iterator) for _ in range(count)]

  inline = batches(iter(pipeline.train_loader(source, transform, 4, 7, 0)), 8)
  pooled_iter = iter(pipeline.train_loader(source, transform, 4, 7, 1))
  pooled = batches(pooled_iter, 5)
  state = pooled_iter.get_state()
  resumed_iter = iter(pipeline.train_loader(source, transform, 4, 7, 1))
  resumed_iter.set_state(state)
  pooled += batches(resumed_iter, 3)
  for a, b in zip(inline, pooled, strict=True):
    assert a.keys() == b.keys()
    for key in a:
      np.testing.assert_array_equal(a[key], b[key], err_msg=key)


# --------------------------------------------------------------------------
# The in-memory record cache
# --------------------------------------------------------------------------
class _CountingSource:
  def __init__(self, size):
    self.reads = 0
    self.size = size

  def __len__(self):
    return self.size

  def __getitem__(self, index):
    self.reads += 1
    return {schema.IMAGE: np.full((4, 4, 3), index, np.uint8),
            schema.IMAGE_ID: f'img{index}'}

  def __repr__(self):
    return 'CountingSource()'


def test_memory_cache_reads_each_record_once_within_its_budget():
  source = _CountingSource(5)
  cache = pipeline.cached(source, 3 * 48 / 2**20)     # room for 3 images
  for _ in range(2):
    for index in range(5):
      assert cache[index][schema.IMAGE][0, 0, 0] == index
  assert source.reads == 3 + 2 * 2     # 3 cached, the other 2 read twice
  assert repr(cache) == 'CountingSource()'    # grain's restore check
  record = cache[0]
  record['extra'] = 1                  # a new dict each call
  assert 'extra' not in cache[0]
  with pytest.raises(ValueError):      # cached arrays are read-only
    cache[0][schema.IMAGE][0, 0, 0] = 7
  clone = pickle.loads(pickle.dumps(cache))   # a grain worker's copy
  assert clone._records == {}          # pylint: disable=protected-access
  assert pipeline.cached(source, 0) is source


def test_pad_image_batch_pads_bottom_right_and_fills_the_rest():
  a = np.full((2, 3, 3), 9, np.uint8)
  b = np.full((4, 1, 3), 5, np.uint8)
  batch = T.pad_image_batch([a, b], 4, 3, (1, 2, 3))
  assert batch.shape == (3, 4, 4, 3)
  assert (batch[0, :2, :3] == 9).all() and (batch[0, 2:] == (1, 2, 3)).all()
  assert (batch[0, :2, 3] == (1, 2, 3)).all()
  assert (batch[1, :, :1] == 5).all() and (batch[1, :, 1:] == (1, 2, 3)).all()
  assert (batch[2] == (1, 2, 3)).all()
  with pytest.raises(ValueError, match='larger than the bucket'):
    T.pad_image_batch([np.zeros((5, 1, 3), np.uint8)], 4, 1)
