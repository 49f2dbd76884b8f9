"""NumPy augmentation of decoded examples, and the grain transforms using it.

Functions take and return example dicts in the `wsss_jax.data.schema` layout
and never modify their input.  *Label maps* are `mask` (when present) plus the
uint8 (H, W) maps named in `label_keys` (e.g. joined pseudo-labels): all get
the same geometry, nearest resizing and 255 padding.  From the first
geometric step on, boxes are float32 half-open edge boxes.

All randomness comes from the `np.random.Generator` passed in, in a fixed draw
order, so an output is a pure function of (record, rng); grain derives a
record's rng from the seed and the record index, so resumed runs are
bit-identical.  Training order (BANA, LPG): scale -> pad/crop -> flip ->
colour jitter -> finalize.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from typing import Any

import cv2
import grain
import numpy as np

from wsss_jax.data import boxes as boxes_lib
from wsss_jax.data.color import color_jitter  # re-exported
from wsss_jax.data import schema

Example = dict[str, Any]

PAD_MODES = ('bottom_right', 'symmetric')
NUM_BOXES_DROPPED = 'num_boxes_dropped'
HEIGHT = 'height'
WIDTH = 'width'

_logger = logging.getLogger(__name__)
_warned_box_overflow = False


def _image_id(example: Example) -> str:
  return str(example.get(schema.IMAGE_ID, '<no image_id>'))


def _pair(size: int | Sequence[int], name: str) -> tuple[int, int]:
  """(height, width) from an int or a pair; both must be positive."""
  pair = (size, size) if np.isscalar(size) else tuple(size)
  if len(pair) != 2 or any(int(v) != v or v < 1 for v in pair):
    raise ValueError(f'{name} must be a positive int or (height, width) pair '
                     f'of positive ints, got {size!r}.')
  return int(pair[0]), int(pair[1])


def _pad_colour(value: Sequence[int]) -> np.ndarray:
  colour = np.asarray(value)
  if colour.shape != (3,) or colour.min() < 0 or colour.max() > 255:
    raise ValueError(f'image_pad_value must be 3 values in 0..255 (RGB), '
                     f'got {value!r}.')
  return colour.astype(np.uint8)


def label_map_keys(example: Example, label_keys: Sequence[str] = ()
                   ) -> tuple[str, ...]:
  """`mask` (if present) followed by `label_keys`, each of which must exist."""
  missing = [k for k in label_keys if k not in example]
  if missing:
    raise KeyError(f'Example {_image_id(example)!r} has no label map '
                   f'{missing} (present keys: {sorted(example)}).')
  head = (schema.MASK,) if schema.MASK in example else ()
  return head + tuple(k for k in label_keys if k != schema.MASK)


def check_example(example: Example, label_keys: Sequence[str] = ()) -> None:
  """Raises ValueError/KeyError naming the image and field if the example does
  not follow the decoded schema (image uint8 (H, W, 3), label maps uint8
  (H, W), boxes (N, 4), box_labels (N,))."""
  name = _image_id(example)
  for key in (schema.IMAGE, schema.BOXES, schema.BOX_LABELS,
              schema.IMAGE_LABELS):
    if key not in example:
      raise KeyError(f'Example {name!r} has no field {key!r}.')
  image = np.asarray(example[schema.IMAGE])
  if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
    raise ValueError(f'Example {name!r}: field "image" must be uint8 (H, W, 3),'
                     f' got {image.dtype} {image.shape}.')
  if min(image.shape[:2]) < 1:
    raise ValueError(f'Example {name!r}: empty image {image.shape}.')
  for key in label_map_keys(example, label_keys):
    array = np.asarray(example[key])
    if array.dtype != np.uint8 or array.shape != image.shape[:2]:
      raise ValueError(f'Example {name!r}: label map {key!r} must be uint8 '
                       f'{image.shape[:2]} like the image, got {array.dtype} '
                       f'{array.shape}.')
  boxes = np.asarray(example[schema.BOXES])
  labels = np.asarray(example[schema.BOX_LABELS])
  if ((boxes.size and (boxes.ndim != 2 or boxes.shape[1] != 4))
      or labels.size != boxes.size // 4):
    raise ValueError(f'Example {name!r}: boxes must be (N, 4) with N '
                     f'box_labels, got boxes {boxes.shape} and box_labels '
                     f'{labels.shape}.')


# ----------------------------------------------------------------------------
# Geometry
# ----------------------------------------------------------------------------
def sample_scale(rng: np.random.Generator,
                 scale_range: Sequence[float] = (1.0, 1.0),
                 scales: Sequence[float] = ()) -> float:
  """One random scale: a uniform choice from `scales` when it is non-empty
  (LPG/DeepLab: {0.5, 0.75, 1, 1.25, 1.5}), else U(lo, hi) (BANA: U(0.5, 1.5)).
  Draws exactly one number from `rng`."""
  if len(scales):
    if min(scales) <= 0:
      raise ValueError(f'scales must be positive, got {tuple(scales)}.')
    return float(scales[int(rng.integers(len(scales)))])
  lo, hi = (float(v) for v in scale_range)
  if not 0 < lo <= hi:
    raise ValueError(f'scale_range must be (lo, hi) with 0 < lo <= hi, got '
                     f'{tuple(scale_range)}.')
  return float(rng.uniform(lo, hi))


def random_scale(example: Example, scale: float,
                 label_keys: Sequence[str] = ()) -> Example:
  """Resizes an example by `scale` (chosen by the caller, see `sample_scale`).

  The new size is (max(1, int(round(H * s))), max(1, int(round(W * s)))).  The
  image uses cv2 bilinear (INTER_LINEAR), label maps and `valid` cv2 nearest
  (INTER_NEAREST, which samples source pixel floor(j * W / W')).  Boxes are
  multiplied by the per-axis ratios actually realised (W'/W, H'/H), which
  differ from `scale` by the size rounding only (< 0.5 px at the far edge), so
  the boxes stay aligned with the resized pixels.  Returns boxes as float32.
  """
  if not scale > 0:
    raise ValueError(f'scale must be > 0, got {scale!r}.')
  image = example[schema.IMAGE]
  height, width = image.shape[:2]
  new_h = max(1, int(round(height * scale)))
  new_w = max(1, int(round(width * scale)))
  out = dict(example)
  if (new_h, new_w) != (height, width):
    size = (new_w, new_h)
    out[schema.IMAGE] = cv2.resize(np.ascontiguousarray(image), size,
                                   interpolation=cv2.INTER_LINEAR)
    for key in label_map_keys(example, label_keys):
      out[key] = cv2.resize(np.ascontiguousarray(example[key]), size,
                            interpolation=cv2.INTER_NEAREST)
    if schema.VALID in example:
      valid = np.ascontiguousarray(example[schema.VALID], np.uint8)
      out[schema.VALID] = cv2.resize(valid, size,
                                     interpolation=cv2.INTER_NEAREST) > 0
  ratios = np.array([new_w / width, new_h / height] * 2)
  boxes = np.asarray(example[schema.BOXES], np.float64).reshape(-1, 4)
  out[schema.BOXES] = (boxes * ratios).astype(np.float32)
  return out


def _overlap(offset: int, src_len: int, dst_len: int) -> tuple[slice, slice]:
  """(source, destination) slices where source index i lands at i + offset."""
  start = min(max(offset, 0), dst_len)
  stop = max(min(src_len + offset, dst_len), start)
  return slice(start - offset, stop - offset), slice(start, stop)


def _place(example: Example, out_size: tuple[int, int], dy: int, dx: int,
           image_pad_value: Sequence[int],
           label_keys: Sequence[str]) -> Example:
  """Pads and crops in one copy: pixel (i, j) moves to (i + dy, j + dx) of an
  `out_size` canvas filled with the pad values; boxes follow and are clipped,
  dropping those left without a pixel centre.  Adds `valid`."""
  out_h, out_w = out_size
  image = example[schema.IMAGE]
  height, width = image.shape[:2]
  src_rows, dst_rows = _overlap(dy, height, out_h)
  src_cols, dst_cols = _overlap(dx, width, out_w)
  out = dict(example)
  canvas = np.empty((out_h, out_w, 3), np.uint8)
  canvas[:] = _pad_colour(image_pad_value)
  canvas[dst_rows, dst_cols] = image[src_rows, src_cols]
  out[schema.IMAGE] = canvas
  for key in label_map_keys(example, label_keys):
    canvas = np.full((out_h, out_w), schema.IGNORE_LABEL, np.uint8)
    canvas[dst_rows, dst_cols] = example[key][src_rows, src_cols]
    out[key] = canvas
  valid = np.zeros((out_h, out_w), bool)
  if schema.VALID in example:
    valid[dst_rows, dst_cols] = example[schema.VALID][src_rows, src_cols]
  else:
    valid[dst_rows, dst_cols] = True
  out[schema.VALID] = valid
  boxes = np.asarray(example[schema.BOXES], np.float32).reshape(-1, 4)
  boxes = boxes + np.array([dx, dy, dx, dy], np.float32)
  out[schema.BOXES], out[schema.BOX_LABELS], _ = boxes_lib.clip_boxes(
      boxes, np.asarray(example[schema.BOX_LABELS], np.int32), out_h, out_w)
  return out


def pad_and_crop(example: Example, crop_size: int | Sequence[int],
                 rng: np.random.Generator, pad_mode: str = 'bottom_right',
                 image_pad_value: Sequence[int] = (0, 0, 0),
                 label_keys: Sequence[str] = ()) -> Example:
  """Pads an example up to the crop size if needed, then crops it at random.

  Padding: image with `image_pad_value` (RGB uint8, normally the mean colour),
  label maps with 255, `valid` with False.  'bottom_right' pads at the end
  of each axis (LPG, DeepLab); 'symmetric' pads ceil(d / 2) on *both* sides of
  an axis short by d pixels, as BANA's official code does, so for odd d the
  padded axis is one pixel longer than the crop and the random crop shifts the
  image by 0 or 1 pixel.  The crop offset is uniform over every position
  inside the padded image (two draws: row, then column).  Boxes are shifted,
  clipped to the crop and dropped when they no longer contain a pixel centre
  (`boxes.clip_boxes`); image_labels are left unchanged.  Adds `valid`
  (True on real pixels; an existing `valid` is cropped along).
  """
  crop_h, crop_w = _pair(crop_size, 'crop_size')
  if pad_mode not in PAD_MODES:
    raise ValueError(f'pad_mode must be one of {PAD_MODES}, got {pad_mode!r}.')
  height, width = example[schema.IMAGE].shape[:2]
  short_h, short_w = max(crop_h - height, 0), max(crop_w - width, 0)
  if pad_mode == 'symmetric':
    top, left = -(-short_h // 2), -(-short_w // 2)
    padded_h, padded_w = height + 2 * top, width + 2 * left
  else:
    top = left = 0
    padded_h, padded_w = height + short_h, width + short_w
  y0 = int(rng.integers(0, padded_h - crop_h + 1))
  x0 = int(rng.integers(0, padded_w - crop_w + 1))
  return _place(example, (crop_h, crop_w), top - y0, left - x0,
                image_pad_value, label_keys)


def pad_to(example: Example, size: int | Sequence[int],
           image_pad_value: Sequence[int] = (0, 0, 0),
           label_keys: Sequence[str] = ()) -> Example:
  """Deterministic bottom/right padding to `size` (an evaluation bucket).

  Same pad values as `pad_and_crop`; adds `valid`.  Raises ValueError naming
  the image id and both sizes if the image is larger than the bucket.
  """
  out_h, out_w = _pair(size, 'bucket size')
  height, width = example[schema.IMAGE].shape[:2]
  if height > out_h or width > out_w:
    raise ValueError(
        f'Image {_image_id(example)!r} is {height}x{width} (HxW), larger than '
        f'the evaluation bucket {out_h}x{out_w}; increase the bucket size '
        f'(config.eval.bucket_size) to at least {max(height, width)}.')
  return _place(example, (out_h, out_w), 0, 0, image_pad_value, label_keys)


def pad_image_batch(images: Sequence[np.ndarray], size: int, batch_size: int,
                    image_pad_value: Sequence[int] = (0, 0, 0)) -> np.ndarray:
  """uint8 (batch_size, size, size, 3): each (H_i, W_i, 3) image padded
  bottom/right like `pad_to`, the rows after the images all pad colour (a
  fixed shape, so a jitted predictor compiles once per size)."""
  if len(images) > batch_size:
    raise ValueError(f'{len(images)} images for a batch of {batch_size}.')
  batch = np.empty((batch_size, size, size, 3), np.uint8)
  batch[:] = _pad_colour(image_pad_value)
  for i, image in enumerate(images):
    height, width = image.shape[:2]
    if height > size or width > size:
      raise ValueError(f'Image {i} is {height}x{width}, larger than the '
                       f'bucket {size}x{size}.')
    batch[i, :height, :width] = image
  return batch


def hflip(example: Example, label_keys: Sequence[str] = ()) -> Example:
  """Horizontal flip of the image, label maps and `valid`; box x -> W - x
  (x0 and x1 swap, exact in the edge convention).  Boxes become float32."""
  image = example[schema.IMAGE]
  width = image.shape[1]
  out = dict(example)
  out[schema.IMAGE] = np.ascontiguousarray(image[:, ::-1])
  keys = label_map_keys(example, label_keys)
  keys += (schema.VALID,) if schema.VALID in example else ()
  for key in keys:
    out[key] = np.ascontiguousarray(example[key][:, ::-1])
  boxes = np.asarray(example[schema.BOXES], np.float32).reshape(-1, 4)
  out[schema.BOXES] = np.stack(
      [width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]],
      axis=1).astype(np.float32)
  return out


# ----------------------------------------------------------------------------
# Fixed shapes
# ----------------------------------------------------------------------------
def finalize(example: Example, max_boxes: int, num_foreground: int,
             label_keys: Sequence[str] = ()) -> Example:
  """Brings a spatially final example to the fixed batch layout.

  Output keys: image uint8 (H, W, 3), valid bool (H, W) (all True if absent),
  every label map uint8 (H, W), boxes float32 (max_boxes, 4) (padded rows 0),
  box_labels int32 (max_boxes,) (padded rows BOX_PAD_LABEL = -1),
  image_labels float32 (K,), image_id, and num_boxes_dropped int32 () (boxes
  beyond `max_boxes`).  Other keys are dropped so every example batches.

  With more than `max_boxes` boxes the largest ones (by area) are kept in
  their original order (a warning is logged the first time).

  Raises:
    ValueError: naming the image, if image_labels is not (num_foreground,)
      or a box label is outside 1..num_foreground.
  """
  global _warned_box_overflow
  name = _image_id(example)
  boxes = np.asarray(example[schema.BOXES], np.float32).reshape(-1, 4)
  labels = np.asarray(example[schema.BOX_LABELS], np.int32).reshape(-1)
  image_labels = np.asarray(example[schema.IMAGE_LABELS], np.float32)
  if image_labels.shape != (num_foreground,):
    raise ValueError(f'Example {name!r}: image_labels must have shape '
                     f'({num_foreground},), got {image_labels.shape}.')
  if labels.size and (labels.min() < 1 or labels.max() > num_foreground):
    raise ValueError(f'Example {name!r}: box_labels must be in 1..'
                     f'{num_foreground}, got {sorted(set(labels.tolist()))}.')
  dropped = max(0, len(boxes) - max_boxes)
  if dropped:
    keep = np.argsort(-boxes_lib.box_areas(boxes), kind='stable')[:max_boxes]
    keep = np.sort(keep)
    boxes, labels = boxes[keep], labels[keep]
    if not _warned_box_overflow:
      _warned_box_overflow = True
      _logger.warning(
          'Example %r has %d boxes, more than max_boxes=%d: keeping the '
          'largest (counted in %r; this warning is shown once).', name,
          len(keep) + dropped, max_boxes, NUM_BOXES_DROPPED)
  out_boxes = np.zeros((max_boxes, 4), np.float32)
  out_boxes[:len(boxes)] = boxes
  out_labels = np.full((max_boxes,), schema.BOX_PAD_LABEL, np.int32)
  out_labels[:len(labels)] = labels
  image = np.ascontiguousarray(example[schema.IMAGE], np.uint8)
  valid = example.get(schema.VALID)
  out = {
      schema.IMAGE: image,
      schema.VALID: (np.ones(image.shape[:2], bool) if valid is None
                     else np.asarray(valid, bool)),
      schema.BOXES: out_boxes,
      schema.BOX_LABELS: out_labels,
      schema.IMAGE_LABELS: image_labels,
      schema.IMAGE_ID: example.get(schema.IMAGE_ID, ''),
      NUM_BOXES_DROPPED: np.int32(dropped),
  }
  for key in label_map_keys(example, label_keys):
    out[key] = np.asarray(example[key], np.uint8)
  return out


# ----------------------------------------------------------------------------
# grain transforms
# ----------------------------------------------------------------------------
def _validate_fields(transform, size_field: str) -> None:
  """Checks and normalises the dataclass fields shared by both transforms."""
  set_field = lambda name, value: object.__setattr__(transform, name, value)
  set_field(size_field, _pair(getattr(transform, size_field), size_field))
  if int(transform.max_boxes) != transform.max_boxes or transform.max_boxes < 0:
    raise ValueError(f'max_boxes must be an int >= 0, got '
                     f'{transform.max_boxes!r}.')
  if int(transform.num_foreground) != transform.num_foreground or (
      transform.num_foreground < 1):
    raise ValueError(f'num_foreground must be an int >= 1, got '
                     f'{transform.num_foreground!r}.')
  set_field('image_pad_value',
            tuple(int(v) for v in _pad_colour(transform.image_pad_value)))
  set_field('label_keys', tuple(transform.label_keys))


@dataclasses.dataclass(frozen=True)
class TrainTransform(grain.transforms.RandomMap):
  """Random scale -> pad/crop -> flip -> colour jitter -> finalize.

  Outputs the `finalize` layout at `crop_size`.  rng draw order: scale, crop
  row, crop column, flip (if enabled), jitter order and factors (if > 0).
  """
  crop_size: int | tuple[int, int]     # stored as (height, width)
  num_foreground: int                  # K: image_labels length, box ids 1..K
  max_boxes: int = 16
  scale_range: tuple[float, float] = (1.0, 1.0)
  scales: tuple[float, ...] = ()
  flip: bool = True
  color_jitter: float = 0.0
  pad_mode: str = 'bottom_right'
  image_pad_value: tuple[int, int, int] = (0, 0, 0)
  label_keys: tuple[str, ...] = ()

  def __post_init__(self):
    _validate_fields(self, 'crop_size')
    if self.pad_mode not in PAD_MODES:
      raise ValueError(f'input.pad_mode must be one of {PAD_MODES}, got '
                       f'{self.pad_mode!r}.')
    if not self.color_jitter >= 0:
      raise ValueError(f'input.color_jitter must be >= 0, got '
                       f'{self.color_jitter!r}.')
    object.__setattr__(self, 'scale_range', tuple(self.scale_range))
    object.__setattr__(self, 'scales', tuple(self.scales))
    # Rejects a bad scale_range / scales now rather than in a worker.
    sample_scale(np.random.default_rng(0), self.scale_range, self.scales)

  @classmethod
  def from_config(cls, input_config, *, num_foreground: int,
                  image_pad_value: Sequence[int],
                  label_keys: Sequence[str] = ()) -> TrainTransform:
    """From `config.input` (`wsss_jax.defaults.input_pipeline`)."""
    fields = ('crop_size', 'max_boxes', 'scale_range', 'scales', 'flip',
              'color_jitter', 'pad_mode')
    return cls(num_foreground=num_foreground, image_pad_value=image_pad_value,
               label_keys=label_keys,
               **{name: input_config[name] for name in fields})

  def random_map(self, example: Example, rng: np.random.Generator) -> Example:
    check_example(example, self.label_keys)
    scale = sample_scale(rng, self.scale_range, self.scales)
    example = random_scale(example, scale, self.label_keys)
    example = pad_and_crop(example, self.crop_size, rng, self.pad_mode,
                           self.image_pad_value, self.label_keys)
    if self.flip and rng.random() < 0.5:
      example = hflip(example, self.label_keys)
    example[schema.IMAGE] = color_jitter(example[schema.IMAGE], rng,
                                         self.color_jitter)
    return finalize(example, self.max_boxes, self.num_foreground,
                    self.label_keys)


@dataclasses.dataclass(frozen=True)
class EvalTransform(grain.transforms.Map):
  """Bottom/right padding to a fixed bucket + finalize, no randomness.

  Adds int32 () fields `height` and `width` (the original size) so that
  predictions can be cropped back to [:height, :width].
  """
  bucket_size: int | tuple[int, int]   # stored as (height, width)
  num_foreground: int
  max_boxes: int = 16
  image_pad_value: tuple[int, int, int] = (0, 0, 0)
  label_keys: tuple[str, ...] = ()

  def __post_init__(self):
    _validate_fields(self, 'bucket_size')

  def map(self, example: Example) -> Example:
    check_example(example, self.label_keys)
    height, width = example[schema.IMAGE].shape[:2]
    padded = pad_to(example, self.bucket_size, self.image_pad_value,
                    self.label_keys)
    out = finalize(padded, self.max_boxes, self.num_foreground,
                   self.label_keys)
    out[HEIGHT], out[WIDTH] = np.int32(height), np.int32(width)
    return out
