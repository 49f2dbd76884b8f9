"""Shared loop of the experiment scripts: one config file, many variants and
seeds, label stages computed once.

Every run gets its own workdir `<root>/<variant>-seed<seed>`; stages listed
as shared (pseudo-label stages that do not depend on the variant or seed) are
copied from the first run's workdir into the others, where their stage
markers (stripped of the donor's config) make them count as complete.  Finished runs are skipped on rerun
(the pipeline's own resume), so an interrupted sweep continues.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
from typing import Any, Iterator, Sequence

from wsss_jax import (config_checks, config_io, methods, pretraining, run,
                      runtime, stages)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def sweep_config(config_file: str, variant: str, seed: int,
                 overrides: Sequence[str]):
  """`<config_file>:<variant>` with `seed` and the overrides applied."""
  config = run.load_config_file(os.path.join(REPO, config_file), variant)
  config.seed = int(seed)
  for override in overrides:
    config_io.apply_override(config, override)
  return config


def run_first_stages(config, workdir: str, stage_names: Sequence[str]
                     ) -> tuple[stages.MethodPipeline, dict[str, Any]]:
  """Runs (or resumes) only the named stages of the config's pipeline in
  `workdir` (e.g. BANA's Labelers for Table 1 over seeds) and returns the
  pipeline and {stage name: stage results}.  The stages must not need any
  stage left out."""
  config_checks.validate(config)
  rt = runtime.make_runtime(config,
                            builtin_weights=pretraining.builtin_weights)
  pipeline = methods.build_pipeline(config.method, rt)
  unknown = set(stage_names) - {stage.name for stage in pipeline.stages}
  if unknown:
    raise ValueError(f'{config.method} has no stage(s) {sorted(unknown)}.')
  fields, previous = config_checks.update_workdir_config(config, workdir)
  records = stages.run_stages(
      [stage for stage in pipeline.stages if stage.name in stage_names],
      stages.StageContext(workdir=workdir), fields, previous)
  return pipeline, {r['name']: r['results'] for r in records}


def _forget_config(stage_dir: str) -> None:
  """A stage copied from another variant's run holds that variant's config
  in its marker; without it the marker is trusted (the stage is shared
  because it reads no field the variants change)."""
  path = os.path.join(stage_dir, stages.MARKER)
  if os.path.exists(path):
    with open(path) as f:
      marker = json.load(f)
    marker.pop('config', None)
    with open(path, 'w') as f:
      json.dump(marker, f)
  started = os.path.join(stage_dir, stages.STARTED)
  if os.path.exists(started):
    os.remove(started)


def copy_shared_stages(donor: str, workdir: str,
                       stages: Sequence[str]) -> None:
  """Copies the finished `stages` of the `donor` workdir into `workdir`
  (where missing), trusted as complete whatever config the donor ran."""
  for stage in stages:
    source, target = os.path.join(donor, stage), os.path.join(workdir, stage)
    if os.path.isdir(source) and not os.path.exists(target):
      shutil.copytree(source, target)
      _forget_config(target)


def run_sweep(config_file: str, variants: Sequence[str], seeds: Sequence[int],
              overrides: Sequence[str], root: str,
              shared_stages: Sequence[str] = ()
              ) -> Iterator[tuple[str, int, dict[str, Any]]]:
  """Yields (variant, seed, results.json dict) for every run, seeds outer."""
  run.configure_logging()
  donor = None
  for seed in seeds:
    for variant in variants:
      config = sweep_config(config_file, variant, seed, overrides)
      workdir = os.path.join(root, f'{variant}-seed{seed}')
      if donor is not None:
        copy_shared_stages(donor, workdir, shared_stages)
      results = run.train_and_evaluate(config, workdir)
      donor = donor or workdir
      yield variant, int(seed), results


def mean_sd_cell(values: dict[int, float]) -> str:
  """'mean ± s.d.' of {seed: value} for a table cell ('–' when empty; the
  mean alone for one seed)."""
  if not values:
    return '–'
  mean = statistics.mean(values.values())
  spread = (f' ± {statistics.stdev(values.values()):.1f}'
            if len(values) > 1 else '')
  return f'{mean:.1f}{spread}'


def write_outputs(root: str, name: str, table: str, payload: Any) -> None:
  """`<root>/<name>.md` (the table) and `<root>/<name>.json`."""
  os.makedirs(root, exist_ok=True)
  with open(os.path.join(root, f'{name}.md'), 'w') as f:
    f.write(table + '\n')
  with open(os.path.join(root, f'{name}.json'), 'w') as f:
    json.dump(payload, f, indent=2)
