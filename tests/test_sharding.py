"""Data parallelism: one step on 8 devices equals one step on 1 device."""

import json
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))


# Slow: a fresh process with 8 devices compiles four whole training steps
# (two networks, 1 and 8 devices), about 20 s; the other tests keep it short.
@pytest.mark.slow
def test_eight_devices_equal_one_device():
  env = dict(os.environ, JAX_PLATFORMS='cpu',
             PYTHONPATH=os.path.dirname(HERE))
  result = subprocess.run(
      [sys.executable, os.path.join(HERE, 'eight_devices_check.py')],
      env=env, capture_output=True, text=True, timeout=900)
  assert result.returncode == 0, result.stderr[-3000:]
  report = json.loads(result.stdout.strip().splitlines()[-1])
  for name, values in report.items():
    assert abs(values['loss_1'] - values['loss_8']) < 1e-5, (name, values)
    assert values['max_param_diff'] < 1e-6, (name, values)
    assert values['max_batch_stats_diff'] < 1e-5, (name, values)
  # Trained BN really has statistics, computed over the global batch.
  assert report['resnet_trained_bn']['num_batch_stats'] > 0
