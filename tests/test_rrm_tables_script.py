"""experiments/rrm_tables.py: the tables and the claims, from given rows."""

from __future__ import annotations

import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, 'experiments'))
import rrm_tables  # noqa: E402  pylint: disable=g-import-not-at-top


def _rows(values):
  return [{'row': row, 'seed': seed, 'val_miou': value}
          for (row, seed), value in values.items()]


def test_tables_and_claims_seed_by_seed():
  rows = _rows({('cam_ce_only', 0): 20.0, ('cam_labels', 0): 22.0,
                ('ce_only', 0): 21.0, ('rrm', 0): 25.0,
                ('cam_ce_only', 1): 20.0, ('cam_labels', 1): 26.0,
                ('ce_only', 1): 23.0, ('rrm', 1): 24.0,
                ('ratio=0.1', 0): 10.0, ('ratio=1', 0): 24.0,
                ('ratio=0.1', 1): 11.0, ('ratio=1', 1): 25.0})
  table, checks = rrm_tables.tables(rows, [0.1, 0.4, 1.0])
  assert '| RRM + joint | 62.6 | 25.0 | 24.0 | 24.5 ± 0.7 |' in table
  assert '| CAM + CE | 46.1 | 20.0 | 20.0 | 20.0 ± 0.0 |' in table
  # Ratio 0.4 is the default run of Table 2.
  assert '| ratio 0.4 | 62.6 | 25.0 | 24.0 | 24.5 ± 0.7 |' in table
  assert checks['RRM labels > CAM labels (joint)']['per_seed'] == {
      0: True, 1: False}
  assert checks['RRM labels > CAM labels (CE)']['holds_in'] == 2
  assert checks['joint > CE only (RRM labels)']['holds_in'] == 2
  middle = checks['middle ratio (0.3, 0.4) > both ends (0.1, 1.0)']
  assert middle['per_seed'] == {0: True, 1: False}
  assert '- RRM labels > CAM labels (joint): mixed (1 of 2 seeds)' in table
  assert '- joint > CE only (RRM labels): holds (2 of 2 seeds)' in table


def test_table2_alone_has_no_ratio_table():
  rows = _rows({('rrm', 0): 25.0, ('ce_only', 0): 21.0})
  table, checks = rrm_tables.tables(rows, [0.1, 0.4, 1.0])
  assert 'Table 1' not in table
  assert set(checks) == {'joint > CE only (RRM labels)'}


def test_table5_compares_two_steps_with_their_one_step_network():
  rows = _rows({('two_step', 0): 30.0, ('two_step', 1): 23.0})
  rows[0].update(one_step_val_miou=25.0, label_miou=40.0)
  rows[1].update(one_step_val_miou=24.0)
  table, checks = rrm_tables.tables(rows, [0.4])
  assert '**Table 5** (one step against two steps)' in table
  assert '| one-step | 62.6 | 25.0 | 24.0 | 24.5 ± 0.7 |' in table
  assert '| two-step | 66.3 | 30.0 | 23.0 | 26.5 ± 4.9 |' in table
  assert "| the second step's labels (train mIoU) | – | 40.0 | – | 40.0 |" in (
      table)
  assert checks['two-step > one-step']['per_seed'] == {0: True, 1: False}
  assert '- two-step > one-step: mixed (1 of 2 seeds)' in table


def test_previous_rows_join_unless_run_again(tmp_path):
  import json
  path = tmp_path / 'tables_2.json'
  path.write_text(json.dumps({'rows': _rows({('rrm', 0): 25.0,
                                             ('ce_only', 0): 21.0})}))
  rows = rrm_tables.merge_previous(_rows({('ratio=0.1', 0): 10.0,
                                          ('ce_only', 0): 22.0}),
                                   [str(path)])
  assert sorted((r['row'], r['val_miou']) for r in rows) == [
      ('ce_only', 22.0), ('ratio=0.1', 10.0), ('rrm', 25.0)]
