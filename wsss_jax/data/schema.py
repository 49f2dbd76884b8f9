"""The one example schema shared by every dataset (shapes, VOC, COCO).

A *decoded example* (what a split's data source yields, before augmentation):

  image         uint8  (H, W, 3)  RGB.
  mask          uint8  (H, W)     0 = background, 1..K = classes, 255 = ignore.
  boxes         int32  (N, 4)     [x0, y0, x1, y1] in *pixel-edge* coordinates:
                                  the box covers columns x0 .. x1-1 and rows
                                  y0 .. y1-1 (half-open).  A VOC XML box
                                  (1-based inclusive xmin..xmax) becomes
                                  x0 = xmin - 1, x1 = xmax.  N may be 0.
  box_labels    int32  (N,)       class id of each box, 1..K (same ids as mask).
  image_labels  bool   (K,)       multi-hot over the K foreground classes
                                  (index c-1 for class id c).
  image_id      str               unique within the dataset.

After augmentation the boxes are float32 in the same half-open edge convention,
so scaling is a multiplication and flipping is x -> W - x.  A pixel (row i,
column j) is inside a box when its centre (j + .5, i + .5) is inside.

A *batch* (after `wsss_jax.data.pipeline`) has fixed shapes:

  image         uint8   (B, S, S, 3)   normalisation happens on device.
  mask          uint8   (B, S, S)      ground truth (255 where unknown/padded).
  valid         bool    (B, S, S)      True on real (non-padded) pixels.
  boxes         float32 (B, MAXB, 4)   padded rows are 0.
  box_labels    int32   (B, MAXB)      -1 on padded rows.
  image_labels  float32 (B, K)
  <name>        uint8   (B, S, S)      one per joined pseudo-label folder.
  num_boxes_dropped int32 (B,)         boxes beyond MAXB (largest kept).
  image_id      object  (B,)           host only; never sent to devices.
  height, width int32   (B,)           evaluation batches only: the size
                                       before padding to the bucket.
"""

from __future__ import annotations

import numpy as np

IMAGE = 'image'
MASK = 'mask'
BOXES = 'boxes'
BOX_LABELS = 'box_labels'
IMAGE_LABELS = 'image_labels'
IMAGE_ID = 'image_id'
VALID = 'valid'

IGNORE_LABEL = 255
BOX_PAD_LABEL = -1

# Keys that stay on the host (strings) and are never put on devices.
HOST_ONLY_KEYS = (IMAGE_ID,)

VOC_CLASSES = (
    'background', 'aeroplane', 'bicycle', 'bird', 'boat', 'bottle', 'bus',
    'car', 'cat', 'chair', 'cow', 'diningtable', 'dog', 'horse', 'motorbike',
    'person', 'pottedplant', 'sheep', 'sofa', 'train', 'tvmonitor')

# Caffe (BGR order in the papers; stored here in RGB order) and ImageNet means.
CAFFE_MEAN_RGB = (122.675, 116.669, 104.008)
IMAGENET_MEAN_RGB = (0.485 * 255, 0.456 * 255, 0.406 * 255)
IMAGENET_STD_RGB = (0.229 * 255, 0.224 * 255, 0.225 * 255)


def voc_palette(num_entries: int = 256) -> np.ndarray:
  """The standard PASCAL VOC colour map, (num_entries, 3) uint8.

  Entry 255 (ignore) is (224, 224, 192) as in the official PNGs.
  """
  palette = np.zeros((num_entries, 3), np.uint8)
  for index in range(num_entries):
    value, r, g, b = index, 0, 0, 0
    for bit in range(8):
      r |= ((value >> 0) & 1) << (7 - bit)
      g |= ((value >> 1) & 1) << (7 - bit)
      b |= ((value >> 2) & 1) << (7 - bit)
      value >>= 3
    palette[index] = (r, g, b)
  return palette


def image_labels_from_ids(class_ids, num_foreground: int) -> np.ndarray:
  """Multi-hot (K,) bool vector from foreground class ids in 1..K (others ignored)."""
  labels = np.zeros((num_foreground,), bool)
  ids = np.asarray(class_ids, np.int64).reshape(-1)
  ids = ids[(ids >= 1) & (ids <= num_foreground)]
  labels[ids - 1] = True
  return labels
