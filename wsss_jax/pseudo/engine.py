"""The label-generation engine: device passes -> host pool -> PNG folders.

Every label stage is one `LabelJob` run over a split by `run`:

  first pass   optional, jitted, on the accelerator: a batch of same-size
               images -> per-image arrays (CAMs, CRF input probabilities, ...)
  host         `host_fn` on each image in a process pool (DenseCRF, GrabCut,
               box filling, any picklable function), overlapping the device
               passes of the next batches (`wsss_jax.host.pool.HostPool`)
  second pass  optional, jitted: the batch again, with the host results
  label maps   one uint8 (H, W) map per output folder, written as
               `<folder>/<image_id>.png` (`wsss_jax.data.label_png`)

With a device pass, images are grouped by size and cut into batches of
`batch_size`; the last batch of a size is padded by repeating its last image
(the padded results are dropped), so every batch of a size has the same
shapes and each pass compiles once per image size (and box-row count: rows
are `box_rows`, more only for an image with more boxes).  Without one (a
host-only job: box filling, GrabCut, partial ground truth) images go one by
one in split order.

Resumable: an image whose every output PNG exists is skipped without being
decoded (PNGs are written atomically, so an existing file is complete).  PNGs
are written by the calling process; workers only compute.

    job = LabelJob(outputs=('grabcut',),
                   host_fn=functools.partial(grabcut.grabcut_example,
                                             iterations=5))
    counts = run(job, source, image_ids, {'grabcut': LabelFolder(path)},
                 workers=4)
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import time
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from wsss_jax.data import boxes as box_rows
from wsss_jax.data import schema
from wsss_jax.data.label_png import LabelFolder
from wsss_jax.host import pool as pool_lib

# A host label function: fn(example) -> label map uint8 (H, W), or
# (label map, counts {name: int}).
LabelFn = Callable[[Mapping[str, Any]],
                   np.ndarray | tuple[np.ndarray, Mapping[str, int]]]


# The counts `run` returns for every job (host and first-pass counts join them).
RUN_KEYS = ('total', 'written', 'skipped', 'seconds', 'device_seconds',
            'images_per_second', 'host_workers')


class HostFnError(RuntimeError):
  """`host_fn` failed on an image (the message names the image id).

  Raised inside the worker, so it reaches the caller wrapped in a
  `pool.WorkerError` that also names the item index."""


@dataclasses.dataclass(frozen=True)
class LabelJob:
  """What a label stage computes for each image.

  Shapes: B = `batch_size`, (H, W) the image size (one per batch), N the box
  rows (>= `box_rows`).

  Attributes:
    outputs: the names of the folders written for every image (keys of
      `run`'s `folders`).
    host_fn: picklable host function (a module-level function or a
      `functools.partial` of one), run in the worker processes.  It gets the
      example (schema keys: 'image' uint8 (H, W, 3), 'boxes', 'box_labels',
      'image_id', ...) with the first pass's outputs for that image added
      under their names (one image, no batch axis), and returns a value, or
      (value, counts {name: int}) whose counts are summed over the written
      images.  Without `second_pass` and `label_maps` the value is the label
      map, uint8 (H, W), checked in the worker.
    first_pass: optional device pass `first_pass(batch) -> {name: (B, ...)}`
      (jitted; bind the model variables with `functools.partial` so they are
      arguments, not constants).  `batch` holds 'image' uint8 (B, H, W, 3),
      'boxes' float32 (B, N, 4) half-open pixel-edge boxes (padded rows 0),
      'box_labels' int32 (B, N) (padded rows -1) and, when the examples have
      them, 'image_labels' (B, ...).
    second_pass: optional device pass `second_pass(batch, values) -> pytree
      of (B, ...) arrays`, `values` the host values stacked (B, ...).
    label_maps: `label_maps(value, second) -> {output: uint8 (H, W)}` with
      `second` this image's slice of the second pass's outputs (None without
      one); default `{outputs[0]: value}` (one output only).
    batch_size: B, the images per device batch (ignored host-only).
    box_rows: N, the least number of box rows of a device batch.
    counted: names of first-pass outputs that are per-image numbers (B,),
      e.g. flags, summed over the written images into the returned counts.
    desc: progress-bar label.
  """
  outputs: tuple[str, ...]
  host_fn: Callable[[Mapping[str, Any]], Any]
  first_pass: Callable[[dict[str, np.ndarray]], dict[str, Any]] | None = None
  second_pass: Callable[[dict[str, np.ndarray], np.ndarray], Any] | None = None
  label_maps: Callable[[Any, Any], Mapping[str, np.ndarray]] | None = None
  batch_size: int = 1
  box_rows: int = 0
  counted: tuple[str, ...] = ()
  desc: str = 'labels'

  def __post_init__(self):
    if not self.outputs:
      raise ValueError('LabelJob: outputs is empty.')
    if self.label_maps is None and (len(self.outputs) > 1
                                    or self.second_pass is not None):
      raise ValueError(f'LabelJob({self.desc}): label_maps is required with '
                       'several outputs or a second pass.')
    if int(self.batch_size) < 1:
      raise ValueError(f'LabelJob({self.desc}): batch_size must be >= 1, got '
                       f'{self.batch_size}.')

  @property
  def on_device(self) -> bool:
    return self.first_pass is not None or self.second_pass is not None


def _check_map(label_map: Any, expected_hw: Sequence[int], image_id: str,
               what: str) -> np.ndarray:
  label_map = np.asarray(label_map)
  expected = tuple(int(v) for v in expected_hw)
  if label_map.shape != expected or label_map.dtype != np.uint8:
    raise ValueError(f'{what} returned {label_map.dtype} {label_map.shape} '
                     f'for image {image_id!r}; expected uint8 {expected}.')
  return label_map


def _host_call(item: Mapping[str, Any], fn: Callable[[Mapping[str, Any]], Any],
               is_map: bool) -> tuple[Any, dict[str, int]]:
  """Worker body: fn(item) -> (value, counts), errors naming the image."""
  image_id = str(item[schema.IMAGE_ID])
  try:
    output = fn(item)
    value, counts = output if isinstance(output, tuple) else (output, {})
    if is_map:
      value = _check_map(value, np.shape(item[schema.IMAGE])[:2], image_id,
                         f'Label function {fn!r}')
  except Exception as exc:
    raise HostFnError(f'image {image_id!r}: {type(exc).__name__}: '
                      f'{exc}') from exc
  return value, dict(counts)


def _collate(examples: Sequence[Mapping[str, Any]],
             box_rows_min: int) -> dict[str, np.ndarray]:
  """The batch of a device pass (see `LabelJob.first_pass`)."""
  count = max([box_rows_min] + [
      int(np.sum(np.asarray(e[schema.BOX_LABELS]) >= 1)) for e in examples])
  boxes, labels = map(np.stack, zip(*[box_rows.pad_boxes(
      e[schema.BOXES], e[schema.BOX_LABELS], count) for e in examples]))
  batch = {schema.IMAGE: np.stack([e[schema.IMAGE] for e in examples]),
           schema.BOXES: boxes, schema.BOX_LABELS: labels}
  if all(schema.IMAGE_LABELS in e for e in examples):
    batch[schema.IMAGE_LABELS] = np.stack(
        [e[schema.IMAGE_LABELS] for e in examples])
  return batch


def _slice(tree: Any, slot: int) -> Any:
  import jax  # pylint: disable=g-import-not-at-top
  return jax.tree_util.tree_map(lambda a: a[slot], tree)


def run(job: LabelJob, source, image_ids: Sequence[str],
        folders: Mapping[str, LabelFolder], *,
        sizes: Sequence[tuple[int, int]] | None = None, workers: int = 0,
        max_in_flight: int | None = None,
        progress: bool = True) -> dict[str, Any]:
  """Writes the job's label maps for every image not done yet.

  Args:
    job: what to compute.
    source: random-access decoded split (`source[i]` is the example of
      `image_ids[i]`, in the schema layout).
    image_ids: the split's ids, in order.
    folders: {output name: LabelFolder} for every `job.outputs`.
    sizes: (H, W) of every image (required with a device pass: batches are
      grouped by size without decoding).
    workers: host worker processes (0 = inline).
    max_in_flight: bound on images in the host pool (default 2 per worker).
    progress: show a progress bar.

  Returns:
    {'total', 'written', 'skipped' (outputs all existed), 'seconds',
    'device_seconds', 'images_per_second' (None if nothing written),
    'host_workers'} plus every count summed over the written images (the
    `counted` first-pass outputs, the host function's counts).

  Raises:
    pool.WorkerError: `host_fn` failed (names the item index and, through
      `HostFnError`, the image id).
  """
  # jax is imported here, in the calling process, not at module level: the
  # workers import this module (for `_host_call`) and start faster without it.
  import jax  # pylint: disable=g-import-not-at-top
  missing = [name for name in job.outputs if name not in folders]
  if missing:
    raise ValueError(f'run({job.desc}): no folder for outputs {missing}.')
  if job.on_device and sizes is None:
    raise ValueError(f'run({job.desc}): a job with a device pass needs the '
                     'image sizes.')
  done = set.intersection(*[folders[name].existing_ids()
                            for name in job.outputs])
  todo = [i for i, image_id in enumerate(image_ids) if image_id not in done]
  if job.on_device:
    by_size = collections.defaultdict(list)
    for i in todo:
      by_size[tuple(int(v) for v in sizes[i])].append(i)
    batch_size = int(job.batch_size)
    batches = [indices[begin:begin + batch_size]
               for _, indices in sorted(by_size.items())
               for begin in range(0, len(indices), batch_size)]
  else:
    batch_size = 1
    batches = [[i] for i in todo]

  counts: collections.Counter[str] = collections.Counter(
      {name: 0 for name in job.counted})
  device_seconds = 0.0
  written = 0
  start = time.perf_counter()
  pending: dict[int, dict[str, Any]] = {}     # batch number -> batch state
  order: collections.deque = collections.deque()   # (batch number, slot)

  def finish(batch_no: int) -> None:
    nonlocal device_seconds, written
    state = pending.pop(batch_no)
    values = state['values']
    second = None
    if job.second_pass is not None:
      tick = time.perf_counter()
      stacked = np.stack(values)
      # Back to the batch shape the pass compiled for.
      stacked = np.concatenate(
          [stacked, np.repeat(stacked[-1:], batch_size - len(values), 0)])
      second = jax.device_get(job.second_pass(state['batch'], stacked))
      device_seconds += time.perf_counter() - tick
    for slot, (index, hw) in enumerate(zip(state['indices'], state['hw'])):
      image_id = image_ids[index]
      maps = (job.label_maps(values[slot], None if second is None
                             else _slice(second, slot))
              if job.label_maps is not None else {job.outputs[0]: values[slot]})
      if set(maps) != set(job.outputs):
        raise ValueError(f'{job.desc}: label_maps gave {sorted(maps)} for '
                         f'image {image_id!r}; expected {sorted(job.outputs)}.')
      for name in job.outputs:
        folders[name].write(image_id, _check_map(
            maps[name], hw, image_id, f'{job.desc} ({name})'))
      counts.update(state['counts'][slot])
      written += 1

  def collect(result: tuple[Any, dict[str, int]]) -> None:
    batch_no, slot = order.popleft()
    state = pending[batch_no]
    state['values'][slot], state['counts'][slot] = result
    state['remaining'] -= 1
    if state['remaining'] == 0:
      finish(batch_no)

  host_fn = functools.partial(
      _host_call, fn=job.host_fn,
      is_map=job.label_maps is None and job.second_pass is None)
  with pool_lib.HostPool(host_fn, workers, max_in_flight=max_in_flight,
                         desc=job.desc, total=len(todo),
                         progress=progress) as pool:
    for batch_no, chunk in enumerate(batches):
      examples = [source[i] for i in chunk]
      batch, first = None, None
      if job.on_device:
        # Fixed batch shape: the last image repeats (its results dropped).
        batch = _collate(examples + [examples[-1]] * (batch_size - len(chunk)),
                         job.box_rows)
      if job.first_pass is not None:
        tick = time.perf_counter()
        first = jax.device_get(job.first_pass(batch))
        device_seconds += time.perf_counter() - tick
        for name in job.counted:
          counts[name] += int(np.sum(np.asarray(first[name])[:len(chunk)]))
      pending[batch_no] = dict(
          indices=chunk, batch=batch, values=[None] * len(chunk),
          counts=[{}] * len(chunk), remaining=len(chunk),
          hw=[np.shape(e[schema.IMAGE])[:2] for e in examples])
      for slot, example in enumerate(examples):
        item = dict(example)
        if first is not None:
          clash = set(first) & set(item)
          if clash:
            raise ValueError(f'{job.desc}: first-pass outputs {sorted(clash)} '
                             'clash with example keys.')
          item.update(_slice(first, slot))
        order.append((batch_no, slot))
        for result in pool.submit(item):
          collect(result)
    for result in pool.drain():
      collect(result)
  seconds = time.perf_counter() - start
  clash = set(counts) & set(RUN_KEYS)
  if clash:
    raise ValueError(f'{job.desc}: counts {sorted(clash)} clash with the '
                     'run counts.')
  return {'total': len(image_ids), 'written': written,
          'skipped': len(image_ids) - len(todo), 'seconds': seconds,
          'device_seconds': device_seconds,
          'images_per_second': written / seconds if written else None,
          'host_workers': workers, **dict(counts)}


def generate_label_folder(source: Iterable[Mapping[str, Any]],
                          folder: LabelFolder, fn: LabelFn, workers: int = 0,
                          *, max_in_flight: int | None = None,
                          progress: bool = True, desc: str = 'labels',
                          image_ids: Sequence[str] | None = None
                          ) -> dict[str, int]:
  """A host-only job: writes `fn(example)` for every example into `folder`.

  Args:
    source: decoded examples in the schema layout (at least 'image' and
      'image_id', plus whatever `fn` reads), e.g. `Dataset.source(split)`.
    folder: destination `LabelFolder`.
    fn: a picklable label function `fn(example) -> label_map` or
      `-> (label_map, counts)`, label_map uint8 (H, W) of the image's size and
      counts {name: int}; e.g. `grabcut.box_fill_example` or
      `functools.partial(grabcut.grabcut_example, iterations=5)`.
    workers: worker processes; 0 = inline.
    max_in_flight: bound on outstanding examples (default 2 per worker).
    progress: show a progress bar.
    desc: progress-bar label.
    image_ids: the ids of `source` in order (e.g. `Dataset.index(split)
      .image_ids`); when given, existing files are skipped without decoding
      their examples (otherwise every example is decoded once to read its
      id, and again if its map is missing).

  Returns:
    {'total', 'written', 'skipped_existing'} plus the sum over the written
    examples of every count the label function reported (e.g. 'boxes',
    'fallbacks').

  Raises:
    pool.WorkerError: `fn` failed or returned a wrong label map (the message
      names the item index and the image id).
  """
  if not (hasattr(source, '__len__') and hasattr(source, '__getitem__')):
    source = list(source)
  if image_ids is None:
    image_ids = [str(source[i][schema.IMAGE_ID]) for i in range(len(source))]
  name = 'labels'
  counts = run(LabelJob(outputs=(name,), host_fn=fn, desc=desc), source,
               image_ids, {name: folder}, workers=workers,
               max_in_flight=max_in_flight, progress=progress)
  extra = {key: value for key, value in counts.items()
           if key not in RUN_KEYS}
  return {'total': counts['total'], 'written': counts['written'],
          'skipped_existing': counts['skipped'], **extra}
