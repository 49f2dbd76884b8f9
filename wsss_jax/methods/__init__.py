"""Method registry: `config.method` -> the function building its pipeline.

A method is a package `wsss_jax.methods.<name>` whose `pipeline` module
builds a `wsss_jax.stages.MethodPipeline` from the run's `Runtime`.  Only the
chosen method is imported: a run of one method never loads another's code.
"""

from __future__ import annotations

import importlib

from wsss_jax.stages import MethodPipeline

# config.method -> (module, function).
METHODS: dict[str, tuple[str, str]] = {
    'supervised': ('wsss_jax.methods.baselines.pipeline', 'supervised'),
    'box_baseline': ('wsss_jax.methods.baselines.pipeline', 'box_baseline'),
    'box2seg': ('wsss_jax.methods.box2seg.pipeline', 'pipeline'),
    'bana': ('wsss_jax.methods.bana.pipeline', 'pipeline'),
}


def build_pipeline(method: str, runtime) -> MethodPipeline:
  """Imports `method`'s package and builds its pipeline for `runtime`."""
  if method not in METHODS:
    raise ValueError(f'config.method={method!r} is unknown; choose one of '
                     f'{sorted(METHODS)}.')
  module_name, function = METHODS[method]
  return getattr(importlib.import_module(module_name), function)(runtime)
