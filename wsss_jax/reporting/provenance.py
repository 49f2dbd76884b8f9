"""Where a run's numbers came from: code, command, time, machine, versions.

Stored as results.json's 'provenance' and 'versions' so that a number in a
table can be traced to the commit, the command line and the kind of machine
that made it (the same commit trains along different trajectories on two
CPUs).  Nothing here names the host or the user.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
import subprocess
import sys
from typing import Any

# Every package whose version can change a number (the scientific stack and
# the host-side label makers).
PACKAGES = ('jax', 'jaxlib', 'flax', 'optax', 'orbax-checkpoint', 'grain',
            'tensorflow-datasets', 'numpy', 'scipy', 'ml_collections',
            'pillow', 'opencv-python-headless', 'opencv-python',
            'pydensecrf2', 'pydensecrf', 'wsss_jax')

_SOURCE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def versions() -> dict[str, str]:
  """{package: version} of python and PACKAGES ('not installed' if absent)."""
  found = {'python': platform.python_version()}
  for name in PACKAGES:
    try:
      found[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      found[name] = 'not installed'
  return found


def _git(*args: str) -> str | None:
  try:
    done = subprocess.run(['git', *args], cwd=_SOURCE_DIR, check=True,
                          capture_output=True, text=True, timeout=10)
  except (OSError, subprocess.SubprocessError):
    return None
  return done.stdout.strip()


def git_state() -> dict[str, Any]:
  """{'git_commit': HEAD of the checkout holding this package (None when it
  is installed from a wheel), 'git_dirty': whether tracked files differ
  from that commit (None when unknown)}.  Untracked files (runs, outputs)
  do not count."""
  commit = _git('rev-parse', 'HEAD')
  if not commit:
    return {'git_commit': None, 'git_dirty': None}
  status = _git('status', '--porcelain', '--untracked-files=no')
  return {'git_commit': commit,
          'git_dirty': None if status is None else bool(status)}


def cpu_model() -> str:
  """The CPU's model name (Linux /proc/cpuinfo, else platform)."""
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if line.startswith('model name'):
          return line.split(':', 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def machine() -> dict[str, Any]:
  """What kind of machine ran (no host name): OS, CPU model, core count."""
  return {'system': platform.system(), 'machine': platform.machine(),
          'cpu': cpu_model(), 'cpu_count': os.cpu_count()}


def provenance(argv: list[str] | None = None) -> dict[str, Any]:
  """results.json's 'provenance': git_commit, git_dirty, argv (the command
  line, default sys.argv), time (UTC, ISO 8601, when written), machine."""
  return {**git_state(),
          'argv': list(sys.argv if argv is None else argv),
          'time': datetime.datetime.now(datetime.timezone.utc).isoformat(
              timespec='seconds'),
          'machine': machine()}
