"""BANA stage 2 over a whole split: device passes, host DenseCRF, PNG folders.

For each group of same-size training images (one jit per image size; the
embedded benchmark has one size, VOC a handful), in fixed-size batches:

  device pass 1   Labeler features -> unaries u_0, u_c -> CRF input
                  probabilities (`bana_labels.first_pass`)
  host            DenseCRF [4, 55, 3, 3, 3] in a process pool, foreground
                  channels zeroed outside their boxes, argmax -> Y_crf
  device pass 2   prototypes from Y_crf -> correlation maps -> Y_ret
                  (`bana_labels.second_pass`)

The device passes of the next batch run while the workers are busy with the
CRFs of the previous ones (`host.pool.HostPool.submit`).  Resumable: images
whose Y_crf and Y_ret PNGs both exist are skipped.  A third folder holds the
agreement map (Y_crf where the two agree, 255 elsewhere), scored to report
Table 1's "Y_crf & Y_ret" row.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import logging
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from wsss_jax.data import boxes as box_rows
from wsss_jax.data import schema
from wsss_jax.data.label_png import LabelFolder
from wsss_jax.host import crf as crf_lib
from wsss_jax.host import pool as pool_lib
from wsss_jax.methods.bana import labels as bana_labels
from wsss_jax.ops import image as image_ops

log = logging.getLogger(__name__)

Y_CRF, Y_RET, AGREEMENT = 'y_crf', 'y_ret', 'agreement'


@dataclasses.dataclass(frozen=True)
class LabelOptions:
  """The stage-2 switches of `config.bana` (configs/bana.py)."""
  per: str                # 'class' or 'box' (u_c normalisation)
  resolution: str         # 'upsample_maps' or 'upsample_features'
  threshold: float        # background attention cut (0.99)
  batch_size: int
  max_boxes: int
  crf: crf_lib.CrfParams

  @classmethod
  def from_config(cls, config) -> 'LabelOptions':
    cfg, compat = config.bana, config.bana.compat
    per = {'per_class': 'class', 'per_box': 'box'}.get(
        compat.u_c_normalisation)
    if per is None:
      raise ValueError('bana.compat.u_c_normalisation='
                       f'{compat.u_c_normalisation!r}: expected '
                       "'per_class' or 'per_box'.")
    resolution = compat.stage2_map_resolution
    if resolution not in ('upsample_maps', 'upsample_features'):
      raise ValueError(f'bana.compat.stage2_map_resolution={resolution!r}: '
                       "expected 'upsample_maps' or 'upsample_features'.")
    return cls(per=per, resolution=resolution,
               threshold=float(cfg.background_threshold),
               batch_size=max(1, int(cfg.label_batch_size)),
               max_boxes=int(config.input.max_boxes),
               crf=crf_lib.CrfParams(**dict(cfg.label_crf)))


def make_passes(model, normalization: str, options: LabelOptions):
  """The two jitted device passes (one compilation per image size)."""

  def features_and_kernel(variables, images):
    x = image_ops.normalize_images(images, normalization)
    out = model.apply(variables, x, train=False)
    kernel = variables['params']['head']['classifier']['kernel'][0, 0]
    return out['features'], kernel.astype(jnp.float32)

  @jax.jit
  def first(variables, images, boxes, labels):
    features, kernel = features_and_kernel(variables, images)
    out = bana_labels.first_pass(
        features, kernel, boxes, labels, images.shape[1:3], per=options.per,
        resolution=options.resolution, threshold=options.threshold)
    return out['probs'], out['class_masks'], out['no_background']

  @jax.jit
  def second(variables, images, y_crf, boxes, labels):
    features, kernel = features_and_kernel(variables, images)
    return bana_labels.second_pass(features, kernel, y_crf, boxes, labels,
                                   images.shape[1:3],
                                   resolution=options.resolution)

  return first, second


def crf_labels(item: tuple[np.ndarray, np.ndarray, np.ndarray],
               params: crf_lib.CrfParams) -> np.ndarray:
  """Worker body: DenseCRF of one image, classes masked to their boxes,
  argmax -> Y_crf uint8 (H, W).  item = (image uint8 (H, W, 3), probs
  (H, W, C), class_masks bool (H, W, C))."""
  image, probs, class_masks = item
  marginals = crf_lib.dense_crf(image, np.transpose(probs, (2, 0, 1)), params)
  q = np.transpose(marginals, (1, 2, 0))[None]
  return np.asarray(bana_labels.mask_marginals(q, class_masks[None]))[0] \
      .astype(np.uint8)


def generate(source, image_ids, heights, widths, variables, passes,
             options: LabelOptions, folders: dict[str, LabelFolder],
             workers: int) -> dict[str, Any]:
  """Writes Y_crf, Y_ret and agreement PNGs for every image not done yet.

  Args:
    source: random-access decoded training split.
    image_ids, heights, widths: the split index (same order as `source`).
    variables: the trained Labeler's variables.
    passes: `make_passes(...)`.
    options: stage-2 options.
    folders: {Y_CRF, Y_RET, AGREEMENT: LabelFolder}.
    workers: CRF worker processes (0 = inline).
  Returns:
    counts and throughput: images written/skipped, images with no
    background, images/s, device and host seconds.
  """
  first, second = passes
  done = (folders[Y_CRF].existing_ids() & folders[Y_RET].existing_ids()
          & folders[AGREEMENT].existing_ids())
  todo = [i for i, image_id in enumerate(image_ids) if image_id not in done]
  by_size = collections.defaultdict(list)
  for i in todo:
    by_size[(int(heights[i]), int(widths[i]))].append(i)
  stats = collections.Counter(skipped=len(image_ids) - len(todo))
  device_seconds = 0.0
  start = time.perf_counter()
  pending: dict[int, dict[str, Any]] = {}   # batch number -> batch state
  order: collections.deque = collections.deque()   # (batch number, slot)

  def finish(batch_no: int) -> None:
    nonlocal device_seconds
    batch = pending.pop(batch_no)
    tick = time.perf_counter()
    y_crf = np.stack(batch['y_crf'])
    y_crf = np.concatenate(   # back to the batch shape the pass compiled for
        [y_crf, np.repeat(y_crf[-1:], len(batch['images']) - len(y_crf), 0)])
    y_ret = np.asarray(jax.device_get(second(
        variables, batch['images'], jnp.asarray(y_crf, jnp.int32),
        batch['boxes'], batch['labels'])))
    device_seconds += time.perf_counter() - tick
    for slot, index in enumerate(batch['indices']):
      image_id = image_ids[index]
      crf_map, ret_map = y_crf[slot], y_ret[slot].astype(np.uint8)
      folders[Y_CRF].write(image_id, crf_map)
      folders[Y_RET].write(image_id, ret_map)
      folders[AGREEMENT].write(
          image_id, np.where(crf_map == ret_map, crf_map,
                             schema.IGNORE_LABEL).astype(np.uint8))
      stats['written'] += 1

  def collect(label: np.ndarray) -> None:
    batch_no, slot = order.popleft()
    batch = pending[batch_no]
    batch['y_crf'][slot] = label
    batch['remaining'] -= 1
    if batch['remaining'] == 0:
      finish(batch_no)

  fn = functools.partial(crf_labels, params=options.crf)
  batch_no = 0
  with pool_lib.HostPool(fn, workers, desc='bana labels',
                         total=len(todo)) as pool:
    for (height, width), indices in sorted(by_size.items()):
      for begin in range(0, len(indices), options.batch_size):
        chunk = indices[begin:begin + options.batch_size]
        examples = [source[i] for i in chunk]
        count = max([options.max_boxes] + [
            int(np.sum(np.asarray(e[schema.BOX_LABELS]) >= 1))
            for e in examples])
        # Fixed batch shape: the last example repeats (its results dropped).
        padded = examples + [examples[-1]] * (options.batch_size - len(chunk))
        images = np.stack([e[schema.IMAGE] for e in padded])
        boxes, labels = map(np.stack, zip(*[box_rows.pad_boxes(
            e[schema.BOXES], e[schema.BOX_LABELS], count) for e in padded]))
        tick = time.perf_counter()
        probs, class_masks, no_background = jax.device_get(first(
            variables, images, boxes, labels))
        device_seconds += time.perf_counter() - tick
        stats['no_background'] += int(np.sum(no_background[:len(chunk)]))
        pending[batch_no] = dict(indices=chunk, images=images, boxes=boxes,
                                 labels=labels, y_crf=[None] * len(chunk),
                                 remaining=len(chunk))
        for slot in range(len(chunk)):
          order.append((batch_no, slot))
          for label in pool.submit((images[slot], probs[slot],
                                    class_masks[slot])):
            collect(label)
        batch_no += 1
    for label in pool.drain():
      collect(label)
  seconds = time.perf_counter() - start
  written = stats['written']
  return {'written': written, 'skipped': stats['skipped'],
          'no_background_images': stats['no_background'],
          'seconds': seconds, 'device_seconds': device_seconds,
          'images_per_second': written / seconds if written else None,
          'crf_workers': workers}
