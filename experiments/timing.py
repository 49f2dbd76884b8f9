"""Shared parts of the benchmark scripts in this folder: the timing loop and
random batches."""

from __future__ import annotations

import statistics
import time
from typing import Callable

import jax
import numpy as np

from wsss_jax import defaults

# The segmentation networks the benchmarks time: name -> (model config
# factory, crop, batch size, classes).  The tiny one is the embedded
# benchmark's backbone; the others are DeepLab's VOC settings.
SEGMENTER_SETTINGS = {
    'tiny': (defaults.tiny_model, 96, 16, 7),
    'largefov': (defaults.largefov_model, 321, 2, 21),
    'resnet101': (defaults.resnet101_model, 321, 2, 21),
}
# Length of the poly learning-rate schedule of the timed steps.
SCHEDULE_STEPS = 1000


def time_train_step(train_step, state, batch, steps: int):
  """Runs `train_step` once (compile + first step), then `steps` timed times.

  Returns (state, compile_and_first_step_seconds, median_step_seconds); each
  step is timed to completion with `block_until_ready`.
  """
  start = time.perf_counter()
  state, metrics = train_step(state, batch)
  jax.block_until_ready(metrics)
  first = time.perf_counter() - start
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    state, metrics = train_step(state, batch)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - start)
  return state, first, statistics.median(times)


def random_images(rng: np.random.Generator, batch_size: int,
                  crop: int) -> np.ndarray:
  """Uniform uint8 RGB images, (batch_size, crop, crop, 3)."""
  return rng.integers(0, 256, (batch_size, crop, crop, 3), np.uint8)


def random_box_batch(rng: np.random.Generator, batch_size: int, crop: int,
                     num_classes: int, max_boxes: int,
                     boxes_per_image: Callable[[], int] = lambda: 3) -> dict:
  """A random batch laid out as the training stages' batches (schema).

  Each image gets `boxes_per_image()` boxes (at most `max_boxes`), corner
  uniform in the top-left quarter, sides uniform in [crop/8, crop/2]; padded
  rows are 0 with label -1.  No crop padding ('valid' all true); random
  'grabcut' and 'mask' label maps.
  """
  boxes = np.zeros((batch_size, max_boxes, 4), np.float32)
  labels = np.full((batch_size, max_boxes), -1, np.int32)
  for b in range(batch_size):
    for k in range(min(boxes_per_image(), max_boxes)):
      x0, y0 = rng.uniform(0, crop / 2, 2)
      w, h = rng.uniform(crop / 8, crop / 2, 2)
      boxes[b, k] = (x0, y0, x0 + w, y0 + h)
      labels[b, k] = rng.integers(1, num_classes)
  return {'image': random_images(rng, batch_size, crop),
          'valid': np.ones((batch_size, crop, crop), bool),
          'boxes': boxes, 'box_labels': labels,
          'grabcut': rng.integers(0, num_classes, (batch_size, crop, crop),
                                  dtype=np.uint8),
          'mask': rng.integers(0, num_classes, (batch_size, crop, crop),
                               dtype=np.uint8)}
