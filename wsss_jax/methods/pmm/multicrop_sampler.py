"""PMM multi-crop training: one window of the multi-crop layout per example,
labelled from the base mask (PMM Sec. 4.1: a class is positive for a crop
when the crop covers over 10 % of the class's foreground or over 10 % of the
crop is the class; docs/pmm.md).  The layout itself is `multicrop`."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import cv2
import grain
import numpy as np

from wsss_jax.data import boxes as boxes_lib
from wsss_jax.data import schema
from wsss_jax.data import transforms
from wsss_jax.methods.pmm.multicrop import (LAYOUTS, PMM_SCALES, PMM_STRIDE,
                                            check_scales, positive_int,
                                            window_layout)

Example = dict[str, Any]

# PMM Sec. 4.1: the 10 % crop label rule.
PMM_CROP_LABEL_RATIO = 0.1


def crop_label_rule(base_map: np.ndarray, box: Sequence[int],
                    image_labels: np.ndarray,
                    ratio: float = PMM_CROP_LABEL_RATIO) -> np.ndarray:
  """The crop labels of multi-crop training (PMM Sec. 4.1).

  With region_k = (base_map == k + 1) (the base mask's confident pixels of
  class k + 1) and I_k = |region_k ∩ box|, class k is positive iff it is in
  the image labels and (I_k / |region_k| > ratio or I_k / |box| > ratio).
  An empty region gives a negative class (no division by zero).

  Args:
    base_map: uint8 (H, W) label map: 0 background, k + 1 class k, 255
      unlabelled (the base mask's pixels with CRF marginal ≤ 0.9).
    box: (x0, y0, x1, y1) int half-open box inside the image.
    image_labels: (K,) multi-hot (bool or float > 0) image labels.
    ratio: the threshold (PMM: 0.1), compared strictly.
  Returns:
    bool (K,).
  """
  base_map = np.asarray(base_map)
  labels = np.asarray(image_labels).reshape(-1) > 0
  if base_map.ndim != 2:
    raise ValueError(f'base_map must be (H, W), got {base_map.shape}.')
  x0, y0, x1, y1 = (int(v) for v in box)
  height, width = base_map.shape
  if not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
    raise ValueError(f'box must satisfy 0 <= x0 < x1 <= {width} and 0 <= y0 '
                     f'< y1 <= {height}, got {tuple(box)!r}.')
  if not 0 <= ratio < 1:
    raise ValueError(f'ratio must be in [0, 1), got {ratio!r}.')
  num = labels.size
  ids = np.clip(base_map.astype(np.int64), 0, 255)
  region = np.bincount(ids.ravel(), minlength=256)[1:num + 1]
  inter = np.bincount(ids[y0:y1, x0:x1].ravel(), minlength=256)[1:num + 1]
  box_area = (x1 - x0) * (y1 - y0)
  share = np.divide(inter, region, out=np.zeros(num), where=region > 0)
  of_region = share > ratio
  of_box = inter / box_area > ratio
  return labels & (of_region | of_box)


def sample_crop_window(base_map: np.ndarray, image_labels: np.ndarray,
                       rng: np.random.Generator, *,
                       scales: Sequence[float], window: int, stride: int,
                       layout: str = 'paper',
                       ratio: float = PMM_CROP_LABEL_RATIO,
                       max_tries: int = 10) -> tuple[np.ndarray, np.ndarray]:
  """One multi-crop training window and its labels (PMM Sec. 4.1).

  Draws a scale index uniformly, then up to `max_tries` windows of that
  scale uniformly (with replacement) until `crop_label_rule` gives one a
  positive class; otherwise the last window is kept with all-zero labels.
  rng draws: 1 (scale) + the number of tries.

  Args:
    base_map: uint8 (H, W) base mask label map (see `crop_label_rule`).
    image_labels: (K,) multi-hot image labels.
    rng: the example's generator.
  Returns:
    (box int64 (4,) (x0, y0, x1, y1) in original pixels, labels bool (K,)).
  """
  max_tries = positive_int(max_tries, 'max_tries')
  scales = check_scales(scales)
  height, width = np.asarray(base_map).shape[:2]
  scale = scales[int(rng.integers(len(scales)))]
  boxes = window_layout(height, width, (scale,), window, stride,
                        layout)[:, 1:]
  labels = np.zeros(np.asarray(image_labels).size, bool)
  box = boxes[0]
  for _ in range(max_tries):       # host sampler: at most max_tries draws
    box = boxes[int(rng.integers(len(boxes)))]
    labels = crop_label_rule(base_map, box, image_labels, ratio)
    if labels.any():
      break
  return box, labels


def crop_example(example: Example, box: Sequence[int], size: int,
                 label_keys: Sequence[str] = ()) -> Example:
  """Cuts `box` out of an example and stretches it to size × size.

  The image is resized with cv2 bilinear (INTER_LINEAR, as
  `transforms.random_scale`), the label maps (`mask` and `label_keys`) with
  cv2 nearest; boxes are shifted and scaled by the realised ratios, clipped
  and dropped when they keep no pixel centre; `valid` becomes all True.
  """
  x0, y0, x1, y1 = (int(v) for v in box)
  out = dict(example)
  dsize = (size, size)
  image = np.ascontiguousarray(example[schema.IMAGE][y0:y1, x0:x1])
  out[schema.IMAGE] = cv2.resize(image, dsize,
                                 interpolation=cv2.INTER_LINEAR)
  for key in transforms.label_map_keys(example, label_keys):
    part = np.ascontiguousarray(example[key][y0:y1, x0:x1])
    out[key] = cv2.resize(part, dsize, interpolation=cv2.INTER_NEAREST)
  out[schema.VALID] = np.ones(dsize, bool)
  ratios = np.array([size / (x1 - x0), size / (y1 - y0)] * 2)
  boxes = np.asarray(example[schema.BOXES], np.float64).reshape(-1, 4)
  boxes = (boxes - np.array([x0, y0, x0, y0])) * ratios
  out[schema.BOXES], out[schema.BOX_LABELS], _ = boxes_lib.clip_boxes(
      boxes.astype(np.float32),
      np.asarray(example[schema.BOX_LABELS], np.int32), size, size)
  return out


@dataclasses.dataclass(frozen=True)
class MultiCropTransform(grain.transforms.RandomMap):
  """Multi-crop training sampler (PMM Sec. 3.5 and 4.1) as a grain transform.

  window (`sample_crop_window`, relabelled from the base mask) -> cut and
  stretch to crop_size² (`crop_example`) -> flip -> colour jitter ->
  `transforms.finalize`, whose layout it outputs (like
  `transforms.TrainTransform` with label_keys=(base_key,)); image_labels
  are the crop labels.  The base mask is the label map joined under
  `base_key` (0 background, k + 1 class k, 255 where its CRF marginal is
  ≤ 0.9).  rng draw order: scale, windows (≤ max_tries), flip (if enabled),
  jitter order and factors (if > 0).
  """
  crop_size: int                       # the window side (PMM: 448)
  num_foreground: int                  # K
  base_key: str
  scales: tuple[float, ...] = PMM_SCALES
  stride: int = PMM_STRIDE
  layout: str = 'paper'
  ratio: float = PMM_CROP_LABEL_RATIO
  max_tries: int = 10
  flip: bool = True
  color_jitter: float = 0.0
  image_pad_value: tuple[int, int, int] = (0, 0, 0)
  max_boxes: int = 16

  def __post_init__(self):
    set_field = lambda name, value: object.__setattr__(self, name, value)
    set_field('crop_size', positive_int(self.crop_size, 'crop_size'))
    set_field('num_foreground',
              positive_int(self.num_foreground, 'num_foreground'))
    set_field('stride', positive_int(self.stride, 'stride'))
    set_field('max_tries', positive_int(self.max_tries, 'max_tries'))
    set_field('scales', check_scales(self.scales))
    if not isinstance(self.base_key, str) or not self.base_key:
      raise ValueError(f'base_key must be a non-empty string, got '
                       f'{self.base_key!r}.')
    if self.layout not in LAYOUTS:
      raise ValueError(f'layout must be one of {LAYOUTS}, got '
                       f'{self.layout!r}.')
    if not 0 <= self.ratio < 1:
      raise ValueError(f'ratio must be in [0, 1), got {self.ratio!r}.')
    if not self.color_jitter >= 0:
      raise ValueError(f'color_jitter must be >= 0, got '
                       f'{self.color_jitter!r}.')
    if isinstance(self.max_boxes, bool) or int(self.max_boxes) != (
        self.max_boxes) or self.max_boxes < 0:
      raise ValueError(f'max_boxes must be an int >= 0, got '
                       f'{self.max_boxes!r}.')
    colour = np.asarray(self.image_pad_value)
    if colour.shape != (3,) or colour.min() < 0 or colour.max() > 255:
      raise ValueError(f'image_pad_value must be 3 values in 0..255, got '
                       f'{self.image_pad_value!r}.')
    set_field('image_pad_value', tuple(int(v) for v in colour))

  def random_map(self, example: Example, rng: np.random.Generator) -> Example:
    label_keys = (self.base_key,)
    transforms.check_example(example, label_keys)
    box, crop_labels = sample_crop_window(
        example[self.base_key], example[schema.IMAGE_LABELS], rng,
        scales=self.scales, window=self.crop_size, stride=self.stride,
        layout=self.layout, ratio=self.ratio, max_tries=self.max_tries)
    example = crop_example(example, box, self.crop_size, label_keys)
    if self.flip and rng.random() < 0.5:
      example = transforms.hflip(example, label_keys)
    example[schema.IMAGE] = transforms.color_jitter(example[schema.IMAGE],
                                                    rng, self.color_jitter)
    example[schema.IMAGE_LABELS] = crop_labels.astype(np.float32)
    return transforms.finalize(example, self.max_boxes, self.num_foreground,
                               label_keys)
