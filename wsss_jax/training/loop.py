"""The training loop shared by every training stage of every method.

    state, summary = train(TrainingJob(...))

Resume order (big_vision): (1) the latest checkpoint of this stage; (2)
otherwise `job.init_state()`, which applies an explicit initial checkpoint,
pretrained weights or a random init.  Kill the process at any moment, run it
again, and it continues from the last checkpoint with the same parameters,
data order and rng as an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import signal
import threading
import time
from typing import Any, Callable, Iterator

import jax

from wsss_jax import progress as progress_lib
from wsss_jax.training import checkpoint as checkpoint_lib
from wsss_jax.training import history as history_lib
from wsss_jax.training import mesh as mesh_lib
from wsss_jax.training import state as state_lib

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
  """A loss or metric became NaN/Inf; the last good checkpoint is kept."""


class Preempted(RuntimeError):
  """SIGTERM received: a checkpoint was written; rerun the command to resume."""


@dataclasses.dataclass
class TrainingJob:
  """Everything `train` needs; built by a method's stage function.

  Attributes:
    name: stage name (logs, TensorBoard tags).
    stage_dir: folder for checkpoints, TensorBoard events and history.
    abstract_state: () -> the state's ShapeDtypeStructs with shardings (what
      a restore needs; no compute).
    init_state: () -> fresh TrainState (pretrained or random), replicated;
      called only when no checkpoint exists.
    make_data_iter: () -> a checkpointable grain iterator of host batches.
    train_step: jitted (state, device_batch) -> (state, metrics).
    mesh: device mesh for the batches.
    num_steps, log_every, checkpoint_every, keep_checkpoints, eval_every:
      from `config.train`.
    evaluate: optional (variables) -> dict of scalars (periodic validation).
    images_per_step: global batch size (throughput reporting).
    learning_rate: optional (0-based update count) -> the base learning
      rate (before parameter-group multipliers), logged with the losses.
    preview: optional (variables) -> uint8 (H, W, 3) image of a few
      validation predictions, written to TensorBoard at each validation.
    config_text: the run's config, written to TensorBoard once.
    after_validation: optional (step, scores, variables) -> None, called
      after every validation (e.g. `best.BestWeights.update`).
  """
  name: str
  stage_dir: str
  abstract_state: Callable[[], Any]
  init_state: Callable[[], Any]
  make_data_iter: Callable[[], Iterator[dict[str, Any]]]
  train_step: Callable
  mesh: Any
  num_steps: int
  log_every: int = 10
  checkpoint_every: int = 50
  keep_checkpoints: int = 2
  eval_every: int = 0
  evaluate: Callable[[Any], dict[str, float]] | None = None
  images_per_step: int = 0
  learning_rate: Callable[[int], Any] | None = None
  preview: Callable[[Any], Any] | None = None
  config_text: str = ''
  after_validation: Callable[[int, dict[str, Any], Any], None] | None = None


def _duration(seconds: float) -> str:
  seconds = int(round(seconds))
  hours, rest = divmod(seconds, 3600)
  return (f'{hours}:{rest // 60:02d}:{rest % 60:02d}' if hours
          else f'{rest // 60}:{rest % 60:02d}')


def progress_line(step: int, num_steps: int, scalars: dict[str, float],
                  steps_per_second: float | None, images_per_step: int
                  ) -> str:
  """'step 200/700 (29%): loss=0.41 lr=0.00093 | 4.8 step/s, 38 img/s |
  ETA 1:44' (rates and ETA once a steady window was timed)."""
  line = (f'step {step}/{num_steps} ({100 * step // max(num_steps, 1)}%): '
          + history_lib.format_scalars(scalars))
  if steps_per_second:
    line += f' | {steps_per_second:.3g} step/s'
    if images_per_step:
      line += f', {steps_per_second * images_per_step:.3g} img/s'
    if step < num_steps:
      line += f' | ETA {_duration((num_steps - step) / steps_per_second)}'
  return line


class _SigtermFlag:
  """Turns SIGTERM into a flag checked between steps (main thread only)."""

  def __init__(self):
    self.raised = False
    self._previous = None

  def __enter__(self):
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handler)
    except ValueError:  # not the main thread
      self._previous = None
    return self

  def _handler(self, signum, frame):  # pylint: disable=unused-argument
    self.raised = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


@contextlib.contextmanager
def _compiling_in_background(train_step: Callable, abstract_state: Any,
                             batch: dict[str, Any]) -> Iterator[None]:
  """Compiles `train_step` for (state, batch) in a thread during the block.

  A fresh stage's initialisation (Flax `init` runs op by op, compiling each
  op) and the step's XLA compilation overlap: on a host with idle cores they
  take the longer of the two instead of the sum; on 2 CPU cores, where each
  already uses both, the gain measured ~1 s per stage.  jit's executable
  cache is shared with ahead-of-time compilation, so the first `train_step`
  call reuses it and nothing about the computation changes.  A failure here
  is left for that call to raise.
  """
  abstract_batch = state_lib.abstract_state(batch)

  def compile_step():
    try:
      train_step.lower(abstract_state, abstract_batch).compile()
    except Exception:  # pylint: disable=broad-except
      log.debug('background compilation failed; the first step will '
                'compile (and raise)', exc_info=True)

  thread = threading.Thread(target=compile_step, name='compile-train-step',
                            daemon=True)
  thread.start()
  yield                   # an exception here leaves the daemon thread be
  thread.join()


def train(job: TrainingJob) -> tuple[Any, dict[str, Any]]:
  """Runs (or resumes) a training stage; returns (final state, summary)."""
  checkpointer = checkpoint_lib.Checkpointer(
      os.path.join(job.stage_dir, 'checkpoints'), keep=job.keep_checkpoints)
  prepare_start = time.time()
  first_batch = None
  try:
    data_iter = job.make_data_iter()
    abstract_state = job.abstract_state()
    restored = checkpointer.restore_latest(abstract_state, data_iter)
    meta: dict[str, Any] = {}
    if restored is not None:
      state, meta, restored_step = restored
      log.info('[%s] resumed from checkpoint step %d', job.name,
               restored_step)
    else:
      first_batch = mesh_lib.device_batch(next(data_iter), job.mesh)
      with _compiling_in_background(job.train_step, abstract_state,
                                    first_batch):
        state = job.init_state()
  except BaseException:
    checkpointer.close()
    raise
  prepare_seconds = time.time() - prepare_start
  history = history_lib.History(job.stage_dir, job.name, meta.get('history'),
                                config_text=job.config_text)

  def validate(step):
    scores = job.evaluate(state.variables)
    history.add_val(step, scores)
    history_lib.log_line(job.name + '/val', step, scores)
    if job.after_validation is not None:
      job.after_validation(step, scores, state.variables)
    if job.preview is not None and jax.process_index() == 0:
      history.add_image(step, job.preview(state.variables))
  start_step = int(jax.device_get(state.step))
  pending: list[tuple[int, dict[str, Any]]] = []
  last_saved = start_step if restored is not None else None

  def flush():
    """Fetches pending metrics, stops on NaN/Inf, records their mean."""
    if not pending:
      return
    fetched = [(step, jax.device_get(m)) for step, m in pending]
    pending.clear()
    bad = history_lib.first_non_finite(fetched)
    if bad is not None:
      step, name, value = bad
      where = (f'the last good checkpoint (step {last_saved}) is kept in '
               f'{checkpointer.directory}' if last_saved is not None else
               'no checkpoint was written yet')
      raise NonFiniteLossError(
          f'[{job.name}] {name} = {value} at step {step}; training stopped, '
          f'{where}. Lower optim.lr or check the labels of this stage.')
    scalars = history_lib.mean_scalars([m for _, m in fetched])
    if job.learning_rate is not None:
      scalars['lr'] = float(job.learning_rate(fetched[-1][0] - 1))
    history.add_train(fetched[-1][0], scalars)
    return scalars

  def save(step):
    nonlocal last_saved
    flush()
    checkpointer.save(step, state, data_iter, {
        'history': history.state()})
    last_saved = step

  progress = progress_lib.bar(total=job.num_steps, initial=start_step,
                              desc=job.name, unit='step', dynamic_ncols=True)
  step = start_step
  first_step_seconds = eval_seconds = 0.0
  session_start = time.time()
  window = (session_start, start_step, 0.0)  # (time, step, eval s) at start
  try:   # the final validation goes to the same events file
    with _SigtermFlag() as sigterm:
      try:
        while step < job.num_steps:
          if first_batch is not None:
            batch, first_batch = first_batch, None
          else:
            batch = mesh_lib.device_batch(next(data_iter), job.mesh)
          state, metrics = job.train_step(state, batch)
          step += 1
          pending.append((step, metrics))
          if step == start_step + 1:  # includes any compilation left
            jax.block_until_ready(metrics)
            first_step_seconds = time.time() - session_start
            window = (time.time(), step, eval_seconds)
          done = step == job.num_steps
          if step % job.log_every == 0 or done:
            scalars = flush()     # waits for the step: the window is timed
            now = time.time()
            timed = now - window[0] - (eval_seconds - window[2])
            rate = ((step - window[1]) / timed
                    if step > window[1] and timed > 0 else None)
            window = (now, step, eval_seconds)
            progress.set_postfix(loss=f"{scalars['loss']:.4f}")
            log.info('[%s] %s', job.name, progress_line(
                step, job.num_steps, scalars, rate, job.images_per_step))
          if job.evaluate is not None and job.eval_every and (
              step % job.eval_every == 0 and not done):
            tick = time.time()
            validate(step)
            eval_seconds += time.time() - tick
          progress.update(1)
          if done or step % job.checkpoint_every == 0 or sigterm.raised:
            save(step)
          if sigterm.raised and not done:
            checkpointer.wait()
            raise Preempted(f'[{job.name}] SIGTERM at step {step}; checkpoint '
                            'written. Rerun the same command to resume.')
      finally:
        progress.close()
        checkpointer.close()
    session_seconds = time.time() - session_start
    if job.evaluate is not None:
      validate(step)
  finally:
    history.close()
  steps_run = job.num_steps - start_step
  steady_seconds = session_seconds - first_step_seconds - eval_seconds
  summary = {
      'steps': job.num_steps,
      'resumed_from_step': start_step if restored is not None else None,
      'steps_this_session': steps_run,
      'session_seconds': round(session_seconds, 2),
      'prepare_seconds': round(prepare_seconds, 2),
      'first_step_seconds': round(first_step_seconds, 2),
      'images_per_second': (
          round(job.images_per_step * (steps_run - 1) / steady_seconds, 2)
          if steps_run > 1 and steady_seconds > 0 and job.images_per_step
          else None),
      'history': history.state(),
  }
  return state, summary
