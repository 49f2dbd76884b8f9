"""Progress bars that keep logs readable.

A bar redraws its line with carriage returns: on a terminal that is what a
user wants, in a log file (a job scheduler's stdout, `nohup`, CI) it leaves
thousands of redraws on one line.  `bar` therefore draws only on a terminal
and only on the primary process's main thread; `WSSS_JAX_PROGRESS=1` /
`0` forces bars on or off.  Long loops also log plain lines (training: every `train.log_every`
steps, with throughput and ETA), so nothing is lost without bars.
"""

from __future__ import annotations

import os
import sys
import threading

import tqdm

PROGRESS_ENV = 'WSSS_JAX_PROGRESS'


def _primary() -> bool:
  # Imported here: host worker processes import this module and should not
  # pay for jax.
  import jax  # pylint: disable=g-import-not-at-top
  return jax.process_index() == 0


def bars_enabled() -> bool:
  """Whether progress bars are drawn here: in this process, and from its
  main thread (a side stage's thread would draw over the main line's bar)."""
  if threading.current_thread() is not threading.main_thread():
    return False
  forced = os.environ.get(PROGRESS_ENV, '').strip().lower()
  if forced in ('1', 'true', 'yes', 'on'):
    return _primary()
  if forced in ('0', 'false', 'no', 'off'):
    return False
  stream = sys.stderr
  return hasattr(stream, 'isatty') and stream.isatty() and _primary()


def bar(*, show: bool = True, **kwargs) -> tqdm.tqdm:
  """`tqdm.tqdm(**kwargs)`, drawn only when `show` and `bars_enabled()`."""
  return tqdm.tqdm(disable=not (show and bars_enabled()), **kwargs)
