"""What every stage of a run shares: config, datasets, mesh, conventions."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

from wsss_jax.data import registry
from wsss_jax.ops import image as image_ops
from wsss_jax.training import mesh as mesh_lib


@dataclasses.dataclass
class Runtime:
  """Built once per run by `wsss_jax.run` and handed to every stage.

  `dataset` is the run's target dataset (`config.data`); a method that also
  trains on another dataset (LPG's auxiliary classes) gets a runtime for it
  with `with_data`.

  `builtin_weights(runtime, 'builtin:NAME') -> (weight file, record)` makes
  (or finds in its cache) the weights a `model.init_weights='builtin:...'`
  names; `wsss_jax.run` plugs in `pretraining.builtin_weights`.
  """
  config: Any
  dataset: registry.Dataset
  mesh: jax.sharding.Mesh
  normalization: str
  compute_dtype: Any
  builtin_weights: Callable[..., tuple[str, dict]] | None = None

  def with_config(self, config) -> 'Runtime':
    """This runtime (same dataset and mesh) for stages that run with another
    config: a stage-1 network with its own model, steps and optimiser (and
    the input normalisation its model's weights expect)."""
    if config.data.name != self.dataset.name:
      raise ValueError(f'with_config: config.data.name={config.data.name!r} '
                       f'but the runtime holds {self.dataset.name!r}; use '
                       'with_data for another dataset.')
    return dataclasses.replace(
        self, config=config,
        normalization=image_ops.normalization_for(config.model, config.input))

  def with_data(self, data_config) -> 'Runtime':
    """This runtime on the dataset of `data_config` (a `config.data`-like
    section), opened (and prepared if needed) now; the config it carries has
    `data` replaced, so stages built with it read that dataset's splits."""
    config = self.config.copy_and_resolve_references()
    with config.unlocked():
      config.data = data_config
    return dataclasses.replace(self, config=config,
                               dataset=registry.open_dataset(data_config))

  @property
  def num_classes(self) -> int:
    return self.dataset.num_classes

  @property
  def class_names(self) -> tuple[str, ...]:
    return self.dataset.class_names

  @property
  def train_split(self) -> str:
    return self.config.data.train_split

  @property
  def val_split(self) -> str:
    return self.config.data.val_split

  @property
  def pad_color(self) -> tuple[int, int, int]:
    return image_ops.pad_color(self.normalization)


def make_runtime(config, dataset: registry.Dataset | None = None,
                 builtin_weights: Callable[..., tuple[str, dict]] | None = None
                 ) -> Runtime:
  dtype = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}.get(
      config.compute_dtype)
  if dtype is None:
    raise ValueError(f"compute_dtype={config.compute_dtype!r}; expected "
                     "'float32' or 'bfloat16'.")
  return Runtime(
      config=config,
      dataset=dataset or registry.open_dataset(config.data),
      mesh=mesh_lib.make_mesh(config.mesh.num_devices),
      normalization=image_ops.normalization_for(config.model, config.input),
      compute_dtype=dtype, builtin_weights=builtin_weights)
