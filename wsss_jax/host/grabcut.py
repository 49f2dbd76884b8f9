"""Box-initialised GrabCut pseudo-masks and filled-box label maps.

GrabCut (Rother et al. 2004) with OpenCV, one run per box, as the Box2Seg
paper's M labels (Sect. 3.1; docs/box2seg.md, choices 14–16):

* rectangle initialisation (`GC_INIT_WITH_RECT`) from the box on the
  full-resolution image, 5 iterations; foreground = definite or probable
  foreground;
* boxes narrower or shorter than 3 px, OpenCV errors and empty results fall
  back to the filled box (counted);
* per-box foregrounds are painted largest box first, so the smaller box wins
  (`wsss_jax.data.boxes.paint_order`); everything else is background.

OpenCV's GrabCut draws from its global RNG (k-means initialisation of the
colour models), so every call reseeds it: the same image and box always give
the same mask, whatever ran before in the process.
"""

from __future__ import annotations

import collections
from typing import Any, Mapping

import numpy as np

from wsss_jax.data import boxes as box_lib
from wsss_jax.data import schema

# Fallback reasons, also the keys of the per-reason counts in the stats.
FALLBACK_SMALL = 'fallback_small'
FALLBACK_ERROR = 'fallback_error'
FALLBACK_EMPTY = 'fallback_empty'
_MIN_SIDE = 3


def _check_image(image: np.ndarray) -> np.ndarray:
  image = np.asarray(image)
  if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
    raise ValueError(f'GrabCut: image must be uint8 (H, W, 3) RGB, got '
                     f'{image.dtype} {image.shape}.')
  return image


def _pixel_rect(box: np.ndarray, height: int,
                width: int) -> tuple[int, int, int, int]:
  """(x, y, w, h) of the pixels whose centres lie in an edge box
  (`boxes.pixel_ranges`), clipped; w or h may be <= 0 for empty boxes."""
  first_col, first_row, last_col, last_row = box_lib.pixel_ranges(box)[0]
  first_col, first_row = max(int(first_col), 0), max(int(first_row), 0)
  last_col, last_row = min(int(last_col), width - 1), min(int(last_row),
                                                          height - 1)
  return (first_col, first_row, last_col - first_col + 1,
          last_row - first_row + 1)


def grabcut_box(image: np.ndarray, box: np.ndarray, iterations: int = 5,
                seed: int = 0) -> tuple[np.ndarray, str | None]:
  """Foreground of one box by GrabCut, or the filled box as a fallback.

  Args:
    image: uint8 (H, W, 3) RGB (converted to BGR for OpenCV).
    box: (4,) [x0, y0, x1, y1] half-open pixel-edge box (int or float).
    iterations: GrabCut iterations.
    seed: OpenCV RNG seed set before the call (determinism).

  Returns:
    (mask, fallback): bool (H, W) foreground, always inside the box; and None
    if GrabCut succeeded, else the reason ('fallback_small': box under 3 px
    wide or high; 'fallback_error': OpenCV raised, e.g. a box covering the
    whole image leaves no background sample; 'fallback_empty': GrabCut found
    no foreground), in which case the mask is the filled box.
  """
  import cv2  # pylint: disable=g-import-not-at-top

  image = _check_image(image)
  height, width = image.shape[:2]
  box = np.asarray(box, np.float64).reshape(4)
  filled = box_lib.box_coverage(box[None], height, width)[0]
  x, y, w, h = _pixel_rect(box, height, width)
  if w < _MIN_SIDE or h < _MIN_SIDE:
    return filled, FALLBACK_SMALL
  gc_mask = np.zeros((height, width), np.uint8)
  bgd_model = np.zeros((1, 65), np.float64)
  fgd_model = np.zeros((1, 65), np.float64)
  bgr = np.ascontiguousarray(image[..., ::-1])
  cv2.setRNGSeed(int(seed))
  try:
    cv2.grabCut(bgr, gc_mask, (x, y, w, h), bgd_model, fgd_model,
                int(iterations), cv2.GC_INIT_WITH_RECT)
  except cv2.error:
    return filled, FALLBACK_ERROR
  foreground = ((gc_mask == cv2.GC_FGD) | (gc_mask == cv2.GC_PR_FGD)) & filled
  if not foreground.any():
    return filled, FALLBACK_EMPTY
  return foreground, None


def _prepare_boxes(boxes: np.ndarray, labels: np.ndarray, height: int,
                   width: int) -> tuple[np.ndarray, np.ndarray, int]:
  """Drops non-object labels (< 1), clips to the image; returns the drops."""
  boxes = np.asarray(boxes).reshape(-1, 4)
  labels = np.asarray(labels).reshape(-1)
  if len(boxes) != len(labels):
    raise ValueError(f'{len(boxes)} boxes but {len(labels)} box labels.')
  keep = labels >= 1
  boxes, labels, dropped = box_lib.clip_boxes(boxes[keep], labels[keep],
                                              height, width)
  return boxes, labels, dropped


def grabcut_label_map(image: np.ndarray, boxes: np.ndarray,
                      labels: np.ndarray, iterations: int = 5,
                      seed: int = 0) -> tuple[np.ndarray, dict[str, int]]:
  """Box2Seg's GrabCut label map M: one GrabCut per box, smaller box on top.

  Args:
    image: uint8 (H, W, 3) RGB.
    boxes: (N, 4) half-open pixel-edge boxes (N may be 0).
    labels: (N,) class ids 1..K; boxes with a label < 1 are ignored.
    iterations: GrabCut iterations per box.
    seed: OpenCV RNG seed, set before every box.

  Returns:
    (label_map uint8 (H, W) with 0 = background, stats) where stats counts
    'boxes' (GrabCut runs), 'fallbacks' (all reasons), one count per reason
    ('fallback_small', 'fallback_error', 'fallback_empty') and
    'boxes_dropped' (no pixel inside the image).
  """
  image = _check_image(image)
  height, width = image.shape[:2]
  boxes, labels, dropped = _prepare_boxes(boxes, labels, height, width)
  stats = collections.Counter({FALLBACK_SMALL: 0, FALLBACK_ERROR: 0,
                               FALLBACK_EMPTY: 0})
  out = np.zeros((height, width), np.uint8)
  for index in box_lib.paint_order(boxes):
    mask, fallback = grabcut_box(image, boxes[index], iterations, seed)
    out[mask] = labels[index]
    if fallback:
      stats[fallback] += 1
  stats['boxes'] = len(boxes)
  stats['fallbacks'] = (stats[FALLBACK_SMALL] + stats[FALLBACK_ERROR] +
                        stats[FALLBACK_EMPTY])
  stats['boxes_dropped'] = dropped
  return out, dict(stats)


def box_label_map(image: np.ndarray, boxes: np.ndarray,
                  labels: np.ndarray) -> tuple[np.ndarray, dict[str, int]]:
  """The filled-box label map (`boxes.fill_boxes`, smaller box on top).

  Same signature, clipping and stats keys ('boxes', 'boxes_dropped') as
  `grabcut_label_map`, so the two are interchangeable.
  """
  image = _check_image(image)
  height, width = image.shape[:2]
  boxes, labels, dropped = _prepare_boxes(boxes, labels, height, width)
  label_map = box_lib.fill_boxes(boxes, labels, height, width)
  return label_map, {'boxes': len(boxes), 'boxes_dropped': dropped}


def grabcut_example(example: Mapping[str, Any], iterations: int = 5,
                    seed: int = 0) -> tuple[np.ndarray, dict[str, int]]:
  """`grabcut_label_map` of a schema example (a label function for
  `wsss_jax.pseudo.engine`; bind options with `functools.partial`)."""
  return grabcut_label_map(example[schema.IMAGE], example[schema.BOXES],
                           example[schema.BOX_LABELS], iterations, seed)


def box_fill_example(
    example: Mapping[str, Any]) -> tuple[np.ndarray, dict[str, int]]:
  """`box_label_map` of a schema example (a label function for
  `wsss_jax.pseudo.engine`): the "Box" baseline pseudo-mask."""
  return box_label_map(example[schema.IMAGE], example[schema.BOXES],
                       example[schema.BOX_LABELS])
