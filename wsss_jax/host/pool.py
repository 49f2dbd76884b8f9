"""Ordered, bounded map of a host function over items in worker processes.

Host stages (DenseCRF, GrabCut, PNG writing) run in a
`concurrent.futures.ProcessPoolExecutor` started with the 'spawn' method:
forking a process that has initialised JAX (multithreaded) can deadlock.
Results come back **in submission order**, at most `max_in_flight` items are
submitted but not yet collected (so memory stays bounded when items are large
arrays), and `workers=0` runs everything inline in the calling process (tests,
debugging, tiny splits).

Overlapping the accelerator with the host: feed `imap` a lazy iterator whose
`next()` runs the device step, or call `submit` yourself between device
steps; the workers process earlier items meanwhile::

  with HostPool(crf_fn, workers=4, desc='crf') as pool:
    for batch in loader:
      probs = predict(batch)              # device work for this batch
      for item in split_batch(batch, probs):
        for label in pool.submit(item):   # results that are ready, in order
          save(label)
    for label in pool.drain():
      save(label)
"""

from __future__ import annotations

import collections
import concurrent.futures
import functools
import multiprocessing
import os
import pickle
import threading
import time
from typing import Any, Callable, Generic, Iterable, Iterator, TypeVar

import tqdm

from wsss_jax import progress as progress_lib

T = TypeVar('T')
R = TypeVar('R')


def _exit_with_parent(parent_pid: int, poll_seconds: float = 1.0) -> None:
  """Worker watchdog: exits this process once `parent_pid` is gone.

  A killed parent (SIGKILL, a crashed run) never shuts its executor down, and
  idle 'spawn' workers would otherwise live on as orphans.
  """
  while os.getppid() == parent_pid:
    time.sleep(poll_seconds)
  os._exit(1)  # pylint: disable=protected-access


def _start_worker(parent_pid: int,
                  initializer: Callable[[], Any] | None) -> None:
  """Worker initializer: the parent watchdog, then the user's initializer."""
  threading.Thread(target=_exit_with_parent, args=(parent_pid,),
                   daemon=True).start()
  if initializer is not None:
    initializer()


class WorkerError(RuntimeError):
  """A host function failed on one item; the message names the item index.

  The original exception (with the worker's traceback) is the `__cause__`.
  """

  def __init__(self, index: int, description: str, cause: BaseException):
    super().__init__(f'{description} failed on item {index}: '
                     f'{type(cause).__name__}: {cause}')
    self.index = index


class HostPool(Generic[T, R]):
  """Maps `fn` over items in worker processes, yielding results in order.

  Use as a context manager (the workers are stopped on exit).  `fn` and the
  items must be picklable when `workers > 0` (a module-level function or a
  `functools.partial` of one).

  Args:
    fn: the function applied to each item.
    workers: number of worker processes; 0 runs `fn` inline.
    max_in_flight: most items submitted but not yet returned by `submit`,
      `drain` or `imap` (default: 2 per worker, 1 inline).
    desc: progress-bar label (also used in error messages).
    total: expected number of items, for the progress bar.
    progress: show a tqdm progress bar.
    initializer: called once in each worker process at start-up (e.g. to
      limit a library's threads); also called once when inline.
  """

  def __init__(self, fn: Callable[[T], R], workers: int = 0, *,
               max_in_flight: int | None = None, desc: str = 'host',
               total: int | None = None, progress: bool = True,
               initializer: Callable[[], Any] | None = None):
    if int(workers) != workers or workers < 0:
      raise ValueError(f'HostPool: workers must be an integer >= 0 (0 = '
                       f'inline), got {workers!r}.')
    workers = int(workers)
    if max_in_flight is None:
      max_in_flight = 2 * workers if workers else 1
    if max_in_flight < 1:
      raise ValueError(f'HostPool: max_in_flight must be >= 1, got '
                       f'{max_in_flight}.')
    if workers:
      for name, obj in (('fn', fn), ('initializer', initializer)):
        try:
          pickle.dumps(obj)
        except Exception as exc:
          raise TypeError(
              f'HostPool({desc}): {name} {obj!r} cannot be pickled for worker '
              f'processes; use a module-level function or functools.partial '
              f'of one ({exc}).') from exc
    self.fn = fn
    self.workers = workers
    self.max_in_flight = int(max_in_flight)
    self.desc = desc
    self._total = total
    self._progress = progress
    self._initializer = initializer
    self._executor: concurrent.futures.ProcessPoolExecutor | None = None
    self._pending: collections.deque[
        tuple[int, concurrent.futures.Future | Any]] = collections.deque()
    self._next_index = 0
    self._bar: tqdm.tqdm | None = None
    self._open = False

  # -- lifecycle -------------------------------------------------------------
  def __enter__(self) -> HostPool[T, R]:
    if self._open:
      raise RuntimeError(f'HostPool({self.desc}) is already open.')
    if self.workers:
      self._executor = concurrent.futures.ProcessPoolExecutor(
          max_workers=self.workers,
          mp_context=multiprocessing.get_context('spawn'),
          initializer=functools.partial(_start_worker, os.getpid(),
                                        self._initializer))
    elif self._initializer is not None:
      self._initializer()
    self._bar = progress_lib.bar(total=self._total, desc=self.desc,
                                 show=self._progress, leave=False)
    self._open = True
    return self

  def __exit__(self, exc_type, exc, tb) -> None:
    pending = len(self._pending)
    self._close(cancel=exc_type is not None or pending > 0)
    if exc_type is None and pending:
      raise RuntimeError(
          f'HostPool({self.desc}) closed with {pending} results not '
          f'collected; call drain() before leaving the block.')

  def _close(self, cancel: bool) -> None:
    self._open = False
    self._pending.clear()
    if self._executor is not None:
      self._executor.shutdown(wait=True, cancel_futures=cancel)
      self._executor = None
    if self._bar is not None:
      self._bar.close()
      self._bar = None

  # -- work ------------------------------------------------------------------
  def submit(self, item: T) -> list[R]:
    """Queues one item; returns the results now ready, in submission order.

    If `max_in_flight` items are already outstanding, first waits for the
    oldest one (so at most `max_in_flight` items or results are held).
    Inline (`workers=0`), `fn` runs here and its result is returned at once.

    Raises:
      WorkerError: `fn` raised on some item (its index is in the message).
    """
    self._check_open()
    ready = []
    while len(self._pending) >= self.max_in_flight:
      ready.append(self._pop())
    index = self._next_index
    self._next_index += 1
    if self._executor is None:
      self._pending.append((index, self._run_inline(index, item)))
    else:
      self._pending.append((index, self._executor.submit(self.fn, item)))
    while self._pending and self._is_done(self._pending[0][1]):
      ready.append(self._pop())
    return ready

  def drain(self) -> Iterator[R]:
    """Waits for every outstanding item; yields the results in order."""
    self._check_open()
    while self._pending:
      yield self._pop()

  def imap(self, items: Iterable[T]) -> Iterator[R]:
    """Yields fn(item) for every item, in order (items are pulled lazily)."""
    for item in items:
      yield from self.submit(item)
    yield from self.drain()

  # -- helpers ---------------------------------------------------------------
  def _check_open(self) -> None:
    if not self._open:
      raise RuntimeError(f'HostPool({self.desc}) is not open; use it in a '
                         f'`with` block.')

  def _run_inline(self, index: int, item: T) -> Any:
    try:
      return self.fn(item)
    except Exception as exc:
      raise WorkerError(index, self.desc, exc) from exc

  @staticmethod
  def _is_done(value: Any) -> bool:
    return not isinstance(value, concurrent.futures.Future) or value.done()

  def _pop(self) -> R:
    index, value = self._pending.popleft()
    if isinstance(value, concurrent.futures.Future):
      try:
        value = value.result()
      except Exception as exc:
        raise WorkerError(index, self.desc, exc) from exc
    if self._bar is not None:
      self._bar.update(1)
    return value


def pool_map(fn: Callable[[T], R], items: Iterable[T], workers: int = 0, *,
             max_in_flight: int | None = None, desc: str = 'host',
             total: int | None = None, progress: bool = True,
             initializer: Callable[[], Any] | None = None) -> Iterator[R]:
  """Yields `fn(item)` for every item, in order, via a `HostPool`.

  A generator: the pool lives while it is being consumed; closing the
  generator early stops the workers.  Arguments as in `HostPool`.
  """
  if total is None and hasattr(items, '__len__'):
    total = len(items)
  with HostPool(fn, workers, max_in_flight=max_in_flight, desc=desc,
                total=total, progress=progress,
                initializer=initializer) as pool:
    yield from pool.imap(items)
