"""Atomic file writes: a reader never sees a half-written file.

Data goes to a uniquely named temporary file in the destination folder, which
is then renamed over the destination (atomic on POSIX).  Two processes writing
the same path never share a temporary file.  The file gets the usual
permissions (0666 minus the umask), not mkstemp's owner-only 0600.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from typing import Any, Callable, IO


def _umask() -> int:
  mask = os.umask(0)
  os.umask(mask)
  return mask


def write_atomic(path: str | os.PathLike, write: Callable[[IO[bytes]], None]
                 ) -> None:
  """Calls `write(file)` on a temporary file, then renames it to `path`."""
  path = os.fspath(path)
  folder = os.path.dirname(os.path.abspath(path))
  handle, tmp = tempfile.mkstemp(dir=folder, prefix='.tmp-',
                                 suffix='-' + os.path.basename(path))
  try:
    with os.fdopen(handle, 'wb') as f:
      write(f)
    os.chmod(tmp, 0o666 & ~_umask())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def json_safe(value: Any) -> Any:
  """Numpy values to Python, NaN/Inf to None (strict JSON has no NaN)."""
  if isinstance(value, dict):
    return {str(k): json_safe(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [json_safe(v) for v in value]
  if hasattr(value, '__dataclass_fields__'):
    import dataclasses  # pylint: disable=g-import-not-at-top
    return json_safe(dataclasses.asdict(value))
  if hasattr(value, 'tolist'):
    return json_safe(value.tolist())
  if isinstance(value, float) and not math.isfinite(value):
    return None
  if value is None or isinstance(value, (str, int, float, bool)):
    return value
  return str(value)


def write_json_atomic(path: str | os.PathLike, data: Any) -> None:
  """Strict JSON (NaN becomes null), indented, written atomically."""
  text = json.dumps(json_safe(data), indent=2, sort_keys=False,
                    allow_nan=False)
  write_atomic(path, lambda f: f.write(text.encode('utf-8')))
