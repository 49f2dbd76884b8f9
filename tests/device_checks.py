"""Runs a check script of tests/ in a fresh process (one that sets its own
fake device count before importing JAX) and returns its JSON report."""

from __future__ import annotations

import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def run_check(script: str, timeout: int = 900) -> dict:
  """The last stdout line of `python tests/<script>`, parsed as JSON; fails
  with the script's stderr when it exits non-zero."""
  env = dict(os.environ, JAX_PLATFORMS='cpu',
             PYTHONPATH=os.path.dirname(HERE))
  result = subprocess.run([sys.executable, os.path.join(HERE, script)],
                          env=env, capture_output=True, text=True,
                          timeout=timeout)
  assert result.returncode == 0, result.stderr[-3000:]
  return json.loads(result.stdout.strip().splitlines()[-1])
