"""Multi-stage pipelines as plain Python: a list of named stages.

A stage has a name, a function that does its work, and outputs in the workdir
(checkpoints, PNG label folders, arrays).  When a stage finishes, a marker
`<workdir>/<name>/stage.json` records its results and wall time; rerunning the
pipeline skips every stage whose marker and outputs exist, and an interrupted
stage resumes from its own checkpoint (training stages) or skips the files it
already wrote (label stages).

    stages = [Stage('box_labels', make_box_labels, outputs=('labels',)),
              Stage('train', train_segmenter, outputs=('checkpoints',)),
              Stage('evaluate', evaluate)]
    records = run_stages(stages, context)

Methods that repeat stages (LPG's EM rounds, PMM's cyclic pseudo-masks) build
each round with prefixed names, `rounds(2, build)` -> `round1/train`, ...,
`round2/train`: every round's stages are ordinary stages, each resumable on
its own, with their folders under `<workdir>/round<k>/`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from typing import Any, Callable

import jax

from wsss_jax.atomic import write_json_atomic

log = logging.getLogger(__name__)


@dataclasses.dataclass
class StageContext:
  """Shared by every stage of one run.  Stages get everything else (config,
  datasets, models) from what their pipeline closed over when it was built."""
  workdir: str
  # Results of the stages run (or skipped) so far, by stage name.
  results: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)

  def stage_dir(self, name: str) -> str:
    path = os.path.join(self.workdir, name)
    os.makedirs(path, exist_ok=True)
    return path


@dataclasses.dataclass(frozen=True)
class Network:
  """A trained network a stage writes or scores, for loading it later
  (`wsss_jax.prediction`): the weights `<workdir>/<stage>/model.npz` of
  `model` (None: `segmentation.build_segmenter(runtime)`), built for
  `runtime` (whose config may differ from the run's: BANA's Labeler)."""
  stage: str
  runtime: Any
  model: Any = None


@dataclasses.dataclass(frozen=True)
class Stage:
  """A named step of a pipeline.

  Attributes:
    name: unique within the pipeline; also its folder in the workdir.
    run: `run(context, stage_dir) -> dict` of JSON-serialisable results.
    outputs: paths relative to the stage folder that must exist for the
      stage to count as complete.
    description: one line for logs and reports.
    network: the network the stage trains (or, for an evaluation, scores);
      None when it has none.
  """
  name: str
  run: Callable[[StageContext, str], dict[str, Any]]
  outputs: tuple[str, ...] = ()
  description: str = ''
  network: Network | None = None


MARKER = 'stage.json'


def _read_marker(stage_dir: str) -> dict[str, Any] | None:
  path = os.path.join(stage_dir, MARKER)
  if not os.path.exists(path):
    return None
  try:
    with open(path) as f:
      marker = json.load(f)
  except (OSError, json.JSONDecodeError):
    log.warning('Unreadable stage marker %s: the stage will run again.',
                    path)
    return None
  return marker if marker.get('status') == 'done' else None


def is_complete(stage: Stage, stage_dir: str) -> bool:
  if _read_marker(stage_dir) is None:
    return False
  return all(os.path.exists(os.path.join(stage_dir, out))
             for out in stage.outputs)


def run_stages(stages: list[Stage], context: StageContext
               ) -> list[dict[str, Any]]:
  """Runs (or skips) the stages in order; returns one record per stage.

  A record is {'name', 'status' ('done' | 'skipped'), 'wall_s', 'results'};
  for a skipped stage, wall_s is the time it took when it ran.
  """
  names = [stage.name for stage in stages]
  if len(set(names)) != len(names):
    raise ValueError(f'Stage names must be unique: {names}')
  records = []
  for stage in stages:
    stage_dir = context.stage_dir(stage.name)
    if is_complete(stage, stage_dir):
      marker = _read_marker(stage_dir)
      log.info('Stage %r is complete (%s); skipping.', stage.name,
                   stage_dir)
      record = dict(name=stage.name, status='skipped',
                    wall_s=marker.get('wall_s', 0.0),
                    results=marker.get('results', {}))
    else:
      log.info('Stage %r: %s', stage.name, stage.description or 'running')
      start = time.time()
      results = stage.run(context, stage_dir) or {}
      record = dict(name=stage.name, status='done',
                    wall_s=round(time.time() - start, 2), results=results)
      if jax.process_index() == 0:
        write_json_atomic(os.path.join(stage_dir, MARKER),
                          dict(record, description=stage.description))
    context.results[stage.name] = record['results']
    records.append(record)
  return records


def round_name(round_no: int, name: str) -> str:
  """The name of stage `name` in round `round_no` (1-based): 'round2/train'."""
  if round_no < 1:
    raise ValueError(f'round numbers start at 1, got {round_no}.')
  return f'round{round_no}/{name}'


def rounds(count: int,
           build: Callable[[int, Callable[[str], str]], list[Stage]]
           ) -> list[Stage]:
  """The stages of `count` rounds as one flat list.

  `build(k, name)` returns round k's stages; `name(stage)` gives a stage's
  name in round k (`round_name(k, stage)`), for the stage itself and for
  references to the stages of this or an earlier round (e.g. round k trains
  on `round_name(k - 1, 'labels')`).
  """
  stages: list[Stage] = []
  for round_no in range(1, count + 1):
    stages += build(round_no, lambda name, k=round_no: round_name(k, name))
  return stages


@dataclasses.dataclass(frozen=True)
class PseudoLabels:
  """The pseudo-masks the final network trained on, for results.json's
  'pseudo' scores and the report's example grid.

  Attributes:
    stage: the stage whose results hold their 'quality' scores.
    folder: the label folder, relative to the workdir.
    key: when that stage scores several folders ('quality' = {name:
      scores}), the one `folder` holds; None when 'quality' is one score set.
  """
  stage: str
  folder: str
  key: str | None = None


@dataclasses.dataclass(frozen=True)
class MethodPipeline:
  """A method's stages plus the names the report and results.json need.

  Attributes:
    stages: run in order by `run_stages`.
    eval_stage: the stage whose results are the final validation scores.
    train_stages: stages whose results hold a training 'history' (plots).
    pseudo: the pseudo-masks the final network trained on (None: none).
    extra_results: optional `(results by stage name) -> dict`, stored under
      results.json[method] (method-specific numbers).
    report_section: optional `(results.json dict) -> markdown lines`
      appended to report.md; figures come from the stages' own results
      (see `wsss_jax.reporting.figures`), so a section only formats data.
  """
  stages: list[Stage]
  eval_stage: str
  train_stages: tuple[str, ...]
  pseudo: PseudoLabels | None = None
  extra_results: Callable[[dict[str, Any]], dict[str, Any]] | None = None
  report_section: Callable[[dict[str, Any]], list[str]] | None = None
