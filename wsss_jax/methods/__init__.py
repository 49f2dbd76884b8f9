"""Method registry: `config.method` -> the function building its pipeline.

A method is a package `wsss_jax.methods.<name>` whose `pipeline` module has
`pipeline(runtime) -> wsss_jax.stages.MethodPipeline`; adding one needs no
change here.  The two reference baselines share one package.  Only the chosen
method is imported: a run of one method never loads another's code.
"""

from __future__ import annotations

import importlib
import pkgutil

from wsss_jax.stages import MethodPipeline

# Methods whose builder is not `<package>.pipeline.pipeline`.
_SHARED_PACKAGES: dict[str, tuple[str, str]] = {
    'supervised': ('baselines', 'supervised'),
    'box_baseline': ('baselines', 'box_baseline'),
}


def available() -> list[str]:
  """Every method name `config.method` accepts (found without importing)."""
  packages = {info.name for info in pkgutil.iter_modules(__path__)
              if info.ispkg}
  shared = {package for package, _ in _SHARED_PACKAGES.values()}
  return sorted((packages - shared) | set(_SHARED_PACKAGES))


def build_pipeline(method: str, runtime) -> MethodPipeline:
  """Imports `method`'s package and builds its pipeline for `runtime`."""
  if method not in available():
    raise ValueError(f'config.method={method!r} is unknown; choose one of '
                     f'{available()}.')
  package, function = _SHARED_PACKAGES.get(method, (method, 'pipeline'))
  module = importlib.import_module(f'{__name__}.{package}.pipeline')
  return getattr(module, function)(runtime)
