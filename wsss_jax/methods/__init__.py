"""Method registry: `config.method` -> a function building its pipeline."""

from __future__ import annotations

from typing import Callable

from wsss_jax.methods import bana, baselines, box2seg
from wsss_jax.methods.base import MethodPipeline

METHODS: dict[str, Callable[..., MethodPipeline]] = {
    'supervised': baselines.supervised,
    'box_baseline': baselines.box_baseline,
    'box2seg': box2seg.pipeline,
    'bana': bana.pipeline,
}


def build_pipeline(method: str, runtime) -> MethodPipeline:
  if method not in METHODS:
    raise ValueError(f'config.method={method!r} is unknown; choose one of '
                     f'{sorted(METHODS)}.')
  return METHODS[method](runtime)
