"""Box + DenseCRF pseudo-masks: the boxes as a soft prior, refined by a
DenseCRF (the "DenseCRF" row box-supervised papers compare against, e.g.
LPG's Table 9).

The prior of a pixel: background 1 outside every box; inside the boxes of
one or more classes, `confidence` shared equally by those classes and
1 - `confidence` for background.  The CRF runs over the background and the
image's classes only; a pixel outside every box stays background.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from wsss_jax.data import boxes as box_ops
from wsss_jax.data import schema
from wsss_jax.host import crf as crf_lib


def box_prior(boxes: np.ndarray, labels: np.ndarray, height: int, width: int,
              confidence: float) -> tuple[np.ndarray, np.ndarray]:
  """The box prior of an image.

  Args:
    boxes: (N, 4) half-open pixel-edge boxes [x0, y0, x1, y1].
    labels: (N,) classes 1..K (rows < 1 are padding).
    height, width: the image size.
    confidence: the foreground share inside a box, in (0, 1).
  Returns:
    (probs float32 (1 + C, H, W): channel 0 background, channel 1 + i class
    `classes[i]`; classes int64 (C,) the image's classes, ascending).
  """
  if not 0.0 < confidence < 1.0:
    raise ValueError(f'box prior confidence must be in (0, 1), got '
                     f'{confidence}.')
  boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
  labels = np.asarray(labels, np.int64).reshape(-1)
  keep = labels >= 1
  boxes, labels = boxes[keep], labels[keep]
  classes = np.unique(labels)
  inside = np.zeros((len(classes), height, width), bool)
  ranges = box_ops.pixel_ranges(boxes)
  for (c0, r0, c1, r1), label in zip(ranges, labels):
    index = int(np.searchsorted(classes, label))
    inside[index, max(r0, 0):max(r1 + 1, 0), max(c0, 0):max(c1 + 1, 0)] = True
  count = inside.sum(axis=0)
  any_box = count > 0
  probs = np.zeros((1 + len(classes), height, width), np.float32)
  probs[0] = np.where(any_box, 1.0 - confidence, 1.0)
  probs[1:] = inside * (confidence / np.maximum(count, 1))[None]
  return probs, classes


def box_crf_label_map(image: np.ndarray, boxes: np.ndarray,
                      labels: np.ndarray, params: crf_lib.CrfParams,
                      confidence: float = 0.7,
                      backend: str = 'pydensecrf') -> np.ndarray:
  """uint8 (H, W) label map: the argmax of the DenseCRF marginals of the box
  prior (`box_prior`), background outside every box."""
  height, width = image.shape[:2]
  probs, classes = box_prior(boxes, labels, height, width, confidence)
  out = np.zeros((height, width), np.uint8)
  if not len(classes):
    return out
  marginals = crf_lib.get_backend(backend)(image, probs, params)
  winner = np.argmax(marginals, axis=0)
  lookup = np.concatenate([[0], classes]).astype(np.uint8)
  out = lookup[winner]
  out[probs[0] >= 1.0] = 0           # outside every box
  return out


def box_crf_example(example: Mapping[str, Any], params: crf_lib.CrfParams,
                    confidence: float = 0.7,
                    backend: str = 'pydensecrf') -> np.ndarray:
  """`box_crf_label_map` of a schema example (a label function for
  `wsss_jax.pseudo.engine`; bind the options with `functools.partial`)."""
  return box_crf_label_map(example[schema.IMAGE], example[schema.BOXES],
                           example[schema.BOX_LABELS], params, confidence,
                           backend)
