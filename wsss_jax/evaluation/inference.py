"""Full-image inference and split evaluation.

Images are padded (bottom/right) to one bucket size so the predictor compiles
once; multi-scale and flip passes are fused on the device, each pass over the
whole image or in sliding windows (MMSegmentation's 'slide' mode); the optional
DenseCRF runs in host worker processes while the device computes the next
batch.  Every evaluated image can be written as a VOC-palette PNG.
"""

from __future__ import annotations

import collections
import functools
import math
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from wsss_jax import progress as progress_lib
from wsss_jax.data import pipeline, schema, transforms
from wsss_jax.data.label_png import write_label_png
from wsss_jax.evaluation import metrics
from wsss_jax.crf import backend as crf_backend_lib
from wsss_jax.host import crf as crf_lib
from wsss_jax.host.pool import HostPool
from wsss_jax.ops import image as image_ops
from wsss_jax.ops.resize import resize_bilinear
from wsss_jax.training import mesh as mesh_lib

FUSIONS = ('mean_probs', 'mean_logits', 'max_logits')


def window_starts(length: int, size: int, stride: int) -> list[int]:
  """Start offsets of the sliding windows along one side (mmseg's 'slide').

  ceil((length − size) / stride) + 1 windows (one when length <= size); the
  i-th starts at i·stride, except that the last is moved back so that it ends
  at `length`.  Every window spans min(size, length) pixels: a side shorter
  than the window is covered by one window of that side's length.
  E.g. (10, 4, 3) -> [0, 3, 6] (6..10); (5, 8, 3) -> [0] (0..5).
  """
  if size <= 0 or stride <= 0:
    raise ValueError(f'window size and stride must be positive, got '
                     f'size={size}, stride={stride}.')
  grids = max(length - size + stride - 1, 0) // stride + 1
  return [max(min(i * stride + size, length) - size, 0) for i in range(grids)]


def check_window(window_size: int, window_stride: int) -> None:
  """ValueError naming `eval.window_size`/`eval.window_stride` unless the
  window is off (size 0) or 0 < stride <= size."""
  if window_size < 0:
    raise ValueError(f'eval.window_size={window_size}: expected 0 (whole '
                     'image) or a positive window side.')
  if window_size > 0 and not 0 < window_stride <= window_size:
    raise ValueError(f'eval.window_stride={window_stride}: expected 0 < '
                     f'stride <= eval.window_size ({window_size}).')


def slide_logits(apply_fn: Callable[[jax.Array], jax.Array],
                 inputs: jax.Array, window_size: int, window_stride: int,
                 align_corners: bool = False) -> jax.Array:
  """Float32 logits (B, H, W, C) of `inputs` (B, H, W, 3) averaged over
  sliding windows.

  `apply_fn` maps (N, h, w, 3) to logits (N, h', w', C) at that resolution
  or lower.  The windows (`window_starts` on each side) are cut from the
  static shape at trace time and run through `apply_fn` in one batched call
  (B·n_windows, h, w, 3); each window's logits are resized (bilinear, the
  `align_corners` convention) to the window, added into a canvas, and every
  pixel divided by the number of windows covering it (docs/
  implementation_notes.md, "Sliding-window inference").
  """
  batch, height, width, _ = inputs.shape
  win_h, win_w = min(window_size, height), min(window_size, width)
  corners = [(y, x) for y in window_starts(height, window_size, window_stride)
             for x in window_starts(width, window_size, window_stride)]
  # Image-major order (B, n) -> B·n: with the batch sharded over a mesh,
  # each device's windows come from its own images (no resharding).
  crops = jnp.stack([inputs[:, y:y + win_h, x:x + win_w]
                     for y, x in corners], axis=1)
  logits = apply_fn(crops.reshape((batch * len(corners), win_h, win_w) +
                                  crops.shape[4:])).astype(jnp.float32)
  logits = resize_bilinear(logits, (win_h, win_w), align_corners)
  logits = logits.reshape((batch, len(corners)) + logits.shape[1:])
  canvas = jnp.zeros((batch, height, width, logits.shape[-1]), jnp.float32)
  # The coverage is static: counted in numpy, a constant of the program.
  count = np.zeros((height, width), np.float32)
  for k, (y, x) in enumerate(corners):
    canvas = canvas.at[:, y:y + win_h, x:x + win_w].add(logits[:, k])
    count[y:y + win_h, x:x + win_w] += 1
  return canvas / jnp.asarray(count)[None, :, :, None]


def make_predictor(model, normalization: str, *, scales=(1.0,),
                   flip: bool = False, fusion: str = 'mean_probs',
                   align_corners: bool = False, compute_dtype=jnp.float32,
                   output: str = 'labels', mesh=None, window_size: int = 0,
                   window_stride: int = 0) -> Callable:
  """Jitted `predict(variables, images_uint8 (B, S, S, 3))`.

  For every scale s (and its horizontal flip) the normalised batch is resized
  to round(S·s), the model's logits are brought back to S×S (bilinear, the
  `align_corners` convention), flipped logits flipped back, and the passes are
  fused: 'mean_probs' averages softmax probabilities; 'mean_logits' averages
  logits then applies softmax (BANA averages cosine logits); 'max_logits'
  takes the element-wise maximum (LPG's multi-scale fusion).

  With `window_size` > 0 every pass runs the model on windows of that side
  (pixels of the resized, possibly flipped input) every `window_stride`
  pixels and averages their logits (`slide_logits`, MMSegmentation's 'slide'
  mode) before bringing them back to S×S; 0 runs it on the whole image.  The
  windows slide over the padded bucket image, padding included.

  Returns float32 probabilities (B, S, S, C) when `output='probs'`, else the
  uint8 argmax labels (B, S, S) (smaller device-to-host transfer); with a
  `mesh` the output stays sharded over its 'data' axis like the input.
  """
  if fusion not in FUSIONS:
    raise ValueError(f'eval.fusion={fusion!r}; expected one of {FUSIONS}.')
  if not scales or any(s <= 0 for s in scales):
    raise ValueError(f'eval.scales must be positive, got {tuple(scales)}.')
  check_window(window_size, window_stride)
  window_size, window_stride = int(window_size), int(window_stride)
  passes = [(float(s), f) for s in scales for f in ((False, True) if flip
                                                    else (False,))]

  def predict(variables, images):
    _, height, width, _ = images.shape
    x = image_ops.normalize_images(images, normalization, compute_dtype)
    fused = None
    for scale, flipped in passes:
      size = (max(1, round(height * scale)), max(1, round(width * scale)))
      inputs = resize_bilinear(x, size, align_corners)
      if flipped:
        inputs = inputs[:, :, ::-1]
      if window_size:
        logits = slide_logits(
            lambda windows: model.apply(variables, windows,
                                        train=False)['logits'],
            inputs, window_size, window_stride, align_corners)
      else:
        logits = model.apply(variables, inputs, train=False)['logits']
        logits = logits.astype(jnp.float32)
      if flipped:
        logits = logits[:, :, ::-1]
      logits = resize_bilinear(logits, (height, width), align_corners)
      term = jax.nn.softmax(logits) if fusion == 'mean_probs' else logits
      if fused is None:
        fused = term
      elif fusion == 'max_logits':
        fused = jnp.maximum(fused, term)
      else:
        fused = fused + term
    if fusion != 'max_logits':
      fused = fused / len(passes)
    probs = fused if fusion == 'mean_probs' else jax.nn.softmax(fused)
    if output == 'probs':
      return probs
    return jnp.argmax(probs, axis=-1).astype(jnp.uint8)

  if mesh is None:
    return jax.jit(predict)
  return jax.jit(predict, out_shardings=mesh_lib.data_sharded(mesh))


def window_config(eval_config) -> dict[str, int]:
  """`make_predictor`'s window arguments from `config.eval`; configs saved
  before the fields existed read as 0 (whole image)."""
  return {'window_size': int(eval_config.get('window_size', 0)),
          'window_stride': int(eval_config.get('window_stride', 0))}


def describe_window(eval_config) -> dict[str, int]:
  """The window fields for a protocol description; empty when off."""
  window = window_config(eval_config)
  return window if window['window_size'] else {}


def bucket_size_for(eval_config, index) -> int:
  """`eval.bucket_size`, or the split's largest side rounded up to 8."""
  largest = int(max(index.heights.max(), index.widths.max()))
  if eval_config.bucket_size:
    if eval_config.bucket_size < largest:
      worst = int(np.argmax(np.maximum(index.heights, index.widths)))
      raise ValueError(
          f'eval.bucket_size={eval_config.bucket_size} is smaller than image '
          f'{index.image_ids[worst]!r} ({index.heights[worst]}x'
          f'{index.widths[worst]}); raise it to at least {largest} or set 0.')
    return int(eval_config.bucket_size)
  return int(math.ceil(largest / 8) * 8)


def _local(array) -> np.ndarray:
  """This process's rows of a batch-sharded global array, as numpy."""
  if jax.process_count() == 1:
    return np.asarray(array)
  shards = sorted(array.addressable_shards, key=lambda s: s.index[0].start)
  return np.concatenate([np.asarray(s.data) for s in shards])


class Evaluator:
  """Scores a model on a split; optionally writes every prediction as PNG.

  Args:
    model: the Flax module (returns a dict with 'logits').
    dataset: a `wsss_jax.data.registry.Dataset`.
    split: split name.
    eval_config: `config.eval` (`wsss_jax.defaults.evaluation`).
    normalization: 'caffe' or 'imagenet'.
    mesh: device mesh; batches are sharded over its 'data' axis.
    compute_dtype: model computation dtype.
    worker_count: grain workers for decoding.
  """

  def __init__(self, model, dataset, split: str, eval_config,
               normalization: str, mesh, compute_dtype=jnp.float32,
               worker_count: int = 0, max_boxes: int = 64,
               crf_backend: str = 'pydensecrf'):
    self.dataset = dataset
    self.crf_backend = crf_backend
    self.split = split
    self.config = eval_config
    self.mesh = mesh
    self.worker_count = worker_count
    mesh_lib.check_batch_size(eval_config.batch_size, mesh,
                              'eval.batch_size')
    self.bucket = bucket_size_for(eval_config, dataset.index(split))
    self.transform = transforms.EvalTransform(
        bucket_size=self.bucket, num_foreground=dataset.num_classes - 1,
        max_boxes=max_boxes,
        image_pad_value=image_ops.pad_color(normalization))
    self.crf_params = (crf_lib.CrfParams.from_config(eval_config.crf_params)
                       if eval_config.crf else None)
    self.predict = make_predictor(
        model, normalization, scales=tuple(eval_config.scales),
        flip=bool(eval_config.flip), fusion=eval_config.fusion,
        align_corners=bool(eval_config.align_corners),
        compute_dtype=compute_dtype,
        output='probs' if self.crf_params else 'labels', mesh=mesh,
        **window_config(eval_config))

  def describe(self) -> dict[str, Any]:
    return {'split': self.split, 'bucket_size': self.bucket,
            'scales': list(self.config.scales), 'flip': bool(self.config.flip),
            'fusion': self.config.fusion,
            **describe_window(self.config),
            'crf': bool(self.config.crf),
            **({'crf_backend': self.crf_backend} if self.config.crf else {})}

  def __call__(self, variables, *, max_images: int = 0,
               out_dir: str | None = None,
               progress: bool = True) -> dict[str, Any]:
    """Returns `metrics.scores` (+ 'num_images') over the (sub)split."""
    # Replicate once: host or single-device weights would otherwise be
    # copied to every device on every batch.
    variables = jax.device_put(variables, mesh_lib.replicated(self.mesh))
    source = self.dataset.source(self.split)
    if max_images:
      source = pipeline.Subset(source, max_images)
    num_classes = self.dataset.num_classes
    conf = np.zeros((num_classes, num_classes), np.int64)
    # With the CRF, the argmax of its input is scored too ('without_crf'):
    # the with/without comparison costs no second forward pass.
    plain_conf = conf.copy() if self.crf_params else None
    pending = collections.deque()   # (image_id, gt) awaiting their labels
    if out_dir:
      os.makedirs(out_dir, exist_ok=True)
    host_fn = (functools.partial(crf_lib.crf_item, params=self.crf_params,
                                 argmax=True, backend=self.crf_backend)
               if self.crf_params else (lambda item: item))
    workers = (crf_backend_lib.host_workers(self.crf_backend,
                                            self.config.crf_workers)
               if self.crf_params else 0)
    num_images = 0

    def consume(label):
      nonlocal num_images
      image_id, gt = pending.popleft()
      np.add(conf, metrics.confusion_matrix(gt, label, num_classes), out=conf)
      if out_dir:
        write_label_png(os.path.join(out_dir, f'{image_id}.png'), label)
      num_images += 1

    batches = pipeline.eval_batches(source, self.transform,
                                    self.config.batch_size, self.worker_count)
    bar = progress_lib.bar(total=len(source), desc=f'eval {self.split}',
                           leave=False, show=progress)
    with HostPool(host_fn, workers, desc='crf', progress=False) as pool:
      in_flight = None
      for batch in batches:
        images = mesh_lib.device_batch({schema.IMAGE: batch.data[
            schema.IMAGE]}, self.mesh)[schema.IMAGE]
        outputs = self.predict(variables, images)   # async dispatch
        if in_flight is not None:
          for label in self._host_items(pool, *in_flight, pending,
                                        plain_conf):
            consume(label)
            bar.update(1)
        in_flight = (batch, outputs)
      if in_flight is not None:
        for label in self._host_items(pool, *in_flight, pending,
                                      plain_conf):
          consume(label)
          bar.update(1)
      for label in pool.drain():
        consume(label)
        bar.update(1)
    bar.close()
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      conf = np.asarray(multihost_utils.process_allgather(conf)).sum(0)
      num_images = int(np.asarray(
          multihost_utils.process_allgather(np.int64(num_images))).sum())
      if plain_conf is not None:
        plain_conf = np.asarray(
            multihost_utils.process_allgather(plain_conf)).sum(0)
    result = metrics.scores(conf, self.dataset.class_names)
    result['num_images'] = num_images
    if plain_conf is not None:
      plain = metrics.scores(plain_conf, self.dataset.class_names)
      result['without_crf'] = {key: plain[key] for key in
                               ('miou', 'pixel_acc', 'per_class_iou')}
    return result

  def _host_items(self, pool, batch, outputs, pending, plain_conf=None):
    """Crops each real example of a finished batch and submits it; scores
    the argmax of the CRF's input into `plain_conf` when given."""
    outputs = _local(outputs)
    data = batch.data
    for i in range(batch.count):
      height, width = int(data[transforms.HEIGHT][i]), int(
          data[transforms.WIDTH][i])
      gt = data[schema.MASK][i, :height, :width]
      pending.append((str(data[schema.IMAGE_ID][i]), gt))
      if self.crf_params:
        probs = outputs[i, :height, :width]
        if plain_conf is not None:
          np.add(plain_conf, metrics.confusion_matrix(
              gt, np.argmax(probs, -1).astype(np.uint8),
              self.dataset.num_classes), out=plain_conf)
        item = (np.ascontiguousarray(data[schema.IMAGE][i, :height, :width]),
                np.ascontiguousarray(np.moveaxis(probs, -1, 0)))
      else:
        item = outputs[i, :height, :width]
      yield from pool.submit(item)

