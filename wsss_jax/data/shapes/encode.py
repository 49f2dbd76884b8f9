"""Render and PNG-encode benchmark examples, in worker processes if asked.

Kept apart from `builder` (which imports tensorflow-datasets) so that a
'spawn' worker imports only numpy, PIL and `render` (~0.1 s instead of
seconds).  Preparing the 2,300-example default split is ~6 ms per example,
nearly all of it here, so the builder spreads index ranges over the host's
cores; results come back in index order and are byte-identical to an inline
run (each example has its own `render.example_rng`).
"""

from __future__ import annotations

import dataclasses
import io
import os
from typing import Any, Iterator

import numpy as np
from PIL import Image

from wsss_jax.data import schema
from wsss_jax.data.shapes import render
from wsss_jax.host import pool

# Below this many examples a pool's start-up (~0.5 s) costs more than it saves.
MIN_EXAMPLES_FOR_WORKERS = 400
_CHUNK = 50                  # examples per pool item (amortises pickling)


@dataclasses.dataclass(frozen=True)
class RenderSettings:
  """What `render.render_example` needs of a builder config (picklable
  without importing tensorflow-datasets)."""
  image_size: int
  num_classes: int
  min_objects: int
  max_objects: int
  seed: int
  family: str

  @classmethod
  def of(cls, config: Any) -> RenderSettings:
    """The settings of a `builder.ShapesConfig` (or anything with its
    fields)."""
    return cls(**{field.name: getattr(config, field.name)
                  for field in dataclasses.fields(cls)})


def render_indexed(settings: RenderSettings, split: str,
                   index: int) -> dict[str, Any]:
  """Decoded example `index` of `split` (schema layout, image_id included)."""
  rng = render.example_rng(settings.seed, settings.family, split, index)
  example = render.render_example(
      rng, settings.image_size, settings.num_classes, settings.min_objects,
      settings.max_objects, settings.family)
  example[schema.IMAGE_ID] = render.image_id(settings.family, split, index)
  return example


def encode_example(settings: RenderSettings, split: str,
                   index: int) -> dict[str, Any]:
  """The tfds feature dict of one example (PNG bytes for image and mask)."""
  example = render_indexed(settings, split, index)
  example[schema.IMAGE] = png_bytes(example[schema.IMAGE])
  example[schema.MASK] = png_bytes(example[schema.MASK])
  return example


def _encode_range(task: tuple[RenderSettings, str, int, int]
                  ) -> list[dict[str, Any]]:
  settings, split, start, stop = task
  return [encode_example(settings, split, i) for i in range(start, stop)]


def default_workers(count: int) -> int:
  """Worker processes for preparing `count` examples: every core, or none
  (inline) for small splits."""
  if count < MIN_EXAMPLES_FOR_WORKERS:
    return 0
  return max(1, min(os.cpu_count() or 1, count // _CHUNK))


def encode_split(settings: RenderSettings, split: str, count: int,
                 workers: int | None = None) -> Iterator[dict[str, Any]]:
  """Yields `encode_example(settings, split, i)` for i in 0..count-1, in
  order; `workers` processes (default `default_workers(count)`, 0 inline)."""
  if workers is None:
    workers = default_workers(count)
  if not workers:
    for index in range(count):
      yield encode_example(settings, split, index)
    return
  tasks = [(settings, split, start, min(start + _CHUNK, count))
           for start in range(0, count, _CHUNK)]
  for examples in pool.pool_map(_encode_range, tasks, workers,
                                desc=f'render {split}', progress=False):
    yield from examples


def png_bytes(array: np.ndarray) -> bytes:
  """PNG of a uint8 (H, W, 3) RGB or (H, W) mode-'L' array.

  Encoded here rather than by tfds (which would get a PIL image) only to set
  zlib level 1: PIL's default level 6 costs +3 ms per example at 128 px
  (about +55 % preparation time) for files only ~14 % smaller.  uint8 (H, W)
  gives mode 'L', never a palette PNG (palettes decode as colours under
  OpenCV, docs/implementation_notes.md, "Label images").
  """
  image = Image.fromarray(array)
  if image.mode not in ('RGB', 'L'):
    raise ValueError(f'Expected an RGB or L image, got mode {image.mode!r}.')
  buffer = io.BytesIO()
  image.save(buffer, format='png', compress_level=1)
  return buffer.getvalue()
