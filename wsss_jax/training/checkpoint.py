"""Orbax checkpoints holding the train state, the data iterator and metadata.

One checkpoint = Composite(state, data_iter, meta): restoring all three puts a
killed run exactly where it was (same parameters, same next batch, same rng).
Orbax finalises a step atomically; a step that fails to restore anyway (a
corrupt file) is moved aside and the previous step is used.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from typing import Any

import grain
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
  """No checkpoint of a directory can be restored."""


class Checkpointer:
  """Saves and restores (state, data iterator, JSON metadata) by step."""

  def __init__(self, directory: str, keep: int = 2):
    self.directory = os.path.abspath(directory)
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=max(int(keep), 1),
                                             create=True))

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state: Any, data_iter: Any,
           meta: dict[str, Any]) -> None:
    """Starts an (asynchronous) save of step `step`; no-op if it exists."""
    if step in self._manager.all_steps():
      return
    items = {'state': ocp.args.StandardSave(state),
             'meta': ocp.args.JsonSave(meta)}
    if data_iter is not None:
      items['data_iter'] = grain.checkpoint.CheckpointSave(data_iter)
    self._manager.save(step, args=ocp.args.Composite(**items), force=True)

  def restore_latest(self, abstract_state: Any, data_iter: Any
                     ) -> tuple[Any, dict[str, Any], int] | None:
    """Restores the newest restorable step into `data_iter` (in place).

    Returns (state, meta, step), or None when there is no checkpoint.  When
    the newest steps fail to restore but an older one succeeds, the failing
    ones are moved to `<directory>.corrupt/` (so training can write those
    steps again).  When no step restores, nothing is moved and
    `CheckpointError` lists why: a mismatch (another dataset, model or
    config) must not silently restart a run from scratch.
    """
    failures: list[tuple[int, Exception]] = []
    for step in reversed(self.all_steps()):
      items = {'state': ocp.args.StandardRestore(abstract_state),
               'meta': ocp.args.JsonRestore()}
      if data_iter is not None:
        items['data_iter'] = grain.checkpoint.CheckpointRestore(data_iter)
      try:
        restored = self._manager.restore(step,
                                         args=ocp.args.Composite(**items))
      except Exception as error:  # pylint: disable=broad-except
        log.warning('Checkpoint step %d in %s cannot be restored (%s: %s)',
                        step, self.directory, type(error).__name__, error)
        failures.append((step, error))
        continue
      for bad_step, _ in failures:
        log.warning('Moving unrestorable checkpoint step %d aside; '
                        'resuming from step %d.', bad_step, step)
        self._move_aside(bad_step)
      return restored['state'], dict(restored['meta']), step
    if failures:
      details = '; '.join(f'step {s}: {type(e).__name__}: {str(e)[:300]}'
                          for s, e in failures)
      raise CheckpointError(
          f'No checkpoint in {self.directory} can be restored ({details}). '
          'If the run was started with other data or another model, use a '
          'new workdir; if the files are damaged, delete the directory to '
          'restart the stage.')
    return None

  def _move_aside(self, step: int) -> None:
    source = os.path.join(self.directory, str(step))
    target_dir = self.directory + '.corrupt'
    os.makedirs(target_dir, exist_ok=True)
    if os.path.exists(source):
      shutil.move(source, os.path.join(target_dir,
                                       f'{step}-{int(time.time())}'))
    self._manager.reload()

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()

  def __enter__(self) -> 'Checkpointer':
    return self

  def __exit__(self, *exc) -> None:
    self.close()
