"""A finished run's network on a folder of images (`python -m wsss_jax.predict`).

The run's config is read back from its workdir and the network of its
evaluation stage (or of a named training stage) loaded; `config.eval`
settings (scales, flip, fusion, sliding window, CRF) may be overridden.  Images of any size
are padded (bottom/right) to square buckets whose side is a multiple of
`bucket_multiple`, so the predictor compiles once per bucket, and batched to
`eval.batch_size`; the CRF and PNG writing run on the host while the device
computes the next batch, as in evaluation.

Files that cannot be used are skipped and counted, never fatal: a file with
an image extension PIL cannot read, and an image of a mode with no single
RGB reading (16-bit, float).  The data the run trained on is not needed.
"""

from __future__ import annotations

import collections
import functools
import json
import logging
import math
import os
import time
from typing import Any, Iterator, Sequence

import jax
import numpy as np
from PIL import Image

from wsss_jax import progress as progress_lib
from wsss_jax import config_checks, config_io, methods, runtime, segmentation
from wsss_jax.atomic import write_json_atomic
from wsss_jax.data import label_png, registry, schema, transforms
from wsss_jax.evaluation import inference
from wsss_jax.crf import backend as crf_backend_lib
from wsss_jax.host import crf as crf_lib
from wsss_jax.host.pool import HostPool
from wsss_jax.stages import MethodPipeline, Network
from wsss_jax.training import mesh as mesh_lib

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.gif', '.ppm',
                    '.tif', '.tiff', '.webp')
# Modes with one obvious RGB reading (alpha dropped, grey replicated, palette
# looked up); 16-bit and float images need a choice of scaling we will not
# guess, so they are skipped with that reason.
RGB_CONVERTIBLE_MODES = ('RGB', 'RGBA', 'RGBX', 'L', 'LA', 'P', 'PA', '1',
                         'CMYK', 'YCbCr')
SUMMARY_FILE = 'predictions.json'
OVERLAY_DIR = 'overlays'


class PredictionError(RuntimeError):
  """The run or the folder cannot be predicted (the message says why)."""


class SkippedImage(Exception):
  """One file is skipped; the message is the reason."""


# ----------------------------------------------------------------------------
# The folder
# ----------------------------------------------------------------------------
def list_images(folder: str) -> list[str]:
  """The image files directly in `folder` (by extension), sorted."""
  if not os.path.isdir(folder):
    raise PredictionError(f'--images={folder!r} is not a folder.')
  files = sorted(name for name in os.listdir(folder)
                 if name.lower().endswith(IMAGE_EXTENSIONS)
                 and os.path.isfile(os.path.join(folder, name)))
  if not files:
    raise PredictionError(f'{folder!r} holds no image file (extensions '
                          f'{", ".join(IMAGE_EXTENSIONS)}).')
  return files


def output_names(files: Sequence[str]) -> dict[str, str]:
  """{file: output stem}: the file's stem, or, where two files share one
  ('a.jpg', 'a.png'), the name with its dot replaced ('a_jpg', 'a_png')."""
  stems = collections.Counter(os.path.splitext(f)[0] for f in files)
  return {f: (os.path.splitext(f)[0] if stems[os.path.splitext(f)[0]] == 1
              else f.replace('.', '_')) for f in files}


def image_size(path: str) -> tuple[int, int]:
  """(height, width) from the header; raises SkippedImage on a file that is
  not a readable image or whose mode has no RGB reading."""
  try:
    with Image.open(path) as image:
      mode, (width, height) = image.mode, image.size
  except (OSError, ValueError, Image.DecompressionBombError) as error:
    raise SkippedImage(f'unreadable ({type(error).__name__}: {error})'
                       ) from error
  if mode not in RGB_CONVERTIBLE_MODES:
    raise SkippedImage(f'unsupported mode {mode!r} (expected one of '
                       f'{", ".join(RGB_CONVERTIBLE_MODES)})')
  return height, width


def read_rgb(path: str) -> np.ndarray:
  """uint8 (H, W, 3); raises SkippedImage if the pixels cannot be decoded."""
  try:
    with Image.open(path) as image:
      image.load()
      return np.asarray(image.convert('RGB'), np.uint8)
  except (OSError, ValueError) as error:
    raise SkippedImage(f'unreadable ({type(error).__name__}: {error})'
                       ) from error


def bucket_side(height: int, width: int, multiple: int) -> int:
  """The side of the square bucket an image of this size is padded to."""
  return int(math.ceil(max(height, width) / multiple) * multiple)


# ----------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------
def select_network(pipeline: MethodPipeline, stage: str | None) -> Network:
  """The network of the evaluation stage, or of the named stage."""
  networks = {s.name: s.network for s in pipeline.stages
              if s.network is not None and s.name != pipeline.eval_stage}
  if stage is None:
    for candidate in pipeline.stages:
      if candidate.name == pipeline.eval_stage and candidate.network:
        return candidate.network
    stage = pipeline.train_stages[-1]
  if stage not in networks:
    raise PredictionError(f'--stage={stage!r} trains no network in this run; '
                          f'choose one of {sorted(networks)}.')
  return networks[stage]


def _dataset(workdir: str, config) -> Any:
  """The run's classes: from results.json, else from the prepared data."""
  path = os.path.join(workdir, 'results.json')
  if os.path.exists(path):
    with open(path) as f:
      dataset = json.load(f).get('dataset', {})
    if dataset.get('class_names'):
      return registry.KnownClasses(dataset['name'], dataset['class_names'])
  try:
    return registry.open_dataset(config.data, prepare=False)
  except registry.DatasetError as error:
    raise PredictionError(
        f'{workdir!r} has no results.json naming its classes and its dataset '
        f'cannot be opened here: {error}') from error


def load_run(workdir: str, stage: str | None = None,
             overrides: Sequence[str] = ()):
  """(runtime, network, variables) of a finished run's network, with the
  `eval.*` overrides applied to its config."""
  config = config_io.load_run_config(workdir)
  for override in overrides:
    config_io.apply_override(config, override, allowed_prefixes=('eval',))
  config_checks.validate(config)
  rt = runtime.make_runtime(config, dataset=_dataset(workdir, config))
  network = select_network(methods.build_pipeline(config.method, rt), stage)
  model_file = os.path.join(workdir, network.stage, segmentation.MODEL_FILE)
  if not os.path.exists(model_file):
    raise PredictionError(
        f'{model_file} does not exist: stage {network.stage!r} of this run has '
        'not finished (rerun `python -m wsss_jax.main` with this workdir to '
        'complete it).')
  model, variables = segmentation.load_trained(network.runtime, model_file,
                                               network.model)
  return rt, Network(network.stage, network.runtime, model), variables


# ----------------------------------------------------------------------------
# Prediction
# ----------------------------------------------------------------------------
def _batches(folder: str, files: Sequence[str], sides: dict[str, int],
             batch_size: int, skipped: dict[str, str]
             ) -> Iterator[tuple[int, list[tuple[str, np.ndarray]]]]:
  """(bucket side, [(file, image)]) of at most `batch_size` images, bucket
  by bucket; files that fail to decode go to `skipped`."""
  for side in sorted(set(sides.values())):
    batch = []
    for name in (f for f in files if sides.get(f) == side):
      try:
        batch.append((name, read_rgb(os.path.join(folder, name))))
      except SkippedImage as reason:
        skipped[name] = str(reason)
        continue
      if len(batch) == batch_size:
        yield side, batch
        batch = []
    if batch:
      yield side, batch


def _labels_item(item):
  """Host step without CRF: the labels as they came (module level for
  pickling)."""
  return item[1]


def predict_folder(workdir: str, images: str, out: str, *,
                   stage: str | None = None, overrides: Sequence[str] = (),
                   overlays: bool = False, bucket_multiple: int = 128,
                   progress: bool | None = None) -> dict[str, Any]:
  """Labels every image of `images` with the run's network.

  Writes `<out>/<stem>.png` (VOC palette, the image's size), with
  `overlays` also `<out>/overlays/<stem>.jpg`, and `<out>/predictions.json`
  (the summary returned: counts, skipped files with reasons, buckets,
  protocol).  `progress=None` shows the bar only on a terminal.
  """
  start = time.time()
  if bucket_multiple < 8:
    raise PredictionError(f'bucket_multiple must be >= 8, got '
                          f'{bucket_multiple}.')
  config_io.load_run_config(workdir)        # a missing run fails first
  files = list_images(images)
  rt, network, variables = load_run(workdir, stage, overrides)
  eval_config = rt.config.eval
  batch_size = int(eval_config.batch_size)
  mesh_lib.check_batch_size(batch_size, rt.mesh, 'eval.batch_size')
  crf_params = (crf_lib.CrfParams.from_config(eval_config.crf_params)
                if eval_config.crf else None)
  predict = inference.make_predictor(
      network.model, rt.normalization, scales=tuple(eval_config.scales),
      flip=bool(eval_config.flip), fusion=eval_config.fusion,
      align_corners=bool(eval_config.align_corners),
      compute_dtype=rt.compute_dtype,
      output='probs' if crf_params else 'labels', mesh=rt.mesh,
      **inference.window_config(eval_config))
  variables = jax.device_put(variables, mesh_lib.replicated(rt.mesh))

  skipped: dict[str, str] = {}
  sides = {}
  for name in files:
    try:
      height, width = image_size(os.path.join(images, name))
      sides[name] = bucket_side(height, width, bucket_multiple)
    except SkippedImage as reason:
      skipped[name] = str(reason)
  names = output_names(files)
  os.makedirs(out, exist_ok=True)
  if overlays:
    os.makedirs(os.path.join(out, OVERLAY_DIR), exist_ok=True)
  pending: collections.deque[tuple[str, np.ndarray]] = collections.deque()
  written = 0

  def write(labels: np.ndarray) -> None:
    nonlocal written
    name, image = pending.popleft()
    label_png.write_label_png(os.path.join(out, f'{names[name]}.png'), labels)
    if overlays:
      Image.fromarray(label_png.overlay(image, labels)).save(
          os.path.join(out, OVERLAY_DIR, f'{names[name]}.jpg'), quality=90)
    written += 1
    bar.update(1)

  def finish(batch, outputs):
    outputs = np.asarray(outputs)
    for i, (name, image) in enumerate(batch):
      height, width = image.shape[:2]
      pending.append((name, image))
      if crf_params:
        item = (np.ascontiguousarray(image), np.ascontiguousarray(
            np.moveaxis(outputs[i, :height, :width], -1, 0)))
      else:
        item = (None, outputs[i, :height, :width])
      for labels in pool.submit(item):
        write(labels)

  crf_backend = rt.config.crf.backend
  host_fn = (functools.partial(crf_lib.crf_item, params=crf_params,
                               argmax=True, backend=crf_backend)
             if crf_params else _labels_item)
  workers = (crf_backend_lib.host_workers(crf_backend,
                                          eval_config.crf_workers)
             if crf_params else 0)
  bar = progress_lib.bar(total=len(sides), desc='predict',
                         show=True if progress is None else progress)
  with HostPool(host_fn, workers, desc='predict host',
                progress=False) as pool:
    in_flight = None
    for side, batch in _batches(images, files, sides, batch_size, skipped):
      padded = transforms.pad_image_batch([image for _, image in batch], side,
                                          batch_size, rt.pad_color)
      outputs = predict(variables, mesh_lib.device_batch(
          {schema.IMAGE: padded}, rt.mesh)[schema.IMAGE])    # async dispatch
      if in_flight is not None:
        finish(*in_flight)
      in_flight = (batch, outputs)
    if in_flight is not None:
      finish(*in_flight)
    for labels in pool.drain():
      write(labels)
  bar.close()
  buckets = collections.Counter(sides[f] for f in files
                                if f in sides and f not in skipped)
  summary = {
      'workdir': os.path.abspath(workdir), 'stage': network.stage,
      'images': os.path.abspath(images), 'found': len(files),
      'written': written, 'skipped': [{'file': f, 'reason': r}
                                      for f, r in sorted(skipped.items())],
      'buckets': {str(side): count for side, count in sorted(buckets.items())},
      'protocol': {'scales': list(eval_config.scales),
                   'flip': bool(eval_config.flip),
                   'fusion': eval_config.fusion,
                   **inference.describe_window(eval_config),
                   'crf': bool(eval_config.crf), 'batch_size': batch_size},
      'overrides': list(overrides), 'wall_s': round(time.time() - start, 2)}
  write_json_atomic(os.path.join(out, SUMMARY_FILE), summary)
  for name, reason in sorted(skipped.items()):
    log.warning('Skipped %s: %s', os.path.join(images, name), reason)
  log.info('Predicted %d of %d images with %s/%s in %.1f s (%d bucket(s): '
           '%s); %d skipped. Labels in %s', written, len(files), workdir,
           network.stage, summary['wall_s'], len(buckets),
           ', '.join(f'{s}px x {n}' for s, n in sorted(buckets.items())),
           len(skipped), out)
  return summary
