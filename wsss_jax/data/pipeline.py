"""Input pipelines: grain over tfds data sources, numpy augmentation.

    source = with_label_folders(dataset.source('train'), {'pseudo': folder})
    loader = train_loader(source, transform, batch_size=16, seed=0)
    for batch in iter(loader): ...        # fixed-shape numpy batches

The train iterator is infinite, shuffled per epoch from the seed, and
checkpointable (its state is saved with the train state).  Evaluation batches
are padded to the batch size so every step has one shape.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Iterator, Mapping

from absl import flags
import grain
import jax
import numpy as np

from wsss_jax.data import schema
from wsss_jax.data.label_png import LabelFolder
from wsss_jax.data.transforms import EvalTransform, TrainTransform

__all__ = ['EvalTransform', 'TrainTransform', 'LabelJoinedSource',
           'with_label_folders', 'MemoryCache', 'cached', 'train_loader',
           'eval_batches', 'Subset']


class LabelJoinedSource:
  """A source whose examples gain label maps read from PNG folders.

  Pseudo-label stages write `<folder>/<image_id>.png`; this joins them by
  image id at load time (the tfds dataset is never rebuilt per round).
  """

  def __init__(self, source, folders: Mapping[str, str]):
    self._source = source
    self._folders = {key: LabelFolder(path) for key, path in folders.items()}

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> dict[str, Any]:
    example = self._source[index]
    height, width = example[schema.IMAGE].shape[:2]
    for key, folder in self._folders.items():
      example[key] = folder.read(example[schema.IMAGE_ID],
                                 expected_hw=(height, width))
    return example

  def __repr__(self) -> str:
    # grain compares repr(source) when restoring an iterator: keep it stable.
    # Only the folder's last two path components: the same run resumed
    # through another spelling of its workdir must match.
    folders = ', '.join(
        f"{k}={os.path.join(*os.path.normpath(f.root).split(os.sep)[-2:])}"
        for k, f in sorted(self._folders.items()))
    return f'LabelJoinedSource({self._source!r}, {folders})'


def with_label_folders(source, folders: Mapping[str, str],
                       image_ids=None):
  """Joins label folders onto `source`, first checking none is incomplete.

  Args:
    source: a random-access source of schema examples.
    folders: {batch key: folder of <image_id>.png}.
    image_ids: the ids the source will yield (e.g. `Dataset.index(split)
      .image_ids`); when given, every folder must hold all of them, and a
      missing one raises an error listing a few.
  """
  if image_ids is not None:
    for folder in folders.values():
      LabelFolder(folder).check_complete(list(image_ids))
  return LabelJoinedSource(source, folders) if folders else source


class MemoryCache:
  """A source that keeps decoded records in memory, up to `max_bytes`.

  Decoding dominates the loader's CPU time on small images (tfds
  deserialisation and PNG decoding: 0.8 of 1.2 ms per record of the
  embedded benchmark), and on a 2-core machine that time is taken from the
  train step.  Records are kept, in the order first read, until their arrays
  reach `max_bytes`; later ones are read each time.  Cached arrays are made
  read-only, so a transform writing into its input fails at once instead of
  corrupting later epochs; each call returns a new dict.  Each grain worker
  process holds its own cache (pickling drops the records).  The cache is
  transparent: the same records in the same order, and `repr` is the
  wrapped source's, which grain compares when it restores an iterator.
  """

  def __init__(self, source, max_bytes: int):
    self._source = source
    self._max_bytes = int(max_bytes)
    self._records: dict[int, dict[str, Any]] = {}
    self._bytes = 0

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> dict[str, Any]:
    record = self._records.get(index)
    if record is None:
      record = self._source[index]
      arrays = [v for v in record.values() if isinstance(v, np.ndarray)]
      size = sum(a.nbytes for a in arrays)
      if self._bytes + size <= self._max_bytes:
        for array in arrays:
          array.flags.writeable = False
        self._records[index] = record
        self._bytes += size
    return dict(record)

  def __getstate__(self) -> dict[str, Any]:
    return {'_source': self._source, '_max_bytes': self._max_bytes,
            '_records': {}, '_bytes': 0}

  def __repr__(self) -> str:
    return repr(self._source)


def cached(source, max_megabytes: float):
  """`source` behind a `MemoryCache` of `max_megabytes` (0: no cache)."""
  if max_megabytes <= 0:
    return source
  return MemoryCache(source, int(max_megabytes * 2**20))


class Subset:
  """The first `size` records of a source (periodic evaluation subsets)."""

  def __init__(self, source, size: int):
    self._source = source
    self._size = min(int(size), len(source)) if size else len(source)

  def __len__(self) -> int:
    return self._size

  def __getitem__(self, index: int):
    if not 0 <= index < self._size:
      raise IndexError(index)
    return self._source[index]

  def __repr__(self) -> str:
    return f'Subset({self._source!r}, {self._size})'


def _grain_workers(worker_count: int) -> int:
  """`worker_count`, after making grain's worker processes startable here.

  grain reads absl flags when it starts workers; outside an absl app (a
  notebook, pytest) they are unparsed and grain raises, so they are marked
  parsed (their defaults).
  """
  if worker_count > 0 and not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
  return int(worker_count)


def train_loader(source, transform: TrainTransform, batch_size: int,
                 seed: int, worker_count: int = 0) -> grain.DataLoader:
  """An infinite, shuffled, checkpointable loader of augmented batches.

  `batch_size` is global; each process loads its share of every batch.
  """
  per_process = batch_size // jax.process_count()
  sampler = grain.samplers.IndexSampler(
      num_records=len(source),
      shard_options=grain.sharding.ShardByJaxProcess(drop_remainder=True),
      shuffle=True, num_epochs=None, seed=int(seed))
  return grain.DataLoader(
      data_source=source, sampler=sampler,
      operations=[transform,
                  grain.transforms.Batch(per_process, drop_remainder=True)],
      worker_count=_grain_workers(worker_count))


@dataclasses.dataclass
class EvalBatch:
  """One padded evaluation batch: `count` real examples, then padding."""
  data: dict[str, np.ndarray]
  count: int


def eval_batches(source, transform: EvalTransform, batch_size: int,
                 worker_count: int = 0) -> Iterator[EvalBatch]:
  """This process's share of `source`, in order, in fixed-size batches.

  Records are split into contiguous, nearly equal parts per process (no
  record is dropped: grain's own sharding drops `n mod processes` of them),
  and every process yields the same number of batches, so the sharded
  predict call lines up across processes.  Short batches are padded by
  repeating a real example; `count` says how many are real (0 for a batch
  that is all padding).
  """
  per_process = batch_size // jax.process_count()
  parts = np.array_split(np.arange(len(source)), jax.process_count())
  mine = IndexSubset(source, parts[jax.process_index()])
  num_batches = -(-max(len(p) for p in parts) // per_process)
  loader = grain.DataLoader(
      data_source=mine,
      sampler=grain.samplers.IndexSampler(
          num_records=len(mine), shard_options=grain.sharding.NoSharding(),
          shuffle=False, num_epochs=1, seed=0),
      operations=[transform,
                  grain.transforms.Batch(per_process, drop_remainder=False)],
      worker_count=_grain_workers(worker_count)) if len(mine) else []
  last = None
  produced = 0
  for batch in loader:
    count = len(batch[schema.IMAGE_ID])
    if count < per_process:
      batch = {key: np.concatenate(
          [value, np.repeat(value[-1:], per_process - count, axis=0)])
               for key, value in batch.items()}
    last = batch
    produced += 1
    yield EvalBatch(batch, count)
  while produced < num_batches:
    if last is None:   # this process has no record: borrow the first one
      last = transform.map(source[0])
      last = {key: np.stack([np.asarray(value)] * per_process)
              for key, value in last.items()}
    produced += 1
    yield EvalBatch(last, 0)


class IndexSubset:
  """The records of `source` at the given indices, in that order."""

  def __init__(self, source, indices):
    self._source = source
    self._indices = np.asarray(indices, np.int64)

  def __len__(self) -> int:
    return len(self._indices)

  def __getitem__(self, index: int):
    return self._source[int(self._indices[index])]

  def __repr__(self) -> str:
    span = (f'{self._indices[0]}..{self._indices[-1]}' if len(self._indices)
            else 'empty')
    return f'IndexSubset({self._source!r}, {span})'
