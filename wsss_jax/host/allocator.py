"""Keep freed memory in the process: XLA's CPU buffers without page faults.

XLA on the CPU allocates each execution's buffers with `malloc` and frees them
when it ends.  glibc gives threads other than the main one their own arenas,
whose heaps are capped at 64 MiB, so every larger buffer (a batch of
activations is 30-40 MiB at the benchmark's crop) is a fresh `mmap`, and the
first write to each of its pages is a page fault the kernel answers by
zeroing the page.  Measured on the 2-core benchmark machine
(experiments/RESULTS.md §11): 15 % of the XLA threads' time was spent in the
kernel, and the training stages ran 7-14 % slower than with the settings
below.

`keep_freed_memory()` sets, through `mallopt`, what the environment variable
`GLIBC_TUNABLES=glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:
glibc.malloc.trim_threshold=2147483647` would set at start-up: one arena for all
threads, no `mmap` for large blocks, and no returning of freed heap memory to
the kernel.  Buffers are then reused from the heap from the second step on.
The numbers computed do not change (only where buffers live); the peak
resident memory grows slightly (supervised: 0.92 -> 1.04 GB), because it is
kept instead of returned.

It must run before the threads that allocate make their first allocation
(their arena is chosen then), hence from `wsss_jax/__init__.py`.  It does
nothing off glibc (macOS, musl), and `WSSS_JAX_MALLOC_TUNING=0` turns it off.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

TUNING_ENV = 'WSSS_JAX_MALLOC_TUNING'

# glibc <malloc.h> parameter numbers.
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
M_ARENA_MAX = -8

# (parameter, value) in the order they are set.
SETTINGS = ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0),
            (M_TRIM_THRESHOLD, 2**31 - 1))

_applied: dict[int, int] | None = None


def _libc():
  """The process's C library if it is glibc (it has `mallopt`), else None."""
  try:
    libc = ctypes.CDLL(ctypes.util.find_library('c') or 'libc.so.6')
  except OSError:
    return None
  glibc = hasattr(libc, 'gnu_get_libc_version') and hasattr(libc, 'mallopt')
  return libc if glibc else None


def keep_freed_memory() -> dict[int, int]:
  """Applies `SETTINGS` once per process; returns {parameter: value} of
  those glibc accepted (empty off glibc or when turned off)."""
  global _applied
  if _applied is not None:
    return _applied
  _applied = {}
  if os.environ.get(TUNING_ENV, '').strip().lower() in ('0', 'false', 'no',
                                                         'off'):
    return _applied
  libc = _libc()
  if libc is None:
    return _applied
  libc.mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
  libc.mallopt.restype = ctypes.c_int
  for parameter, value in SETTINGS:
    if libc.mallopt(parameter, value) == 1:
      _applied[parameter] = value
  return _applied
