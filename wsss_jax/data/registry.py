"""Opens a configured dataset: prepares it if needed, returns its splits.

Every dataset package (`shapes`, `voc`, `coco`) provides a tfds builder through
`make_builder(data_config, data_dir)`; this module is the only place that knows
them.  Methods and pipelines only see `Dataset`.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import json
import logging
import os
from typing import Any

import numpy as np

from wsss_jax.atomic import write_json_atomic
from wsss_jax.data import schema
from wsss_jax.training import mesh as mesh_lib

log = logging.getLogger(__name__)

# config.data.name -> module providing `make_builder` and `prepare`.
_BUILDER_MODULES = {
    'shapes': 'wsss_jax.data.shapes.builder',
    'shapes_aux': 'wsss_jax.data.shapes.builder',
    'shapes_hard': 'wsss_jax.data.shapes.builder',
    'shapes_pretrain': 'wsss_jax.data.shapes.builder',
    'voc': 'wsss_jax.data.voc.builder',
    'coco': 'wsss_jax.data.coco.builder',
}


class DatasetError(RuntimeError):
  """A dataset is missing, unprepared or inconsistent (message says how to fix)."""


def default_data_dir() -> str:
  return os.environ.get('WSSS_JAX_DATA_DIR',
                        os.path.join(os.path.expanduser('~'), '.cache',
                                     'wsss_jax', 'datasets'))


@dataclasses.dataclass(frozen=True)
class SplitIndex:
  """Per-record metadata of a split, in data-source order (cheap to build)."""
  image_ids: tuple[str, ...]
  heights: np.ndarray
  widths: np.ndarray

  def __len__(self) -> int:
    return len(self.image_ids)


class DecodedSource:
  """Random-access source yielding decoded examples in the schema layout.

  With `decode_images=False` the JPEG/PNG image is not decoded and examples
  carry no 'image' (for passes that only need masks, boxes and ids).
  """

  def __init__(self, tfds_source, decode_images: bool = True):
    self._source = tfds_source
    self._decode_images = decode_images

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> dict[str, Any]:
    record = self._source[index]
    if not self._decode_images:
      record = dict(record)
      record.pop(schema.IMAGE)
    return to_schema(record)

  def __repr__(self) -> str:
    return f'DecodedSource({self._source!r})'


def to_schema(record: dict[str, Any]) -> dict[str, Any]:
  """Converts a tfds-decoded record to the schema of `wsss_jax.data.schema`."""
  image_id = record[schema.IMAGE_ID]
  if isinstance(image_id, bytes):
    image_id = image_id.decode('utf-8')
  mask = np.asarray(record[schema.MASK])
  if mask.ndim == 3:
    mask = mask[..., 0]
  example = {
      schema.MASK: mask.astype(np.uint8),
      schema.BOXES: np.asarray(record[schema.BOXES], np.int32).reshape(-1, 4),
      schema.BOX_LABELS: np.asarray(record[schema.BOX_LABELS],
                                    np.int32).reshape(-1),
      schema.IMAGE_LABELS: np.asarray(record[schema.IMAGE_LABELS], bool),
      schema.IMAGE_ID: str(image_id),
  }
  if schema.IMAGE in record:
    example[schema.IMAGE] = np.asarray(record[schema.IMAGE], np.uint8)
  return example


class Dataset:
  """A prepared dataset: class names, splits, per-split indexes."""

  def __init__(self, name: str, builder):
    self.name = name
    self.builder = builder
    metadata = dict(builder.info.metadata or {})
    self.class_names: tuple[str, ...] = tuple(metadata['class_names'])
    self.metadata = metadata

  @property
  def num_classes(self) -> int:
    """Number of label values 0..C-1 (background included)."""
    return len(self.class_names)

  @property
  def splits(self) -> tuple[str, ...]:
    return tuple(self.builder.info.splits.keys())

  @property
  def skipped(self) -> list[dict[str, str]]:
    """Raw files skipped at preparation time (corrupt, inconsistent), per split."""
    return list(self.metadata.get('skipped', []))

  def _check_split(self, split: str) -> None:
    if split not in self.splits:
      raise DatasetError(
          f'Dataset {self.name!r} has no split {split!r}; prepared splits: '
          f'{sorted(self.splits)} (in {self.builder.data_dir}).')
    if self.builder.info.splits[split].num_examples == 0:
      raise DatasetError(f'Split {split!r} of dataset {self.name!r} is empty.')

  def source(self, split: str, decode_images: bool = True) -> DecodedSource:
    """The split's examples; `decode_images=False` skips image decoding."""
    self._check_split(split)
    if decode_images:
      return DecodedSource(self.builder.as_data_source(split))
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    return DecodedSource(self.builder.as_data_source(
        split, decoders={schema.IMAGE: tfds.decode.SkipDecoding()}),
                         decode_images=False)

  @functools.lru_cache(maxsize=None)
  def index(self, split: str) -> SplitIndex:
    """Image ids and sizes without decoding pixels (cached next to the data)."""
    self._check_split(split)
    cache = os.path.join(self.builder.data_dir, f'index-{split}.json')
    if os.path.exists(cache):
      with open(cache) as f:
        data = json.load(f)
    else:
      data = self._build_index(split)
      write_json_atomic(cache, data)
    return SplitIndex(tuple(data['image_ids']),
                      np.asarray(data['heights'], np.int32),
                      np.asarray(data['widths'], np.int32))

  def _build_index(self, split: str) -> dict[str, list]:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    from PIL import Image  # pylint: disable=g-import-not-at-top
    import io  # pylint: disable=g-import-not-at-top
    source = self.builder.as_data_source(
        split, decoders={schema.IMAGE: tfds.decode.SkipDecoding(),
                         schema.MASK: tfds.decode.SkipDecoding()})
    ids, heights, widths = [], [], []
    for i in range(len(source)):
      record = source[i]
      image_id = record[schema.IMAGE_ID]
      ids.append(image_id.decode() if isinstance(image_id, bytes) else image_id)
      # PIL reads the size from the header without decoding pixels.
      width, height = Image.open(io.BytesIO(record[schema.IMAGE])).size
      heights.append(height)
      widths.append(width)
    return {'image_ids': ids, 'heights': heights, 'widths': widths}


class KnownClasses:
  """A dataset known only by its name and classes: what a finished run's
  network needs to label images outside any split (`wsss_jax.predict`), on
  a machine that may not hold the data.  Anything that would read the data
  fails with an explanation."""

  def __init__(self, name: str, class_names: tuple[str, ...]):
    self.name = name
    self.class_names = tuple(class_names)

  @property
  def num_classes(self) -> int:
    return len(self.class_names)

  def _no_data(self, *args, **kwargs):
    raise DatasetError(f'Dataset {self.name!r} is known here by its classes '
                       'only (prediction); its splits cannot be read.')

  source = index = _no_data
  splits = skipped = property(_no_data)


def open_dataset(data_config, prepare: bool = True) -> Dataset:
  """Opens (and, if allowed and needed, prepares) the dataset of `config.data`."""
  name = data_config.name
  if name not in _BUILDER_MODULES:
    raise DatasetError(f'config.data.name={name!r} is unknown; choose one of '
                       f'{sorted(_BUILDER_MODULES)}.')
  module = importlib.import_module(_BUILDER_MODULES[name])
  data_dir = data_config.get('data_dir') or default_data_dir()
  builder = module.make_builder(data_config, data_dir)
  if not builder.is_prepared():
    if not prepare:
      raise DatasetError(f'Dataset {name!r} is not prepared in {data_dir}.')
    if mesh_lib.is_primary():       # one writer; the others wait below
      log.info('Preparing dataset %r in %s', name, data_dir)
      module.prepare(builder)
    mesh_lib.barrier(f'prepare-{name}')
    if not mesh_lib.is_primary():
      builder = module.make_builder(data_config, data_dir)
  return Dataset(name, builder)
