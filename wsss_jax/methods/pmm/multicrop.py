"""PMM multi-crop: the window layout and the multi-crop CAM (PMM Sec. 3.5
and Sec. 4.1 "multi-crop"; docs/pmm.md).  The training sampler that draws
windows of this layout is `multicrop_sampler`.

Multi-crop *test* resizes the image to several resolutions (scales 0.75 to 3,
step 0.25), cuts each resized image into windows of a fixed size (448) at a
fixed stride (300), computes a CAM for every window (and its horizontal
flip) and averages the window results over the pixels they cover.
Multi-crop *training* samples one window of one scale per example and
relabels it from a base mask (PMM Sec. 4.1: a class is positive for a crop
when the crop covers over 10 % of the class's foreground or over 10 % of the
crop is the class).

A window is described by its box in *original-image* pixels: cutting the box
out of the original image and stretching it to window × window equals cutting
the window out of the resized image up to the interpolation (the official
code does the former).

Layouts (`multicrop_layout`):
  'paper'     windows of `window` pixels at `stride`, the last window of a row
              or column aligned to the end of the resized image;
  'pmm_code'  the official code's layout: every window but the last is
              `stride` pixels wide (300, stretched to 448²), the last one is
              `window` pixels wide and aligned to the end.

Device functions (`crop_resize`, `paste_average`, `multicrop_cam`) use fixed
shapes, no Python loop over windows, and bilinear interpolation with
align_corners=False and no antialiasing written as separable interpolation
matrices (one (size, length) matrix per box and axis, applied with einsum at
Precision.HIGHEST), which is exact and compiles once per shape.  Boxes are
float (x0, y0, x1, y1) half-open edge boxes (`wsss_jax.data.schema`).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax



LAYOUTS = ('paper', 'pmm_code')
# PMM Sec. 4.1: scales 0.75 to 3 in steps of 0.25, 448×448 crops, stride 300.
PMM_SCALES = tuple(0.75 + 0.25 * i for i in range(10))
PMM_WINDOW = 448
PMM_STRIDE = 300

_HI = lax.Precision.HIGHEST


# ----------------------------------------------------------------------------
# Window layout (host)
# ----------------------------------------------------------------------------
def positive_int(value, name: str) -> int:
  if isinstance(value, bool) or int(value) != value or value < 1:
    raise ValueError(f'{name} must be a positive int, got {value!r}.')
  return int(value)


def check_scales(scales: Sequence[float]) -> tuple[float, ...]:
  scales = tuple(float(s) for s in scales)
  if not scales or not all(s > 0 and math.isfinite(s) for s in scales):
    raise ValueError(f'scales must be a non-empty sequence of positive '
                     f'numbers, got {scales!r}.')
  return scales


def _axis_spans(length: int, window: int, stride: int, layout: str
                ) -> np.ndarray:
  """(n, 2) int64 [lo, hi) spans along one axis of a resized image of
  `length` pixels; n = 1 + ceil(max(0, length − window) / stride)."""
  count = 1 + -(-max(0, length - window) // stride)
  index = np.arange(count, dtype=np.int64)
  last_lo = max(0, length - window)
  if layout == 'paper':
    lo = np.minimum(index * stride, last_lo)
    hi = np.minimum(lo + window, length)
  else:  # 'pmm_code'
    lo = index * stride
    hi = np.minimum(length, stride * (index + 1))
    lo[-1], hi[-1] = last_lo, length
  return np.stack([lo, hi], axis=1)


def window_layout(height: int, width: int, scales: Sequence[float],
                  window: int, stride: int, layout: str = 'paper'
                  ) -> np.ndarray:
  """The multi-crop windows of an image (PMM Sec. 3.5 and 4.1).

  For each scale s the resized image is h_s × w_s with w_s = int(W·s),
  h_s = int(H·s); it has 1 + ceil(max(0, w_s − window) / stride) columns and
  1 + ceil(max(0, h_s − window) / stride) rows of windows.
  'paper': column j spans [x0, x1) with x0 = min(j·stride, max(0, w_s −
  window)) and x1 = min(x0 + window, w_s): `window` pixels, fewer only when
  the resized image is narrower than the window.
  'pmm_code' (the official code): column j < last spans [j·stride,
  min(w_s, (j + 1)·stride)), the last one [max(0, w_s − window), w_s).
  Rows likewise.  Coordinates are mapped back to the original image with
  int(coord / s) and every box keeps at least one pixel (x1 ≥ x0 + 1).
  The truncation can leave the last row or column of the original image
  uncovered at some scales (as in the official code).

  Args:
    height, width: original image size in pixels.
    scales: resize factors (PMM: 0.75, 1.0, ..., 3.0).
    window: window size in resized pixels (PMM: 448).
    stride: window stride in resized pixels (PMM: 300).
    layout: 'paper' or 'pmm_code'.
  Returns:
    int64 (N, 5) rows (scale_index, x0, y0, x1, y1): half-open boxes in
    original-image pixels, scale by scale, row-major (top row first).
  """
  height = positive_int(height, 'height')
  width = positive_int(width, 'width')
  window = positive_int(window, 'window')
  stride = positive_int(stride, 'stride')
  scales = check_scales(scales)
  if layout not in LAYOUTS:
    raise ValueError(f'layout must be one of {LAYOUTS}, got {layout!r}.')
  rows = []
  for index, scale in enumerate(scales):   # host code: a few scales
    xs = _axis_spans(int(width * scale), window, stride, layout)
    ys = _axis_spans(int(height * scale), window, stride, layout)
    # int(coord / s) as Python does it: IEEE division then truncation.
    xs = np.trunc(xs / scale).astype(np.int64)
    ys = np.trunc(ys / scale).astype(np.int64)
    xs[:, 0] = np.minimum(xs[:, 0], width - 1)
    ys[:, 0] = np.minimum(ys[:, 0], height - 1)
    xs[:, 1] = np.clip(xs[:, 1], xs[:, 0] + 1, width)
    ys[:, 1] = np.clip(ys[:, 1], ys[:, 0] + 1, height)
    y_index, x_index = np.meshgrid(np.arange(len(ys)), np.arange(len(xs)),
                                   indexing='ij')
    y_index, x_index = y_index.ravel(), x_index.ravel()
    rows.append(np.stack([np.full(len(x_index), index, np.int64),
                          xs[x_index, 0], ys[y_index, 0],
                          xs[x_index, 1], ys[y_index, 1]], axis=1))
  return np.concatenate(rows, axis=0)


def padded_window_boxes(height: int, width: int, scales: Sequence[float],
                        window: int, stride: int, layout: str,
                        max_windows: int) -> tuple[np.ndarray, np.ndarray]:
  """`window_layout` boxes padded to a fixed count, for a jitted batch.

  Returns:
    (boxes float32 (max_windows, 4) — padding rows (0, 0, 1, 1) —,
     valid bool (max_windows,)).
  Raises:
    ValueError: naming max_windows if the image has more windows.
  """
  layout_rows = window_layout(height, width, scales, window, stride, layout)
  count = len(layout_rows)
  if count > max_windows:
    raise ValueError(f'max_windows={max_windows} is smaller than the {count} '
                     f'windows of a {height}x{width} image.')
  boxes = np.tile(np.array([0, 0, 1, 1], np.float32), (max_windows, 1))
  boxes[:count] = layout_rows[:, 1:]
  valid = np.arange(max_windows) < count
  return boxes, valid


# ----------------------------------------------------------------------------
# Interpolation matrices (device)
# ----------------------------------------------------------------------------
def _linear_weights(src: jax.Array, length: int) -> jax.Array:
  """(..., n) source positions already clamped to [0, length − 1] ->
  (..., n, length) two-tap linear interpolation weights (rows sum to 1)."""
  low = jnp.floor(src)
  frac = src - low
  low_i = low.astype(jnp.int32)
  high_i = jnp.minimum(low_i + 1, length - 1)
  taps = jnp.arange(length, dtype=jnp.int32)
  return ((1.0 - frac)[..., None] * (taps == low_i[..., None])
          + frac[..., None] * (taps == high_i[..., None]))


def _box_edges(lo: jax.Array, hi: jax.Array) -> tuple[jax.Array, jax.Array]:
  """float32 box edges with hi ≥ lo + 1 (an empty padding box stays finite)."""
  lo = jnp.asarray(lo, jnp.float32)
  return lo, jnp.maximum(jnp.asarray(hi, jnp.float32), lo + 1.0)


def crop_matrix(lo: jax.Array, hi: jax.Array, size: int, length: int
                ) -> jax.Array:
  """Bilinear (align_corners=False, no antialias) resampling of the span
  [lo, hi) of an axis of `length` pixels onto `size` output pixels.

  Output pixel i samples src = lo + (i + 0.5)·(hi − lo)/size − 0.5, clamped
  to [lo, hi − 1] (the edge rule of resizing the cut-out span) and to
  [0, length − 1].  For integer boxes this equals cutting [lo, hi) out and
  resizing it with PyTorch's F.interpolate(..., 'bilinear',
  align_corners=False) or jax.image.resize(..., antialias=False).

  Args:
    lo, hi: (...) float box edges.
  Returns:
    float32 (..., size, length); each row sums to 1.
  """
  lo, hi = _box_edges(lo, hi)
  centres = jnp.arange(size, dtype=jnp.float32) + 0.5
  src = (lo[..., None] + centres * ((hi - lo) / size)[..., None] - 0.5)
  src = jnp.clip(src, lo[..., None], (hi - 1.0)[..., None])
  return _linear_weights(jnp.clip(src, 0.0, length - 1.0), length)


def paste_matrix(lo: jax.Array, hi: jax.Array, size: int, length: int
                 ) -> jax.Array:
  """Bilinear (align_corners=False, no antialias) resampling of a map axis
  of `size` pixels onto the span [lo, hi) of an output axis of `length`
  pixels; zero outside the span.

  Output pixel y (centre y + 0.5 inside [lo, hi)) samples map position
  (y + 0.5 − lo)·size/(hi − lo) − 0.5, clamped to [0, size − 1].

  Args:
    lo, hi: (...) float box edges.
  Returns:
    float32 (..., length, size); rows inside the span sum to 1, others 0.
  """
  lo, hi = _box_edges(lo, hi)
  centres = jnp.arange(length, dtype=jnp.float32) + 0.5
  inside = (centres >= lo[..., None]) & (centres < hi[..., None])
  src = (centres - lo[..., None]) * (size / (hi - lo))[..., None] - 0.5
  weights = _linear_weights(jnp.clip(src, 0.0, size - 1.0), size)
  return weights * inside[..., None]


def _inside(lo: jax.Array, hi: jax.Array, length: int) -> jax.Array:
  """(..., length) float32 1 where the pixel centre lies in [lo, hi)."""
  lo, hi = _box_edges(lo, hi)
  centres = jnp.arange(length, dtype=jnp.float32) + 0.5
  return ((centres >= lo[..., None]) & (centres < hi[..., None])
          ).astype(jnp.float32)


# ----------------------------------------------------------------------------
# Crop, paste, multi-crop CAM (device)
# ----------------------------------------------------------------------------
def crop_resize(images: jax.Array, boxes: jax.Array, size: int) -> jax.Array:
  """Cuts every box out of its image and stretches it to size × size.

  PMM Sec. 3.5 multi-crop: the box region of the original image is resized
  bilinearly (align_corners=False, no antialias, aspect ratio not kept) so
  that its pixel span [x0, x1) × [y0, y1) maps onto the output pixels
  (`crop_matrix`).  Jitted (size static); usable inside a jitted caller.

  Args:
    images: (B, H, W, C) images (any real dtype; C = 3 for RGB).
    boxes: (B, N, 4) float (x0, y0, x1, y1) half-open boxes in pixels.
    size: output side.
  Returns:
    float32 (B, N, size, size, C).
  """
  size = positive_int(size, 'size')
  if jnp.ndim(images) != 4 or jnp.ndim(boxes) != 3 or (
      jnp.shape(boxes)[-1] != 4) or jnp.shape(boxes)[0] != jnp.shape(images)[0]:
    raise ValueError(f'images must be (B, H, W, C) and boxes (B, N, 4), got '
                     f'images {jnp.shape(images)} and boxes '
                     f'{jnp.shape(boxes)}.')
  return _crop_resize(images, boxes, size)


@functools.partial(jax.jit, static_argnames=('size',))
def _crop_resize(images: jax.Array, boxes: jax.Array, size: int) -> jax.Array:
  images = jnp.asarray(images, jnp.float32)
  boxes = jnp.asarray(boxes, jnp.float32)
  _, height, width, _ = images.shape
  rows = crop_matrix(boxes[..., 1], boxes[..., 3], size, height)
  cols = crop_matrix(boxes[..., 0], boxes[..., 2], size, width)
  tmp = jnp.einsum('bnih,bhwc->bniwc', rows, images, precision=_HI)
  return jnp.einsum('bnjw,bniwc->bnijc', cols, tmp, precision=_HI)


def _paste_sums(maps: jax.Array, boxes: jax.Array, weights: jax.Array,
                out_hw: tuple[int, int]) -> tuple[jax.Array, jax.Array]:
  """Σ_n w_n · (map_n resized into box_n) and Σ_n w_n · [pixel in box_n].

  maps (B, N, h, w, C), boxes (B, N, 4), weights (B, N) float ->
  (canvas float32 (B, H, W, C), counter float32 (B, H, W)).
  """
  out_h, out_w = out_hw
  _, _, map_h, map_w, _ = maps.shape
  rows = paste_matrix(boxes[..., 1], boxes[..., 3], map_h, out_h)
  cols = paste_matrix(boxes[..., 0], boxes[..., 2], map_w, out_w)
  rows = rows * weights[..., None, None]
  tmp = jnp.einsum('bnxj,bnijc->bnixc', cols, maps, precision=_HI)
  canvas = jnp.einsum('bnyi,bnixc->byxc', rows, tmp, precision=_HI)
  in_rows = _inside(boxes[..., 1], boxes[..., 3], out_h) * weights[..., None]
  in_cols = _inside(boxes[..., 0], boxes[..., 2], out_w)
  counter = jnp.einsum('bny,bnx->byx', in_rows, in_cols, precision=_HI)
  return canvas, counter


def _check_out_hw(out_hw) -> tuple[int, int]:
  if len(tuple(out_hw)) != 2:
    raise ValueError(f'out_hw must be (height, width), got {out_hw!r}.')
  return (positive_int(out_hw[0], 'out_hw[0]'),
          positive_int(out_hw[1], 'out_hw[1]'))


def _average(canvas: jax.Array, counter: jax.Array) -> jax.Array:
  """canvas / max(counter, 1): uncovered pixels (counter 0) stay 0."""
  return canvas / jnp.maximum(counter, 1.0)[..., None]


def paste_average(maps: jax.Array, boxes: jax.Array, valid: jax.Array,
                  out_hw: tuple[int, int]) -> jax.Array:
  """Averages window maps over the image pixels their boxes cover.

  PMM Sec. 3.5 ("compute the average of crop results"): each map is resized
  bilinearly (align_corners=False, no antialias) to its box and added to a
  canvas, a per-pixel counter counts the boxes covering each pixel, and the
  result is canvas / max(counter, 1), so uncovered pixels are 0.  Boxes
  whose `valid` is False (padding) add nothing.  Jitted (out_hw static).

  Args:
    maps: (B, N, h, w, C) window maps (any grid: the resize goes straight
      from the map grid to the box size).
    boxes: (B, N, 4) float (x0, y0, x1, y1) half-open boxes in output pixels.
    valid: (B, N) bool.
    out_hw: (H, W) output size.
  Returns:
    float32 (B, H, W, C).
  """
  out_hw = _check_out_hw(out_hw)
  shape = jnp.shape(maps)
  if len(shape) != 5 or jnp.shape(boxes) != shape[:2] + (4,) or (
      jnp.shape(valid) != shape[:2]):
    raise ValueError(f'maps must be (B, N, h, w, C) with boxes (B, N, 4) and '
                     f'valid (B, N), got maps {shape}, boxes '
                     f'{jnp.shape(boxes)}, valid {jnp.shape(valid)}.')
  return _paste_average(maps, boxes, valid, out_hw)


@functools.partial(jax.jit, static_argnames=('out_hw',))
def _paste_average(maps: jax.Array, boxes: jax.Array, valid: jax.Array,
                   out_hw: tuple[int, int]) -> jax.Array:
  canvas, counter = _paste_sums(
      jnp.asarray(maps, jnp.float32), jnp.asarray(boxes, jnp.float32),
      jnp.asarray(valid).astype(jnp.float32), out_hw)
  return _average(canvas, counter)


def flip_averaged_cams(cam_fn: Callable[[jax.Array], jax.Array],
                       windows: jax.Array, flip: bool = True) -> jax.Array:
  """CAMs of windows, averaged with those of their horizontal flips.

  The windows and their flips go through `cam_fn` in one call; the flipped
  maps are flipped back and the two averaged: (cam(x) + flip(cam(flip(x))))
  / 2.  The official code adds both passes to its canvas and counter, which
  gives the same average after `paste_average`.

  Args:
    cam_fn: (M, S, S, 3) float32 windows -> (M, h, w, K) maps (channel-last,
      any grid).
    windows: (M, S, S, 3).
    flip: False: cam_fn(windows) alone.
  Returns:
    float32 (M, h, w, K).
  """
  if not flip:
    return jnp.asarray(cam_fn(windows), jnp.float32)
  count = windows.shape[0]
  maps = jnp.asarray(cam_fn(jnp.concatenate(
      [windows, windows[:, :, ::-1]], axis=0)), jnp.float32)
  return 0.5 * (maps[:count] + maps[count:, :, ::-1])


def multicrop_cam(cam_fn: Callable[[jax.Array], jax.Array],
                  images: jax.Array, boxes: jax.Array, valid: jax.Array,
                  window: int, flip: bool = True, chunk: int | None = None
                  ) -> jax.Array:
  """The multi-crop CAM of a batch (PMM Sec. 3.5, "multi-crop test").

  Every box is cut out of its image and stretched to window × window
  (`crop_resize`); `cam_fn` maps the windows (with their horizontal flips in
  the same call, flip-averaged by `flip_averaged_cams`); each window's map is
  resized from its grid straight to its box (align_corners=False) and the
  maps are averaged per pixel over the covering windows (`paste_average`:
  uncovered pixels 0, padding boxes ignored).  No normalisation and no
  image-label masking happen here: apply PMM Eq. (1)
  (`wsss_jax.pseudo.cam.minmax_normalize`, which zeroes absent classes) to
  the result.

  The windows are processed `chunk` box slots at a time along N (a
  `lax.scan` over the chunks carrying the canvas and counter: memory is
  bounded by one chunk and one compilation of `cam_fn` serves every chunk).
  Each `cam_fn` call sees B·chunk windows, twice that with `flip`.  N is
  padded up to a multiple of `chunk` with invalid boxes.

  Args:
    cam_fn: float32 (M, window, window, 3) windows (the pixel values of
      `images`, e.g. 0..255 RGB; normalisation is cam_fn's job) -> (M, h, w,
      K) class maps, channel-last, at any resolution.  Traced once per call.
    images: (B, H, W, 3) images (any real dtype).
    boxes: (B, N, 4) float half-open boxes in image pixels
      (`padded_window_boxes`).
    valid: (B, N) bool; False boxes are padding.
    window: the window side fed to cam_fn (static; PMM: 448).
    flip: also run the horizontal flips (static).
    chunk: box slots per step along N (static); None: all N at once.
  Returns:
    float32 (B, H, W, K).
  """
  window = positive_int(window, 'window')
  images = jnp.asarray(images)
  boxes = jnp.asarray(boxes, jnp.float32)
  valid = jnp.asarray(valid)
  if images.ndim != 4 or boxes.ndim != 3 or boxes.shape[-1] != 4 or (
      boxes.shape[0] != images.shape[0]) or valid.shape != boxes.shape[:2]:
    raise ValueError(f'images must be (B, H, W, 3), boxes (B, N, 4) and '
                     f'valid (B, N), got images {images.shape}, boxes '
                     f'{boxes.shape}, valid {valid.shape}.')
  batch, height, width, _ = images.shape
  num = boxes.shape[1]
  chunk = num if chunk is None else positive_int(chunk, 'chunk')
  chunk = min(chunk, num)
  steps = -(-num // chunk)
  pad = steps * chunk - num
  if pad:
    boxes = jnp.concatenate(
        [boxes, jnp.broadcast_to(jnp.array([0.0, 0.0, 1.0, 1.0]),
                                 (batch, pad, 4))], axis=1)
    valid = jnp.concatenate([valid, jnp.zeros((batch, pad), bool)], axis=1)
  # (steps, B, chunk, ...) slices for the scan.
  boxes = boxes.reshape(batch, steps, chunk, 4).transpose(1, 0, 2, 3)
  valid = valid.reshape(batch, steps, chunk).transpose(1, 0, 2)

  def chunk_maps(chunk_boxes):
    windows = crop_resize(images, chunk_boxes, window)
    windows = windows.reshape((batch * chunk,) + windows.shape[2:])
    maps = flip_averaged_cams(cam_fn, windows, flip)
    return maps.reshape((batch, chunk) + maps.shape[1:])

  map_shape = jax.eval_shape(chunk_maps, boxes[0]).shape
  num_channels = map_shape[-1]

  def step(carry, xs):
    chunk_boxes, chunk_valid = xs
    canvas, counter = _paste_sums(chunk_maps(chunk_boxes), chunk_boxes,
                                  chunk_valid.astype(jnp.float32),
                                  (height, width))
    return (carry[0] + canvas, carry[1] + counter), None

  init = (jnp.zeros((batch, height, width, num_channels), jnp.float32),
          jnp.zeros((batch, height, width), jnp.float32))
  (canvas, counter), _ = lax.scan(step, init, (boxes, valid))
  return _average(canvas, counter)
