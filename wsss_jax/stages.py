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

import concurrent.futures
import dataclasses
import hashlib
import json
import logging
import os
import queue
import shutil
import threading
import time
from typing import Any, Callable

import jax
import numpy as np

from wsss_jax.atomic import write_json_atomic
from wsss_jax.training import mesh as mesh_lib

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
    ignores: config field prefixes ('eval', 'train.log_every') that cannot
      change the stage's outputs: a change there does not rerun it.
    extends: fields whose increase continues a finished stage from its own
      state (a training stage's 'train.num_steps') instead of redoing it.
    side: a side stage reads the outputs of the stages listed before it,
      and no later stage reads its outputs unless it names it in
      `waits_for`: it runs in a thread beside them (`run_stages`).  BANA's
      GAP Labeler, trained only for Table 1's comparison, is one.
    waits_for: side stages listed earlier whose outputs this stage reads.
  """
  name: str
  run: Callable[[StageContext, str], dict[str, Any]]
  outputs: tuple[str, ...] = ()
  description: str = ''
  network: Network | None = None
  ignores: tuple[str, ...] = ()
  extends: tuple[str, ...] = ()
  side: bool = False
  waits_for: tuple[str, ...] = ()


MARKER = 'stage.json'
# The config a stage started with (its marker records it when it finishes).
STARTED = 'stage_started.json'


def _read_json(path: str) -> dict[str, Any] | None:
  """The JSON object at `path`; None if absent or unreadable (logged)."""
  if not os.path.exists(path):
    return None
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, json.JSONDecodeError):
    log.warning('Unreadable stage file %s: the stage will run again.', path)
    return None


def _read_marker(stage_dir: str) -> dict[str, Any] | None:
  marker = _read_json(os.path.join(stage_dir, MARKER))
  return marker if marker and marker.get('status') == 'done' else None


def is_complete(stage: Stage, stage_dir: str) -> bool:
  if _read_marker(stage_dir) is None:
    return False
  return all(os.path.exists(os.path.join(stage_dir, out))
             for out in stage.outputs)


def _under(field: str, prefixes: tuple[str, ...]) -> bool:
  return any(field == p or field.startswith(p + '.') for p in prefixes)


def _fields_for(stage: Stage, fields: dict[str, Any]) -> dict[str, Any]:
  return {k: v for k, v in fields.items() if not _under(k, stage.ignores)}


def _changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
  return sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))


def _describe(changes: list[str], old, new, limit: int = 6) -> str:
  text = ', '.join(f'{k}: {old.get(k)!r} -> {new.get(k)!r}'
                   for k in changes[:limit])
  return text + (f' (+{len(changes) - limit} more)' if len(changes) > limit
                 else '')


def _trains(stage: Stage) -> bool:
  """Whether the stage trains its network (an evaluation only scores one)."""
  return stage.network is not None and stage.network.stage == stage.name


def _digest(stage: Stage, stage_dir: str) -> str | None:
  """sha256 over a training stage's weight arrays (None for other stages):
  tells whether a redone stage changed what later stages read.  The arrays,
  not the file: a rewritten .npz differs in its zip time stamps."""
  if not _trains(stage):
    return None
  path = os.path.join(stage_dir, 'model.npz')
  if not os.path.exists(path):
    return None
  digest = hashlib.sha256()
  with np.load(path) as arrays:
    for key in sorted(arrays.files):
      digest.update(key.encode())
      digest.update(np.ascontiguousarray(arrays[key]).tobytes())
  return digest.hexdigest()


def plan_stage(stage: Stage, stage_dir: str, fields: dict[str, Any] | None,
               previous_fields: dict[str, Any] | None,
               changed_upstream: str | None,
               own_fields: dict[str, Any] | None = None) -> tuple[str, str]:
  """(action, reason) for one stage: 'skip' (complete and current), 'run'
  (new or interrupted: resumes), 'extend' (finished, and only `extends`
  fields grew: continues from its own state) or 'restart' (its outputs are
  stale: a field it reads changed, or an earlier stage's output did).

  `fields` is the run's flattened config (None: no staleness check, the
  marker alone decides) and `own_fields` the stage's own when it is built
  from another (a stage-1 network's; default `fields`): markers record
  those.  A marker that recorded none (older workdirs) compares the run's
  `fields` with `previous_fields` (the workdir's config.json before this
  run), and is trusted when there is none (stages copied in by sweeps).
  """
  complete = is_complete(stage, stage_dir)
  if fields is None:
    return ('skip', '') if complete else ('run', '')
  marker = _read_marker(stage_dir) if complete else _read_json(
      os.path.join(stage_dir, STARTED))
  if marker is None:
    return 'run', ''
  current = _fields_for(stage, fields if own_fields is None else own_fields)
  recorded = marker.get('config')
  if recorded is not None:
    # A field the stage has since learnt to ignore is no reason to redo it.
    recorded = _fields_for(stage, recorded)
  else:
    if previous_fields is None:
      return ('skip', '') if complete else ('run', '')
    recorded = _fields_for(stage, previous_fields)
    current = _fields_for(stage, fields)
  if changed_upstream:
    return 'restart', f'the output of {changed_upstream!r} changed'
  changes = _changes(recorded, current)
  if not changes:
    return ('skip', '') if complete else ('run', '')
  grows = all(
      key in stage.extends and isinstance(recorded.get(key), (int, float))
      and isinstance(current.get(key), (int, float))
      and current[key] > recorded[key] for key in changes)
  reason = _describe(changes, recorded, current)
  if complete and grows:
    return 'extend', reason
  return 'restart', reason


def _set_aside(stage: Stage, stage_dir: str) -> str | None:
  """Clears a stale stage folder; a trained network's folder is kept under
  another name (never lose a training), others are deleted."""
  if not os.listdir(stage_dir):
    return None
  if not _trains(stage):
    shutil.rmtree(stage_dir)
    os.makedirs(stage_dir)
    return None
  stamp = time.strftime('%Y%m%d-%H%M%S', time.gmtime())
  kept, count = f'{stage_dir}.replaced-{stamp}', 1
  while os.path.exists(kept):
    count += 1
    kept = f'{stage_dir}.replaced-{stamp}-{count}'
  os.rename(stage_dir, kept)
  os.makedirs(stage_dir)
  return kept


SIDE_STAGES_ENV = 'WSSS_JAX_SIDE_STAGES'


def side_stages_enabled() -> bool:
  """Whether side stages run in their own thread: yes in a single-process
  run unless `WSSS_JAX_SIDE_STAGES=0` (then they run inline, in list
  order); multi-host runs keep one order of collective barriers."""
  off = os.environ.get(SIDE_STAGES_ENV, '').strip().lower() in (
      '0', 'false', 'no', 'off')
  return not off and jax.process_count() == 1


def _check_order(stages: list[Stage]) -> None:
  names = [stage.name for stage in stages]
  if len(set(names)) != len(names):
    raise ValueError(f'Stage names must be unique: {names}')
  side_before: set[str] = set()
  for stage in stages:
    unknown = [name for name in stage.waits_for if name not in side_before]
    if unknown:
      raise ValueError(f'Stage {stage.name!r} waits for {unknown}, which are '
                       'not side stages listed before it.')
    if stage.side:
      side_before.add(stage.name)


class _SideLane:
  """Runs side stages one after another, in submission order: in a daemon
  thread (`threaded`), or at once in the caller's thread (side stages
  turned off), with the same bookkeeping either way.

  A daemon, so that a failing main line ends the process at once: a side
  stage cut short is resumed by the next run like any interrupted stage.
  """

  def __init__(self, run_one: Callable[[Stage, str | None],
                                       tuple[dict[str, Any], str | None]],
               threaded: bool):
    self._run_one = run_one
    self._jobs: queue.Queue | None = queue.Queue() if threaded else None
    self.futures: dict[str, concurrent.futures.Future] = {}
    self.changed: set[str] = set()      # side stages whose output changed
    self._last_changed: str | None = None
    self._failed: str | None = None
    if self._jobs is not None:
      threading.Thread(target=self._work, name='side-stages',
                       daemon=True).start()

  def submit(self, stage: Stage, changed_upstream: str | None) -> None:
    future: concurrent.futures.Future = concurrent.futures.Future()
    self.futures[stage.name] = future
    if self._jobs is None:
      self._run(stage, changed_upstream, future)
    else:
      self._jobs.put((stage, changed_upstream, future))

  def _work(self) -> None:
    while (job := self._jobs.get()) is not None:
      self._run(*job)

  def _run(self, stage: Stage, upstream: str | None,
           future: concurrent.futures.Future) -> None:
    if self._failed is not None:
      future.set_exception(RuntimeError(
          f'Stage {stage.name!r} did not run: the side stage '
          f'{self._failed!r} before it failed.'))
      return
    try:
      record, after = self._run_one(stage, upstream or self._last_changed)
    except BaseException as error:  # pylint: disable=broad-except
      self._failed = stage.name
      future.set_exception(error)
      return
    if after == stage.name:
      self.changed.add(stage.name)
    self._last_changed = after
    future.set_result(record)

  def raise_first_error(self) -> None:
    for future in list(self.futures.values()):
      if future.done() and future.exception() is not None:
        raise future.exception()

  def close(self) -> None:
    if self._jobs is not None:
      self._jobs.put(None)


def run_stages(stages: list[Stage], context: StageContext,
               fields: dict[str, Any] | None = None,
               previous_fields: dict[str, Any] | None = None,
               own_fields: Callable[[Stage], dict[str, Any] | None]
               = lambda stage: None) -> list[dict[str, Any]]:
  """Runs, skips, continues or redoes the stages in order; returns one
  record per stage, in list order.

  A record is {'name', 'status' ('done' | 'skipped'), 'wall_s', 'side',
  'results'}; for a skipped stage, wall_s is the time it took when it ran.  With
  `fields` (the flattened config, JSON values), each stage's marker records
  the fields it reads, and a later run redoes exactly the stages whose
  fields changed, plus those after a stage whose output changed
  (`plan_stage`; `own_fields(stage)` gives a stage's own fields when they
  are not the run's), logging which and why.

  Side stages (`Stage.side`) run one after another in a thread beside the
  stages listed after them (`side_stages_enabled`); a stage waits for the
  side stages it names in `waits_for`, and the call returns when all are
  done.  The host's cores then serve two stages at once: a training stage
  alone leaves part of a CPU idle, a label stage part of the accelerator.
  A stage computes the same numbers in either order (each has its own data,
  random keys and network).  A side stage's changed output makes only the
  later side stages stale.
  """
  _check_order(stages)
  primary = jax.process_index() == 0

  def run_one(stage: Stage, changed_upstream: str | None
              ) -> tuple[dict[str, Any], str | None]:
    """(record, changed_upstream after the stage)."""
    stage_dir = context.stage_dir(stage.name)
    own = None if fields is None else own_fields(stage)
    action, reason = plan_stage(stage, stage_dir, fields, previous_fields,
                                changed_upstream, own)
    if action == 'skip':
      marker = _read_marker(stage_dir)
      log.info('Stage %r is complete (%s); skipping.', stage.name,
                   stage_dir)
      record = dict(name=stage.name, status='skipped',
                    wall_s=marker.get('wall_s', 0.0), side=stage.side,
                    results=marker.get('results', {}))
      context.results[stage.name] = record['results']
      return record, changed_upstream
    before = _digest(stage, stage_dir)
    beside = (' (a side stage, beside the next ones)'
              if threading.current_thread() is not threading.main_thread()
              else '')
    if action == 'extend':
      log.info('Stage %r%s continues from its last checkpoint: %s',
               stage.name, beside, reason)
      if primary:
        os.remove(os.path.join(stage_dir, MARKER))
    elif action == 'restart':
      kept = _set_aside(stage, stage_dir) if primary else None
      log.warning('Stage %r%s reruns from the start: %s%s', stage.name,
                  beside, reason, f' (its previous outputs are kept in '
                  f'{kept})' if kept else '')
    else:
      log.info('Stage %r%s: %s', stage.name, beside,
               stage.description or 'running')
    if action != 'run':         # the primary cleared what the others read
      mesh_lib.barrier(f'stage-{stage.name}-{action}')
    current = None if fields is None else _fields_for(
        stage, fields if own is None else own)
    if primary and current is not None:
      write_json_atomic(os.path.join(stage_dir, STARTED), {'config': current})
    start = time.time()
    results = stage.run(context, stage_dir) or {}
    record = dict(name=stage.name, status='done',
                  wall_s=round(time.time() - start, 2), side=stage.side,
                  results=results)
    if primary:
      marker = dict(record, description=stage.description)
      if current is not None:
        marker['config'] = current
      write_json_atomic(os.path.join(stage_dir, MARKER), marker)
    # A redone stage whose output differs makes every later one stale; a
    # stage that merely resumed (or ran for the first time) does not.
    if action != 'run' and changed_upstream is None:
      after = _digest(stage, stage_dir)
      if after is None or after != before:
        changed_upstream = stage.name
    context.results[stage.name] = record['results']
    return record, changed_upstream

  lane = _SideLane(run_one, threaded=side_stages_enabled()
                   and any(stage.side for stage in stages))
  records: dict[str, dict[str, Any]] = {}
  changed_upstream = None     # the first main-line stage whose output changed
  try:
    for stage in stages:
      for name in stage.waits_for:
        lane.futures[name].result()
        if name in lane.changed:
          changed_upstream = changed_upstream or name
      if stage.side:
        lane.submit(stage, changed_upstream)
      else:
        records[stage.name], changed_upstream = run_one(stage,
                                                        changed_upstream)
      lane.raise_first_error()   # fail fast: the main line's work is saved
    records.update({name: future.result()
                    for name, future in lane.futures.items()})
  finally:
    lane.close()
  return [records[stage.name] for stage in stages]


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
