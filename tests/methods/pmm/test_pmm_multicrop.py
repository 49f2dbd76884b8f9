"""PMM multi-crop: window layout, crop/paste matrices, the multi-crop CAM,
the crop label rule and the training sampler, on cases worked out by hand."""

from __future__ import annotations

import cv2
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from wsss_jax.data import schema
from wsss_jax.data import transforms
from wsss_jax.methods.pmm import multicrop as mc
from wsss_jax.methods.pmm import multicrop_sampler as sampler

IGNORE = schema.IGNORE_LABEL
BASE = 'base'


# ----------------------------------------------------------------------------
# Layout
# ----------------------------------------------------------------------------
def test_pmm_scales_are_the_papers():
  np.testing.assert_allclose(mc.PMM_SCALES, np.arange(0.75, 3.01, 0.25))


@pytest.mark.parametrize('layout', mc.LAYOUTS)
def test_layout_counts_for_a_voc_image(layout):
  # 500x375 (W x H), window 448, stride 300; per scale s, w_s = int(500 s),
  # h_s = int(375 s), count = (1 + ceil(max(0, w_s-448)/300))
  #                         * (1 + ceil(max(0, h_s-448)/300)):
  #   0.75: 375x281   -> 1*1 = 1      1.00: 500x375   -> 2*1 = 2
  #   1.25: 625x468   -> 2*2 = 4      1.50: 750x562   -> 3*2 = 6
  #   1.75: 875x656   -> 3*2 = 6      2.00: 1000x750  -> 3*3 = 9
  #   2.25: 1125x843  -> 4*3 = 12     2.50: 1250x937  -> 4*3 = 12
  #   2.75: 1375x1031 -> 5*3 = 15     3.00: 1500x1125 -> 5*4 = 20
  # Total 87 for both layouts: they differ in the window extents, not in the
  # number of windows (the 'paper' layout clamps the start of the last
  # window, the 'pmm_code' layout shortens the others to the stride).
  rows = mc.window_layout(375, 500, mc.PMM_SCALES, 448, 300, layout)
  assert rows.shape == (87, 5)
  np.testing.assert_array_equal(np.bincount(rows[:, 0]),
                                [1, 2, 4, 6, 6, 9, 12, 12, 15, 20])
  x0, y0, x1, y1 = rows[:, 1:].T
  assert (x0 >= 0).all() and (y0 >= 0).all()
  assert (x1 <= 500).all() and (y1 <= 375).all()
  assert (x1 > x0).all() and (y1 > y0).all()


def test_layout_boxes_by_hand_at_scale_1_5():
  # Scale 1.5 of 500x375: 750x562 resized pixels.
  # paper: columns [0,448) [300,748) [302,750), rows [0,448) [114,562);
  #   /1.5 and truncated: x 0-298, 200-498, 201-500; y 0-298, 76-374.
  # pmm_code: columns [0,300) [300,600) [302,750), rows [0,300) [114,562);
  #   x 0-200, 200-400, 201-500; y 0-200, 76-374.
  paper = mc.window_layout(375, 500, (1.5,), 448, 300, 'paper')
  np.testing.assert_array_equal(paper, [
      [0, 0, 0, 298, 298], [0, 200, 0, 498, 298], [0, 201, 0, 500, 298],
      [0, 0, 76, 298, 374], [0, 200, 76, 498, 374], [0, 201, 76, 500, 374]])
  code = mc.window_layout(375, 500, (1.5,), 448, 300, 'pmm_code')
  np.testing.assert_array_equal(code, [
      [0, 0, 0, 200, 200], [0, 200, 0, 400, 200], [0, 201, 0, 500, 200],
      [0, 0, 76, 200, 374], [0, 200, 76, 400, 374], [0, 201, 76, 500, 374]])


def test_layout_small_image_and_minimum_size():
  # 3x2 image at scale 0.25: w_s = h_s = 0 -> one window clamped to 1 pixel.
  rows = mc.window_layout(3, 2, (0.25, 1.0), 448, 300)
  np.testing.assert_array_equal(rows, [[0, 0, 0, 1, 1], [1, 0, 0, 2, 3]])


@pytest.mark.parametrize('kwargs', [
    dict(layout='sliding'), dict(window=0), dict(stride=-1),
    dict(scales=()), dict(scales=(1.0, 0.0)), dict(height=0)])
def test_layout_rejects_bad_arguments(kwargs):
  args = dict(height=10, width=10, scales=(1.0,), window=4, stride=2,
              layout='paper')
  args.update(kwargs)
  name = next(iter(kwargs))
  with pytest.raises(ValueError, match=name):
    mc.window_layout(**args)


def test_padded_window_boxes():
  boxes, valid = mc.padded_window_boxes(375, 500, mc.PMM_SCALES, 448, 300,
                                        'paper', 90)
  assert boxes.shape == (90, 4) and boxes.dtype == np.float32
  assert valid.sum() == 87 and not valid[87:].any()
  np.testing.assert_array_equal(boxes[87:], [[0, 0, 1, 1]] * 3)
  with pytest.raises(ValueError, match='max_windows'):
    mc.padded_window_boxes(375, 500, mc.PMM_SCALES, 448, 300, 'paper', 86)


# ----------------------------------------------------------------------------
# crop_resize / paste_average
# ----------------------------------------------------------------------------
def test_crop_resize_identity_box_returns_the_image():
  image = np.random.default_rng(0).uniform(0, 255, (2, 7, 7, 3))
  boxes = np.array([[[0, 0, 7, 7]], [[0, 0, 7, 7]]], np.float32)
  out = mc.crop_resize(jnp.asarray(image, jnp.float32), boxes, 7)
  assert out.shape == (2, 1, 7, 7, 3) and out.dtype == jnp.float32
  np.testing.assert_allclose(out[:, 0], image, atol=1e-4)


def test_crop_resize_half_box_by_hand():
  # image[y, x] = 10 x on a 4x4 image; box x in [2, 4), all rows, size 4.
  # Columns: src = 2 + (i + .5)·2/4 − .5 = 1.75, 2.25, 2.75, 3.25, clamped
  # to [2, 3] -> 2, 2.25, 2.75, 3 -> values 20, 22.5, 27.5, 30.  Rows: 4 -> 4
  # is the identity.
  image = np.tile(10.0 * np.arange(4), (4, 1))[None, :, :, None]
  out = mc.crop_resize(jnp.asarray(image, jnp.float32),
                       np.array([[[2, 0, 4, 4]]], np.float32), 4)
  np.testing.assert_allclose(out[0, 0, :, :, 0],
                             np.tile([20.0, 22.5, 27.5, 30.0], (4, 1)))


def test_crop_resize_equals_resizing_the_cut_out_box():
  image = np.random.default_rng(1).uniform(0, 255, (1, 20, 30, 3))
  image = jnp.asarray(image, jnp.float32)
  boxes = np.array([[[3, 5, 17, 19], [10, 0, 30, 9]]], np.float32)
  for size in (6, 23):              # down- and up-sampling
    out = mc.crop_resize(image, boxes, size)
    for n, (x0, y0, x1, y1) in enumerate(boxes[0].astype(int)):
      ref = jax.image.resize(image[:, y0:y1, x0:x1], (1, size, size, 3),
                             'bilinear', antialias=False)
      np.testing.assert_allclose(out[:, n], ref, atol=2e-3)


def test_paste_matrix_by_hand():
  # A 2-pixel map [0, 10] pasted onto x in [1, 5) of a 6-pixel axis:
  # src = (x + .5 − 1)·2/4 − .5 = −.25, .25, .75, 1.25 -> clamped 0, .25,
  # .75, 1 -> 0, 2.5, 7.5, 10; pixels 0 and 5 are outside (0).
  matrix = mc.paste_matrix(jnp.float32(1), jnp.float32(5), 2, 6)
  np.testing.assert_allclose(matrix @ jnp.array([0.0, 10.0]),
                             [0, 0, 2.5, 7.5, 10, 0])


def test_paste_average_of_constant_maps_by_hand():
  # 3x4 output.  Box A x[0,2) y[0,2) value 1, box B x[1,3) y[0,2) value 4,
  # box C everything, value 100 but invalid.  Rows 0-1: column 0 only A
  # (1), column 1 both ((1 + 4)/2 = 2.5), column 2 only B (4), column 3
  # uncovered (0); row 2 uncovered (0).  Image 1 has only invalid boxes: 0.
  maps = np.zeros((2, 3, 2, 2, 1), np.float32)
  maps[0, 0], maps[0, 1], maps[0, 2] = 1.0, 4.0, 100.0
  maps[1] = 100.0
  boxes = np.array([[[0, 0, 2, 2], [1, 0, 3, 2], [0, 0, 4, 3]]] * 2,
                   np.float32)
  valid = np.array([[True, True, False], [False, False, False]])
  out = mc.paste_average(maps, boxes, valid, (3, 4))
  assert out.shape == (2, 3, 4, 1)
  expected = np.array([[1, 2.5, 4, 0], [1, 2.5, 4, 0], [0, 0, 0, 0]])
  np.testing.assert_allclose(out[0, ..., 0], expected)
  np.testing.assert_allclose(out[1], 0.0)


def test_paste_average_is_finite_with_finite_gradients_when_empty():
  maps = jnp.ones((1, 2, 3, 3, 2))
  boxes = jnp.zeros((1, 2, 4))                  # degenerate padding boxes
  valid = jnp.zeros((1, 2), bool)

  def total(m, b):
    return mc.paste_average(m, b, valid, (5, 5)).sum()

  value, grads = jax.value_and_grad(total, argnums=(0, 1))(maps, boxes)
  assert value == 0.0
  assert all(np.isfinite(g).all() for g in grads)


def test_paste_average_rejects_bad_shapes():
  with pytest.raises(ValueError, match='valid'):
    mc.paste_average(jnp.ones((1, 2, 3, 3, 1)), jnp.zeros((1, 2, 4)),
                     jnp.ones((1, 3), bool), (4, 4))
  with pytest.raises(ValueError, match='out_hw'):
    mc.paste_average(jnp.ones((1, 2, 3, 3, 1)), jnp.zeros((1, 2, 4)),
                     jnp.ones((1, 2), bool), (4, 0))


# ----------------------------------------------------------------------------
# multicrop_cam
# ----------------------------------------------------------------------------
def _first_channel(windows):
  return windows[..., :1]


def test_multicrop_cam_with_identity_windows_reproduces_the_image():
  # 10x13 image, scale 1, window 8, stride 5, 'paper' layout: columns [0, 8)
  # and [5, 13), rows [0, 8) and [2, 10): four 8x8 windows covering the
  # image, each cut without resizing, so cam = first channel is pasted back
  # unchanged (flip and unflip cancel) and every average is the pixel value.
  image = np.random.default_rng(2).uniform(0, 255, (1, 10, 13, 3))
  boxes, valid = mc.padded_window_boxes(10, 13, (1.0,), 8, 5, 'paper', 6)
  np.testing.assert_array_equal(boxes[:4], [[0, 0, 8, 8], [5, 0, 13, 8],
                                            [0, 2, 8, 10], [5, 2, 13, 10]])
  out = jax.jit(mc.multicrop_cam, static_argnums=(0, 4))(
      _first_channel, jnp.asarray(image, jnp.float32), boxes[None],
      valid[None], 8)
  assert out.shape == (1, 10, 13, 1)
  np.testing.assert_allclose(out[0, ..., 0], image[0, ..., 0], atol=1e-3)


def test_multicrop_cam_of_constant_images_at_many_scales():
  # Stretching a constant window and resizing it back keeps the constant,
  # whatever the box, the grid of the maps or the flip; covered pixels give
  # the image's constant, uncovered ones (the pmm_code truncation) 0.
  # Windows (window 8, stride 5): 0.75: 10x8 -> 2x1; 1.0: 14x11 -> 3x2;
  # 1.75: 24x19 -> 5x4; 28 in all, padded to 30.
  height, width = 11, 14
  images = np.stack([np.full((height, width, 3), 7.0),
                     np.full((height, width, 3), 50.0)])
  boxes, valid = mc.padded_window_boxes(height, width, (0.75, 1.0, 1.75),
                                        8, 5, 'pmm_code', 30)

  def pooled_cam(windows):              # a 4x4 grid, two channels
    pooled = windows.reshape(windows.shape[0], 4, 2, 4, 2, 3).mean((2, 4))
    return jnp.concatenate([pooled[..., :1], 2.0 * pooled[..., 1:2]], -1)

  out = mc.multicrop_cam(pooled_cam, images, np.stack([boxes] * 2),
                         np.stack([valid] * 2), 8, chunk=3)
  covered = np.zeros((height, width), bool)
  for x0, y0, x1, y1 in boxes[valid].astype(int):
    covered[y0:y1, x0:x1] = True
  for b, value in enumerate((7.0, 50.0)):
    np.testing.assert_allclose(out[b, covered], [[value, 2 * value]] *
                               covered.sum(), rtol=1e-5)
    np.testing.assert_allclose(out[b, ~covered], 0.0)


def _reference_multicrop(cam_fn, image, boxes, window):
  """A per-window loop with cv2 bilinear resizing (align_corners=False, no
  antialias on float32 images): the test-side reference."""
  height, width = image.shape[:2]
  canvas, counter = 0.0, np.zeros((height, width, 1))
  for x0, y0, x1, y1 in boxes.astype(int):
    crop = cv2.resize(np.ascontiguousarray(image[y0:y1, x0:x1]),
                      (window, window), interpolation=cv2.INTER_LINEAR)
    maps = np.asarray(cam_fn(np.stack([crop, crop[:, ::-1]])))
    maps = 0.5 * (maps[0] + maps[1, :, ::-1])
    back = cv2.resize(np.ascontiguousarray(maps), (x1 - x0, y1 - y0),
                      interpolation=cv2.INTER_LINEAR).reshape(
                          y1 - y0, x1 - x0, -1)
    canvas = canvas + np.pad(back, ((y0, height - y1), (x0, width - x1),
                                    (0, 0)))
    counter[y0:y1, x0:x1] += 1
  return canvas / np.maximum(counter, 1)


def _nonlinear_cam(windows):
  """A 3x3 grid of flip-asymmetric, nonlinear class maps (numpy or jax)."""
  xp = jnp if isinstance(windows, jax.Array) else np
  pooled = windows.reshape(windows.shape[0], 3, 3, 3, 3, 3).mean((2, 4))
  ramp = xp.arange(3.0)[None, None, :, None]
  return xp.concatenate([xp.sqrt(pooled[..., :1]) * (1 + ramp),
                         pooled[..., 1:2] - pooled[..., 2:3]], -1)


def test_multicrop_cam_matches_a_per_window_reference_and_chunking():
  # Windows (window 9, stride 6): 0.5: 8x6 -> 1; 1.0: 17x12 -> 3x2;
  # 1.5: 25x18 -> 4x3; 19 in all, padded to 20; chunks of 6 pad to 24.
  height, width, window = 12, 17, 9
  image = np.random.default_rng(3).uniform(0, 255, (height, width, 3))
  image = image.astype(np.float32)
  boxes, valid = mc.padded_window_boxes(height, width, (0.5, 1.0, 1.5),
                                        window, 6, 'paper', 20)
  ref = _reference_multicrop(_nonlinear_cam, image, boxes[valid], window)
  outs = [mc.multicrop_cam(_nonlinear_cam, image[None], boxes[None],
                           valid[None], window, chunk=chunk)[0]
          for chunk in (None, 6)]
  np.testing.assert_allclose(outs[0], ref, rtol=1e-4, atol=1e-3)
  np.testing.assert_allclose(outs[1], outs[0], rtol=1e-5, atol=1e-4)


def test_multicrop_cam_without_valid_boxes_is_zero_with_finite_grads():
  image = jnp.ones((1, 6, 6, 3))
  boxes = jnp.zeros((1, 2, 4))
  valid = jnp.zeros((1, 2), bool)
  fn = lambda x: mc.multicrop_cam(_first_channel, x, boxes, valid, 4).sum()
  value, grad = jax.value_and_grad(fn)(image)
  assert value == 0.0 and np.isfinite(grad).all()


def test_multicrop_cam_rejects_bad_arguments():
  with pytest.raises(ValueError, match='valid'):
    mc.multicrop_cam(_first_channel, jnp.ones((1, 6, 6, 3)),
                     jnp.zeros((1, 2, 4)), jnp.zeros((1, 3), bool), 4)
  with pytest.raises(ValueError, match='chunk'):
    mc.multicrop_cam(_first_channel, jnp.ones((1, 6, 6, 3)),
                     jnp.zeros((1, 2, 4)), jnp.zeros((1, 2), bool), 4,
                     chunk=0)


# ----------------------------------------------------------------------------
# Crop label rule and window sampler
# ----------------------------------------------------------------------------
def _rule_base_map():
  """20x20 base map, box (0, 0, 10, 10) (100 px); classes 1..5 (K = 5):
  1: rows 0-1, cols 0-9: 20 px, all in the box -> 20/20 > .1   positive
  2: rows 8-19, all cols: 240 px, 20 in the box -> 20/240 = .083, but
     20/100 = .2 > .1                                           positive
  3: rows 2-7, cols 10-19 plus pixel (2, 9): 61 px, 1 in the box
     -> 1/61, 1/100: neither                                    negative
  4: in the image labels, no pixel                              negative
  5: rows 2-7, cols 0-8: 54 px all inside, not in image labels negative
  Rows 0-1, cols 10-19: 255; rows 3-7, col 9: background."""
  base = np.zeros((20, 20), np.uint8)
  base[0:2, 0:10] = 1
  base[0:2, 10:] = IGNORE
  base[8:, :] = 2
  base[2:8, 10:] = 3
  base[2, 9] = 3
  base[2:8, 0:9] = 5
  return base


def test_crop_label_rule_by_hand():
  labels = sampler.crop_label_rule(_rule_base_map(), (0, 0, 10, 10),
                              np.array([1, 1, 1, 1, 0], bool), 0.1)
  np.testing.assert_array_equal(labels, [True, True, False, False, False])
  assert labels.dtype == bool and labels.shape == (5,)


def test_crop_label_rule_thresholds_are_strict():
  # Box (0, 0, 5, 2): rows 0-1, columns 0-4, 10 px.  Class 1: row 3,
  # columns 0-8, plus pixel (0, 4): 10 px, 1 in the box -> 1/10 of the
  # region = .1 and 1/10 of the box = .1, neither > .1 -> negative.
  # Class 2: pixels (1, 0) and (1, 1), both in the box -> positive.
  base = np.zeros((4, 10), np.uint8)
  base[3, 0:9] = 1
  base[0, 4] = 1
  base[1, 0:2] = 2
  labels = sampler.crop_label_rule(base, (0, 0, 5, 2), np.ones(2, bool), 0.1)
  np.testing.assert_array_equal(labels, [False, True])
  # ratio 0: any overlap counts.
  labels = sampler.crop_label_rule(base, (0, 0, 5, 2), np.ones(2, bool), 0.0)
  np.testing.assert_array_equal(labels, [True, True])


def test_crop_label_rule_rejects_bad_arguments():
  with pytest.raises(ValueError, match='box'):
    sampler.crop_label_rule(np.zeros((4, 4), np.uint8), (0, 0, 5, 2),
                       np.ones(2, bool))
  with pytest.raises(ValueError, match='ratio'):
    sampler.crop_label_rule(np.zeros((4, 4), np.uint8), (0, 0, 2, 2),
                       np.ones(2, bool), 1.5)


def test_sample_crop_window_finds_the_positive_window():
  # 40x40 base map with class 1 only in the top-left 4x4 corner; at scale 3
  # (120x120, window 16, stride 16: 8x8 = 64 windows) only the window
  # (0, 0, 5, 5) in original pixels overlaps it (16/16 of the region).
  base = np.zeros((40, 40), np.uint8)
  base[:4, :4] = 1
  rng = np.random.default_rng(0)
  box, labels = sampler.sample_crop_window(base, np.array([True, False]), rng,
                                      scales=(3.0,), window=16, stride=16,
                                      max_tries=1000)
  assert labels.tolist() == [True, False]
  assert box[0] == 0 and box[1] == 0


def test_sample_crop_window_without_positive_keeps_the_last_draw():
  base = np.full((30, 30), IGNORE, np.uint8)
  rng = np.random.default_rng(5)
  box, labels = sampler.sample_crop_window(base, np.array([True]), rng,
                                      scales=(1.0, 2.0), window=10,
                                      stride=10, max_tries=4)
  assert not labels.any()
  # Replay: scale, then four windows; the box is the fourth.
  replay = np.random.default_rng(5)
  scale = (1.0, 2.0)[int(replay.integers(2))]
  layout = mc.window_layout(30, 30, (scale,), 10, 10)
  draws = [int(replay.integers(len(layout))) for _ in range(4)]
  np.testing.assert_array_equal(box, layout[draws[-1], 1:])


# ----------------------------------------------------------------------------
# MultiCropTransform
# ----------------------------------------------------------------------------
def _example(height=30, width=40):
  rng = np.random.default_rng(7)
  image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
  mask = np.zeros((height, width), np.uint8)
  mask[5:20, 8:30] = 2
  base = np.full((height, width), IGNORE, np.uint8)
  base[6:19, 9:29] = 2
  base[:3, :3] = 0
  return {
      schema.IMAGE: image, schema.MASK: mask, BASE: base,
      schema.BOXES: np.array([[8, 5, 30, 20]], np.int32),
      schema.BOX_LABELS: np.array([2], np.int32),
      schema.IMAGE_LABELS: np.array([False, True, False]),
      schema.IMAGE_ID: 'img0'}


def _multicrop(**kwargs):
  args = dict(crop_size=16, num_foreground=3, base_key=BASE,
              scales=(0.75, 1.0, 1.5), stride=10, max_boxes=4)
  args.update(kwargs)
  return sampler.MultiCropTransform(**args)


def test_multicrop_transform_layout_equals_train_transform():
  example = _example()
  ours = _multicrop(color_jitter=0.3).random_map(
      dict(example), np.random.default_rng(0))
  theirs = transforms.TrainTransform(
      crop_size=16, num_foreground=3, max_boxes=4, label_keys=(BASE,)
  ).random_map(dict(example), np.random.default_rng(0))
  assert sorted(ours) == sorted(theirs)
  for key, value in theirs.items():
    assert np.shape(ours[key]) == np.shape(value), key
    assert np.asarray(ours[key]).dtype == np.asarray(value).dtype, key
  assert ours[schema.VALID].all()


def test_multicrop_transform_is_deterministic_and_crops_the_window():
  example = _example()
  transform = _multicrop(flip=False)
  first = transform.random_map(dict(example), np.random.default_rng(3))
  again = transform.random_map(dict(example), np.random.default_rng(3))
  for key in first:
    np.testing.assert_array_equal(first[key], again[key])
  # Replay the window draw: the image is the window stretched by cv2.
  box, labels = sampler.sample_crop_window(
      example[BASE], example[schema.IMAGE_LABELS], np.random.default_rng(3),
      scales=(0.75, 1.0, 1.5), window=16, stride=10)
  x0, y0, x1, y1 = box
  expected = cv2.resize(np.ascontiguousarray(
      example[schema.IMAGE][y0:y1, x0:x1]), (16, 16),
                        interpolation=cv2.INTER_LINEAR)
  np.testing.assert_array_equal(first[schema.IMAGE], expected)
  np.testing.assert_array_equal(first[schema.IMAGE_LABELS], labels)
  np.testing.assert_array_equal(
      first[BASE], cv2.resize(np.ascontiguousarray(example[BASE][y0:y1,
                                                                  x0:x1]),
                              (16, 16), interpolation=cv2.INTER_NEAREST))
  # Different seeds give different windows somewhere.
  images = {transform.random_map(dict(example), np.random.default_rng(s))[
      schema.IMAGE].tobytes() for s in range(8)}
  assert len(images) > 1


def test_multicrop_transform_labels_follow_the_base_mask():
  # The class-2 region covers most of the image: some window of every
  # scale keeps it, so every sample is labelled [0, 1, 0]; with an all-255
  # base mask no window qualifies and the label is all zero.
  example = _example()
  transform = _multicrop(max_tries=50)
  for seed in range(5):
    out = transform.random_map(dict(example), np.random.default_rng(seed))
    np.testing.assert_array_equal(out[schema.IMAGE_LABELS], [0, 1, 0])
    assert out[schema.IMAGE_LABELS].dtype == np.float32
  example[BASE] = np.full_like(example[BASE], IGNORE)
  out = transform.random_map(example, np.random.default_rng(0))
  np.testing.assert_array_equal(out[schema.IMAGE_LABELS], [0, 0, 0])


def test_multicrop_transform_boxes_follow_the_crop():
  # Scale 1 only, window 40: one window, the whole 40x30 image, stretched
  # to 40x40: x unchanged, y *= 40/30 -> (8, 5, 30, 20) becomes
  # (8, 6.667, 30, 26.667).
  transform = _multicrop(scales=(1.0,), crop_size=40, stride=40, flip=False)
  out = transform.random_map(_example(), np.random.default_rng(0))
  np.testing.assert_allclose(out[schema.BOXES][0],
                             [8, 20 / 3, 30, 80 / 3], rtol=1e-6)
  transform = _multicrop(scales=(1.0,), crop_size=16, stride=10, flip=False)
  # 16-pixel windows of a 40x30 image, scale 1: the box follows its window.
  out = transform.random_map(_example(), np.random.default_rng(1))
  box, _ = sampler.sample_crop_window(_example()[BASE], np.array([0, 1, 0]),
                                 np.random.default_rng(1), scales=(1.0,),
                                 window=16, stride=10)
  x0, y0, x1, y1 = box
  expected = np.clip((np.array([8, 5, 30, 20]) - [x0, y0, x0, y0])
                     * 16 / np.array([x1 - x0, y1 - y0] * 2), 0, 16)
  np.testing.assert_allclose(out[schema.BOXES][0], expected, rtol=1e-6)
  assert out[schema.BOX_LABELS][0] == 2


@pytest.mark.parametrize('field, value', [
    ('crop_size', 0), ('layout', 'grid'), ('ratio', 1.0), ('max_tries', 0),
    ('scales', ()), ('color_jitter', -1.0), ('base_key', ''),
    ('image_pad_value', (0, 0)), ('max_boxes', -1), ('stride', 0)])
def test_multicrop_transform_rejects_bad_fields(field, value):
  with pytest.raises(ValueError, match=field):
    _multicrop(**{field: value})


def test_multicrop_transform_needs_the_base_map():
  example = _example()
  del example[BASE]
  with pytest.raises(KeyError, match=BASE):
    _multicrop().random_map(example, np.random.default_rng(0))
