"""experiments/stability.py: its statistics by hand, and one tiny sweep end
to end (two seeds x two rounding orders)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, 'experiments'))
import rounding_spread  # noqa: E402  pylint: disable=g-import-not-at-top
import stability  # noqa: E402  pylint: disable=g-import-not-at-top


def test_output_name():
  assert stability.output_name('configs/supervised.py', '') == (
      'stability_supervised')
  assert stability.output_name('configs/box2seg.py:grabcut,tiny', 'x') == (
      'stability_box2seg-grabcut-tiny_x')


def test_rounding_spread_of_a_method_table_by_hand():
  first = [dict(variant='box', seed=0, val_miou=50.0),
           dict(variant='box', seed=1, val_miou=52.0),
           dict(variant='full', seed=0, val_miou=60.0),
           dict(variant='full', seed=1, val_miou=61.0)]
  second = [dict(variant='box', seed=0, val_miou=51.5),
            dict(variant='box', seed=1, val_miou=51.0),
            dict(variant='full', seed=1, val_miou=63.5)]   # seed 0 not run
  rows = rounding_spread.spread_rows(first, second)
  assert [r['variant'] for r in rows] == ['box', 'full']
  assert rows[0]['seeds'] == [0, 1] and rows[0]['spread'] == 1.5
  assert rows[1]['seeds'] == [1] and rows[1]['spread'] == 2.5
  table = rounding_spread.markdown(rows, 'val_miou')
  # box: mean 51, s.d. sqrt(2); second order 51.25 ± 0.35.
  # All four box runs: 51.125 ± 0.85.
  assert ('| box | 51.00 ± 1.41 | 51.25 ± 0.35 | 51.12 ± 0.85 | 1.50 | 0, 1 |'
          in table)
  assert '| full | 60.50 ± 0.71 | 63.50 | 61.50 ± 1.80 | 2.50 | 1 |' in table


def test_max_drop_after_first_third_hand_computed():
  curve = [[100, 30.0], [200, 50.0], [300, 40.0], [400, 45.0], [500, 41.0],
           [600, 60.0]]
  # 600 steps: the first third ends at 200; drops after it: 300 (50 -> 40 =
  # 10) and 500 (45 -> 41 = 4).
  assert stability.max_drop_after_first_third(curve, 600) == 10.0
  # The same fall inside the first third does not count.
  assert stability.max_drop_after_first_third(curve, 1000) == 4.0
  assert stability.max_drop_after_first_third([[10, 1.0], [20, 2.0]], 20) == 0
  assert stability.max_drop_after_first_third([], 20) == 0


def test_summarise_hand_computed():
  runs = [{'seed': s, 'order': o, 'val_miou': v,
           'max_drop_after_first_third': d}
          for s, o, v, d in [(0, 'one_device', 60.0, 1.0),
                             (0, 'two_devices', 61.5, 0.0),
                             (1, 'one_device', 62.0, 3.0),
                             (1, 'two_devices', 61.0, 0.5)]]
  summary = stability.summarise(runs, ['one_device', 'two_devices'], [0, 1])
  assert summary['mean'] == 61.0
  assert summary['std'] == pytest.approx(2 ** 0.5)   # sample s.d. of 60, 62
  assert summary['rounding_differences'] == [1.5, 1.0]
  assert summary['rounding_spread'] == 1.5
  assert summary['max_drop_after_first_third'] == 3.0
  assert summary['val_miou']['two_devices/seed1'] == 61.0
  one_order = stability.summarise(runs[::2], ['one_device'], [0, 1])
  assert one_order['rounding_spread'] is None
  assert stability.summarise(runs[:1], ['one_device'], [0])['std'] is None


@pytest.mark.slow          # four tiny runs in subprocesses: ~1-2 min
def test_tiny_sweep_end_to_end(tmp_path):
  env = dict(os.environ, WSSS_JAX_DATA_DIR=str(tmp_path / 'data'))
  command = [sys.executable, os.path.join(REPO, 'experiments', 'stability.py'),
             '--config=configs/supervised.py:tiny', '--seeds=0,1',
             f'--root={tmp_path / "runs"}', f'--out={tmp_path / "out"}',
             '--override=train.num_steps=4', '--eval_every=2']
  done = subprocess.run(command, cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=900)
  assert done.returncode == 0, done.stderr[-3000:]
  out = tmp_path / 'out'
  payload = json.loads((out / 'stability_supervised-tiny.json').read_text())
  assert set(payload['val_miou']) == {
      'one_device/seed0', 'two_devices/seed0', 'one_device/seed1',
      'two_devices/seed1'}
  for key in ('mean', 'std', 'rounding_spread'):
    assert isinstance(payload[key], float), key
  for run in payload['runs']:
    assert [step for step, _ in run['curve']] == [2, 4]
    assert 0 <= run['val_miou'] <= 100
  assert (out / 'stability_supervised-tiny.png').stat().st_size > 0
  # Rerunning reads the finished runs back instead of training again.
  again = subprocess.run(command, cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=300)
  assert again.returncode == 0, again.stderr[-3000:]
  assert json.loads((out / 'stability_supervised-tiny.json').read_text())[
      'val_miou'] == payload['val_miou']


def test_main_jobs_log_statistics(tmp_path):
  import main_jobs  # pylint: disable=g-import-not-at-top
  path = tmp_path / 'job.log'
  path.write_bytes(b'a line\nbar 1%\rbar 2%\rbar 100%\nlast\n')
  assert main_jobs.log_stats(str(path)) == {
      'log_bytes': 35, 'carriage_returns': 2, 'longest_line': 8}
