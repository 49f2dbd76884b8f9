"""experiments/bana_tables.py: Table 1 over label seeds, by hand."""

from __future__ import annotations

import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, 'experiments'))
import bana_tables  # noqa: E402  pylint: disable=g-import-not-at-top
import sweep  # noqa: E402  pylint: disable=g-import-not-at-top


def _pseudo(bap_crf, bap_ret, gap_crf, bap_on_gap):
  return {'bap': {'y_crf': bap_crf, 'y_ret': bap_ret, 'agreement': 80.0,
                  'agreement_coverage_pct': 90.0, 'images': 2000},
          'gap': {'y_crf': gap_crf, 'images': 300},
          'bap_on_gap_images': {'y_crf': bap_on_gap, 'images': 300}}


def test_table1_mean_sd_and_per_seed_orderings():
  pseudo = {0: _pseudo(77.0, 65.0, 74.0, 76.0),
            1: _pseudo(75.0, 66.0, 75.5, 75.0)}   # seed 1: GAP wins
  rows = [{'variant': 'nal', 'seed': 0, 'val_miou': 70.0,
           'val_miou_without_crf': 66.0}]
  table, checks = bana_tables.tables(rows, pseudo)
  # BAP Y_crf over 2 000 images: mean 76, s.d. sqrt(2) = 1.41.
  assert '| BAP | y_crf | 78.7 | 76.00 ± 1.41 | 77.00, 75.00 | 2000 |' in table
  assert '| GAP | y_crf | 75.5 | 74.75 ± 1.06 | 74.00, 75.50 | 300 |' in table
  assert '80.00 ± 0.00 (90.0 % of pixels)' in table
  assert checks == {'BAP Y_crf > GAP Y_crf (labels seed 0)': True,
                    'Y_crf > Y_ret (labels seed 0)': True,
                    'BAP Y_crf > GAP Y_crf (labels seed 1)': False,
                    'Y_crf > Y_ret (labels seed 1)': True}
  assert 'BAP Y_crf > GAP Y_crf (labels seed 1): DOES NOT HOLD' in table


def test_one_label_seed_keeps_the_plain_table():
  table, checks = bana_tables.tables([], {0: _pseudo(77.0, 65.0, 74.0, 76.0)})
  assert '| BAP | y_ret | 70.8 | 65.0 | 65.00 | 2000 |' in table
  assert set(checks) == {'BAP Y_crf > GAP Y_crf', 'Y_crf > Y_ret'}


def test_label_rows_feed_rounding_spread():
  rows = bana_tables.label_rows({0: _pseudo(77.0, 65.0, 74.0, 76.0),
                                 2: _pseudo(75.0, 66.0, 75.5, 75.0)})
  assert {'variant': 'bap y_crf', 'seed': 2, 'miou': 75.0} in rows
  assert {'variant': 'gap y_crf', 'seed': 0, 'miou': 74.0} in rows
  assert len(rows) == 2 * 5   # bap: 3 labels; gap, bap_on_gap_images: 1


def test_table3_mean_sd_over_seeds():
  rows = [{'variant': 'nal', 'seed': s, 'val_miou': v,
           'val_miou_without_crf': w}
          for s, v, w in ((0, 70.0, 66.0), (1, 71.0, 67.0), (2, 72.0, 68.0))]
  table, _ = bana_tables.tables(rows, {})
  assert '| nal | 62.4 / 68.1 | 67.00 ± 1.00 | 71.00 ± 1.00 |' in table


def test_orderings_with_and_without_crf():
  rows = [{'variant': 'nal', 'seed': 0, 'val_miou': 70.0,
           'val_miou_without_crf': 67.0},
          {'variant': 'ce_only', 'seed': 0, 'val_miou': 71.0,
           'val_miou_without_crf': 66.0}]
  _, checks = bana_tables.tables(rows, {})
  assert checks == {'NAL >= ce_only': False,
                    'NAL >= ce_only without CRF': True}


@pytest.mark.slow          # the tiny BANA Labelers only: ~30 s
def test_label_seed_runs_only_stages_one_and_two(tmp_path):
  config = sweep.sweep_config('configs/bana.py', 'nal,tiny', 1, [])
  workdir = str(tmp_path / 'labels-seed1')
  pipeline, by_stage = sweep.run_first_stages(config, workdir,
                                              bana_tables.SHARED_STAGES)
  assert set(by_stage) == set(bana_tables.SHARED_STAGES)
  assert not os.path.exists(os.path.join(workdir, 'train'))
  pseudo = pipeline.extra_results(by_stage)['pseudo_labels']
  assert 0.0 <= pseudo['bap']['y_crf'] <= 100.0
  assert 0.0 <= pseudo['gap']['y_crf'] <= 100.0
  with pytest.raises(ValueError, match='no stage'):
    sweep.run_first_stages(config, workdir, ('labels', 'nonexistent'))
