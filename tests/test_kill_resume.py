"""SIGKILL the main job mid-training, rerun it: identical final parameters."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

pytestmark = pytest.mark.slow   # two whole runs of the main job

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = ['--config.train.num_steps=60', '--config.train.checkpoint_every=10',
         '--config.train.log_every=10']
# The baseline, and RRM, whose steps make their labels online (multi-scale
# CAM, a host DenseCRF in a process pool) on top of the training state.
CONFIGS = {'box_baseline': ['--config=configs/box_baseline.py:tiny'],
           'rrm': ['--config=configs/rrm.py:tiny']}


def _start(workdir, config='box_baseline'):
  return subprocess.Popen(
      [sys.executable, '-m', 'wsss_jax.main', *CONFIGS[config], *STEPS,
       f'--workdir={workdir}'],
      cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
      env=dict(os.environ, JAX_PLATFORMS='cpu'))


def _finish(workdir, config):
  process = _start(workdir, config)
  _, stderr = process.communicate(timeout=600)
  assert process.returncode == 0, stderr.decode()[-3000:]


def _checkpoints(workdir):
  path = os.path.join(workdir, 'train', 'checkpoints')
  if not os.path.isdir(path):
    return []
  return sorted(int(name) for name in os.listdir(path) if name.isdigit())


def _weights(workdir):
  with np.load(os.path.join(workdir, 'train', 'model.npz')) as data:
    return {key: data[key] for key in data.files}


@pytest.mark.parametrize('config', sorted(CONFIGS))
def test_sigkill_then_rerun_matches_uninterrupted_run(tmp_path, config):
  reference = str(tmp_path / 'reference')
  _finish(reference, config)

  killed = str(tmp_path / 'killed')
  process = _start(killed, config)
  deadline = time.time() + 600
  while not [s for s in _checkpoints(killed) if s >= 20]:
    assert process.poll() is None, 'finished before it could be killed'
    assert time.time() < deadline
    time.sleep(0.02)
  process.send_signal(signal.SIGKILL)
  process.wait()
  assert process.returncode == -signal.SIGKILL
  assert not os.path.exists(os.path.join(killed, 'train', 'model.npz'))
  assert max(_checkpoints(killed)) < 60

  _finish(killed, config)
  expected, resumed = _weights(reference), _weights(killed)
  assert expected.keys() == resumed.keys()
  for key in expected:
    np.testing.assert_array_equal(expected[key], resumed[key], err_msg=key)
