"""Box utilities shared by datasets, augmentation and methods.

Boxes use the half-open pixel-edge convention of `wsss_jax.data.schema`:
[x0, y0, x1, y1] covers columns x0..x1-1 and rows y0..y1-1; a pixel belongs to
a box when its centre lies inside.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from wsss_jax.data import schema


def box_areas(boxes: np.ndarray) -> np.ndarray:
  """Areas of (N, 4) edge boxes; 0 for degenerate boxes."""
  boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
  widths = np.clip(boxes[:, 2] - boxes[:, 0], 0, None)
  heights = np.clip(boxes[:, 3] - boxes[:, 1], 0, None)
  return widths * heights


def box_coverage(boxes: np.ndarray, height: int, width: int) -> np.ndarray:
  """(N, H, W) bool: pixel centres inside each box (vectorised over boxes)."""
  boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
  rows = np.arange(height) + 0.5
  cols = np.arange(width) + 0.5
  in_rows = (rows[None, :] >= boxes[:, 1:2]) & (rows[None, :] < boxes[:, 3:4])
  in_cols = (cols[None, :] >= boxes[:, 0:1]) & (cols[None, :] < boxes[:, 2:3])
  return in_rows[:, :, None] & in_cols[:, None, :]


def paint_order_by_area(areas: np.ndarray) -> np.ndarray:
  """Indices that paint regions largest first, so smaller ones end on top.

  Ties keep annotation order (the later region is painted later and wins):
  the rule of Box2Seg (Sect. 3.1: "assuming that the smaller box is in the
  front"), used for boxes and for COCO instance masks alike.
  """
  areas = np.asarray(areas, np.float64).reshape(-1)
  return np.lexsort((np.arange(len(areas)), -areas))


def paint_order(boxes: np.ndarray) -> np.ndarray:
  """`paint_order_by_area` of edge boxes."""
  return paint_order_by_area(box_areas(boxes))


def pixel_ranges(boxes: np.ndarray) -> np.ndarray:
  """(N, 4) int64 [first_col, first_row, last_col, last_row] of the pixels
  whose centres lie inside each edge box (j covered iff x0 <= j + .5 < x1,
  i.e. columns ceil(x0 - .5) .. ceil(x1 - .5) - 1; x0 .. x1 - 1 for integer
  boxes).  Not clipped; last < first for a box with no pixel centre."""
  boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
  first = np.ceil(boxes[:, :2] - 0.5)
  last = np.ceil(boxes[:, 2:] - 0.5) - 1
  return np.concatenate([first, last], axis=1).astype(np.int64)


def fill_boxes(boxes: np.ndarray, labels: np.ndarray, height: int,
               width: int) -> np.ndarray:
  """Box-filled label map (H, W) uint8: 0 outside all boxes, else the class of
  the smallest box covering the pixel.  Boxes with label < 1 are ignored.

  This is the "Box" pseudo-mask of the box-supervised papers (Box2Seg Eq. 1's
  tensor B in index form; BANA Table 1 row "Box").
  """
  boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
  labels = np.asarray(labels, np.int64).reshape(-1)
  keep = labels >= 1
  boxes, labels = boxes[keep], labels[keep]
  out = np.zeros((height, width), np.uint8)
  ranges = pixel_ranges(boxes)
  # One slice write per box, largest first: later writes win.
  for index in paint_order(boxes):
    c0, r0, c1, r1 = ranges[index]
    out[max(r0, 0):max(r1 + 1, 0), max(c0, 0):max(c1 + 1, 0)] = labels[index]
  return out


def clip_boxes(boxes: np.ndarray, labels: np.ndarray, height: int,
               width: int) -> tuple[np.ndarray, np.ndarray, int]:
  """Clips boxes to the image and drops those left with no pixel centre.

  Returns (boxes, labels, num_dropped).  Works for int or float boxes and
  keeps the input dtype.
  """
  boxes = np.asarray(boxes).reshape(-1, 4)
  labels = np.asarray(labels).reshape(-1)
  dtype = boxes.dtype
  clipped = boxes.astype(np.float64).copy()
  clipped[:, [0, 2]] = np.clip(clipped[:, [0, 2]], 0, width)
  clipped[:, [1, 3]] = np.clip(clipped[:, [1, 3]], 0, height)
  keep = _has_pixel_centre(clipped)
  return clipped[keep].astype(dtype), labels[keep], int((~keep).sum())


def _has_pixel_centre(boxes: np.ndarray) -> np.ndarray:
  """True where the edge box contains at least one pixel centre."""
  ranges = pixel_ranges(boxes)
  return (ranges[:, 2] >= ranges[:, 0]) & (ranges[:, 3] >= ranges[:, 1])


def boxes_from_label_map(label_map: np.ndarray,
                         ignore_label: int = schema.IGNORE_LABEL
                         ) -> tuple[np.ndarray, np.ndarray]:
  """Boxes of the connected components of each class in a label map.

  Used when an image has no box annotation (VOC images without XML): every
  8-connected component of class c (ignore and background excluded) gives one
  box.  Returns int32 (N, 4) edge boxes and int32 (N,) labels.
  """
  label_map = np.asarray(label_map)
  boxes, labels = [], []
  structure = np.ones((3, 3), bool)
  for class_id in np.unique(label_map):
    if class_id == 0 or class_id == ignore_label:
      continue
    components, _ = ndimage.label(label_map == class_id, structure=structure)
    for region in ndimage.find_objects(components):
      rows, cols = region
      boxes.append((cols.start, rows.start, cols.stop, rows.stop))
      labels.append(int(class_id))
  return (np.asarray(boxes, np.int32).reshape(-1, 4),
          np.asarray(labels, np.int32).reshape(-1))


def boxes_from_instances(instance_map: np.ndarray, class_map: np.ndarray,
                         ignore_label: int = schema.IGNORE_LABEL
                         ) -> tuple[np.ndarray, np.ndarray]:
  """One box per instance id of a VOC `SegmentationObject` map.

  The class of an instance is the most frequent class under it in the class
  map (ignore excluded).  Instances 0 and 255 are not objects.
  """
  instance_map = np.asarray(instance_map)
  class_map = np.asarray(class_map)
  boxes, labels = [], []
  for instance_id in np.unique(instance_map):
    if instance_id == 0 or instance_id == ignore_label:
      continue
    inside = instance_map == instance_id
    classes = class_map[inside]
    classes = classes[(classes != 0) & (classes != ignore_label)]
    if classes.size == 0:
      continue
    rows = np.flatnonzero(inside.any(axis=1))
    cols = np.flatnonzero(inside.any(axis=0))
    boxes.append((cols[0], rows[0], cols[-1] + 1, rows[-1] + 1))
    labels.append(int(np.bincount(classes).argmax()))
  return (np.asarray(boxes, np.int32).reshape(-1, 4),
          np.asarray(labels, np.int32).reshape(-1))


def pad_boxes(boxes: np.ndarray, labels: np.ndarray,
              count: int) -> tuple[np.ndarray, np.ndarray]:
  """An image's real boxes (label >= 1) in `count` fixed rows, the batch
  layout of the device passes: float32 (count, 4) boxes (padded rows 0) and
  int32 (count,) labels (padded rows -1).  `count` must be at least the
  number of real boxes."""
  boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
  labels = np.asarray(labels, np.int32).reshape(-1)
  keep = labels >= 1
  boxes, labels = boxes[keep], labels[keep]
  if len(labels) > count:
    raise ValueError(f'pad_boxes: {len(labels)} boxes do not fit in {count} '
                     'rows.')
  out_boxes = np.zeros((count, 4), np.float32)
  out_labels = np.full((count,), -1, np.int32)
  out_boxes[:len(boxes)], out_labels[:len(labels)] = boxes, labels
  return out_boxes, out_labels
