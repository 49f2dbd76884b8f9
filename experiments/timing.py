"""Shared timing loop of the benchmark scripts in this folder."""

from __future__ import annotations

import statistics
import time

import jax


def time_train_step(train_step, state, batch, steps: int):
  """Runs `train_step` once (compile + first step), then `steps` timed times.

  Returns (state, compile_and_first_step_seconds, median_step_seconds); each
  step is timed to completion with `block_until_ready`.
  """
  start = time.perf_counter()
  state, metrics = train_step(state, batch)
  jax.block_until_ready(metrics)
  first = time.perf_counter() - start
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    state, metrics = train_step(state, batch)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - start)
  return state, first, statistics.median(times)
