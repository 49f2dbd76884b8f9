"""tfds builder of the embedded "shapes" benchmark (generated, no download).

`wsss_jax.data.registry` calls `make_builder(data_config, data_dir)` and, when
the builder is not prepared yet, `prepare(builder)`.  Every generator setting
is part of the config name (e.g. `main_s128_k6_n2000-300_o1-4_seed0`), so
different settings never share a cache directory.  Bump `WsssShapes.VERSION`
whenever `render.py` changes its output.

Records are written in index order (`disable_shuffling=True`): record i of a
split is `render.render_example(render.example_rng(seed, family, split, i),
...)`, so any example can be regenerated alone.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import time
from typing import Any, Iterator

from absl import logging as absl_logging
import numpy as np
import tensorflow_datasets as tfds
from tensorflow_datasets.core import example_serializer

from wsss_jax.data import schema
from wsss_jax.data.shapes import encode
from wsss_jax.data.shapes import render

# config.data.name -> render family.
FAMILY_OF_DATASET = {'shapes': 'main', 'shapes_aux': 'aux',
                     'shapes_hard': 'hard', 'shapes_pretrain': 'pretrain'}


@dataclasses.dataclass(eq=False)
class ShapesConfig(tfds.core.BuilderConfig):
  """Generator settings; build with `shapes_config` (it sets the name)."""
  image_size: int = 128
  num_classes: int = 6
  num_train: int = 2000
  num_val: int = 300
  min_objects: int = 1
  max_objects: int = 4
  seed: int = 0
  family: str = 'main'

  @property
  def split_sizes(self) -> dict[str, int]:
    return {'train': self.num_train, 'val': self.num_val}


def shapes_config(*, image_size: int = 128, num_classes: int = 6,
                  num_train: int = 2000, num_val: int = 300,
                  min_objects: int = 1, max_objects: int = 4, seed: int = 0,
                  family: str = 'main') -> ShapesConfig:
  """A validated `ShapesConfig` whose name encodes every setting."""
  values = dict(image_size=image_size, num_classes=num_classes,
                num_train=num_train, num_val=num_val, min_objects=min_objects,
                max_objects=max_objects, seed=seed)
  for field, value in values.items():
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
      raise ValueError(f'shapes.{field}={value!r}: expected an integer.')
  v = {field: int(value) for field, value in values.items()}
  render.check_params(v['image_size'], v['num_classes'], v['min_objects'],
                      v['max_objects'], family)
  for field in ('num_train', 'num_val'):
    if v[field] < 1:
      raise ValueError(f'shapes.{field}={v[field]}: expected an integer >= 1.')
  if v['seed'] < 0:
    raise ValueError(f'shapes.seed={v["seed"]}: expected an integer >= 0.')
  name = (f'{family}_s{v["image_size"]}_k{v["num_classes"]}'
          f'_n{v["num_train"]}-{v["num_val"]}'
          f'_o{v["min_objects"]}-{v["max_objects"]}_seed{v["seed"]}')
  return ShapesConfig(
      name=name,
      description=(f'Synthetic {family!r} shapes: {v["num_classes"]} classes, '
                   f'{v["image_size"]} px, {v["min_objects"]}-'
                   f'{v["max_objects"]} objects per image.'),
      family=family, **v)


class WsssShapes(tfds.core.GeneratorBasedBuilder):
  """Synthetic WSSS benchmark: shapes with masks, boxes and image labels."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.'}
  BUILDER_CONFIGS = [shapes_config(family=family)
                     for family in render.FAMILIES]

  def __init__(self, *, config: ShapesConfig | str | None = None, **kwargs):
    # tfds insists that a config named like a registered one *is* that
    # object; unpickling a builder (grain worker processes) brings a copy.
    if isinstance(config, ShapesConfig):
      registered = {c.name: c for c in self.BUILDER_CONFIGS}
      config = registered.get(config.name, config)
    super().__init__(config=config, **kwargs)

  def is_prepared(self) -> bool:
    # tfds logs a warning for a missing variant folder; a cold cache is normal.
    return os.path.isdir(self.data_dir) and super().is_prepared()

  def _info(self) -> tfds.core.DatasetInfo:
    config = self.builder_config
    names = render.class_names(config.family, config.num_classes)
    return self.dataset_info_from_configs(
        description=__doc__,
        features=tfds.features.FeaturesDict({
            schema.IMAGE: tfds.features.Image(shape=(None, None, 3),
                                              encoding_format='png'),
            schema.MASK: tfds.features.Image(shape=(None, None, 1),
                                             encoding_format='png'),
            schema.BOXES: tfds.features.Tensor(shape=(None, 4),
                                               dtype=np.int32),
            schema.BOX_LABELS: tfds.features.Tensor(shape=(None,),
                                                    dtype=np.int32),
            schema.IMAGE_LABELS: tfds.features.Tensor(
                shape=(config.num_classes,), dtype=np.bool_),
            schema.IMAGE_ID: tfds.features.Text(),
        }),
        metadata=tfds.core.MetadataDict(class_names=list(names), skipped=[]),
        disable_shuffling=True,
    )

  def _split_generators(self, dl_manager) -> dict[str, Iterator]:
    del dl_manager  # Nothing to download.
    return {split: self._generate_examples(split, count)
            for split, count in self.builder_config.split_sizes.items()}

  def _generate_examples(self, split: str,
                         count: int) -> Iterator[tuple[int, dict[str, Any]]]:
    settings = encode.RenderSettings.of(self.builder_config)
    yield from enumerate(encode.encode_split(settings, split, count))


def make_builder(data_config, data_dir: str) -> WsssShapes:
  """The builder of `config.data` (a name of `FAMILY_OF_DATASET`)."""
  if data_config.name not in FAMILY_OF_DATASET:
    raise ValueError(f'config.data.name={data_config.name!r} is not a shapes '
                     f'dataset; expected one of {sorted(FAMILY_OF_DATASET)}.')
  params = data_config.shapes
  config = shapes_config(
      image_size=params.image_size, num_classes=params.num_classes,
      num_train=params.num_train, num_val=params.num_val,
      min_objects=params.min_objects, max_objects=params.max_objects,
      seed=params.seed, family=FAMILY_OF_DATASET[data_config.name])
  with _quiet():
    return WsssShapes(config=config, data_dir=data_dir,
                      file_format='array_record')


def prepare(builder: WsssShapes) -> None:
  """Generates and writes both splits; prints one line with count and time."""
  start = time.perf_counter()
  # tfds prints two banner lines to stdout; this function prints one instead.
  with _quiet(), contextlib.redirect_stdout(io.StringIO()), \
      _deterministic_serialization():
    builder.download_and_prepare()
  seconds = time.perf_counter() - start
  count = sum(builder.builder_config.split_sizes.values())
  print(f'Prepared {builder.name}/{builder.builder_config.name}: {count} '
        f'examples in {seconds:.1f} s ({builder.data_dir})', flush=True)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
  """No tfds progress bars and no tfds info logging inside the block."""
  tqdm_utils = tfds.core.utils.tqdm_utils
  was_active = getattr(tqdm_utils, '_active', True)
  verbosity = absl_logging.get_verbosity()
  tfds.display_progress_bar(False)
  absl_logging.set_verbosity(absl_logging.ERROR)
  try:
    yield
  finally:
    tfds.display_progress_bar(was_active)
    absl_logging.set_verbosity(verbosity)


@contextlib.contextmanager
def _deterministic_serialization() -> Iterator[None]:
  """Serializes tf.Example protos deterministically inside the block.

  `tf.train.Features` is a protobuf map whose default serialization order
  follows the process's string-hash seed, so the same examples gave different
  record bytes in every run.  Deterministic serialization sorts the keys and
  makes the written files byte-identical for a given seed.
  """
  serializer_cls = example_serializer.ExampleSerializer
  original = serializer_cls.serialize_example
  if not hasattr(serializer_cls, 'get_tf_example'):   # Another tfds layout.
    yield
    return

  def serialize_example(self, example):
    return self.get_tf_example(example).SerializeToString(deterministic=True)

  serializer_cls.serialize_example = serialize_example
  try:
    yield
  finally:
    serializer_cls.serialize_example = original
