"""experiments/device_check.sh runs end to end on a CPU with --dry-run."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow          # five small jobs: ~1-2 min on 2 cores
def test_device_check_dry_run(tmp_path):
  env = dict(os.environ, OUT=str(tmp_path / 'out'),
             WSSS_JAX_DATA_DIR=str(tmp_path / 'data'),
             PYTHON=sys.executable)
  done = subprocess.run(
      ['bash', os.path.join(REPO, 'experiments', 'device_check.sh'),
       '--dry-run'], env=env, capture_output=True, text=True, timeout=900)
  assert done.returncode == 0, done.stderr[-2000:]
  out = tmp_path / 'out'
  sections = [json.loads(line) for line in
              (out / 'sections.jsonl').read_text().splitlines()]
  ran = {s['section']: s for s in sections if 'skipped' not in s}
  assert set(ran) >= {'env', 'step_float32', 'step_bfloat16', 'jax_crf',
                      'main_job'}
  failed = {name: s for name, s in ran.items() if s['rc'] != 0}
  assert not failed, (failed, (out / 'log.txt').read_text()[-3000:])
  float32 = json.loads((out / 'step_float32.json').read_text())
  assert [r['model'] for r in float32['results']] == ['tiny', 'largefov']
  assert all(r['median_step_seconds'] > 0 for r in float32['results'])
  bfloat16 = json.loads((out / 'step_bfloat16.json').read_text())
  assert {r['dtype'] for r in bfloat16['results']} == {'bfloat16'}
  crf = json.loads((out / 'crf.json').read_text())
  assert crf['smoke'] and crf['agreement_pct'] >= 99.5
  main_job = json.loads((out / 'main_job.json').read_text())
  assert 0 <= main_job['val']['miou'] <= 100
  assert len(list(out.iterdir())) <= 8          # the device tool's limit
