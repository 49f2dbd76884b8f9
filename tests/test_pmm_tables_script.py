"""experiments/pmm_tables.py: the rows of a run, the tables and the claims."""

from __future__ import annotations

import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, 'experiments'))
import pmm_tables  # noqa: E402  pylint: disable=g-import-not-at-top


def _results(cam, masks, rounds):
  return {'pmm': {'cam_miou': cam, 'cam_threshold': 0.1,
                  'pseudo_masks': dict(zip(('crf', 'crf_cvs', 'ppmg_no_cvs',
                                            'ppmg'), masks)),
                  'rounds': [{'round': k + 1, 'val_miou': v,
                              'val_miou_without_crf': v - 1.0}
                             for k, v in enumerate(rounds)]}}


def test_default_rows_give_tables_2_4_5():
  rows = pmm_tables.default_rows(0, _results(20.0, (21, 22, 23, 24),
                                             (30.0, 33.0)))
  by_key = {(r['table'], r['row']): r['miou'] for r in rows}
  assert by_key[(2, 'cam')] == 20.0 and by_key[(2, 'ppmg')] == 24
  assert by_key[(4, 'pus_clamp')] == 30.0
  assert by_key[(5, 'cycles=0')] == 30.0 and by_key[(5, 'cycles=1')] == 33.0


def test_tables_and_claims_seed_by_seed():
  rows = (pmm_tables.default_rows(0, _results(20, (21, 22, 23, 24), (30, 33)))
          + pmm_tables.default_rows(1, _results(20, (25, 22, 23, 24),
                                                (31, 30))))
  rows += [{'table': 4, 'row': 'pus_none', 'seed': 0, 'miou': 29.0},
           {'table': 4, 'row': 'pus_none', 'seed': 1, 'miou': 31.0},
           {'table': 4, 'row': 'pus_pow', 'seed': 0, 'miou': 29.0},
           {'table': 4, 'row': 'pus_ignore', 'seed': 1, 'miou': 32.0}]
  table, checks = pmm_tables.tables(rows)
  by_claim = {c['claim']: c for c in checks}
  # PPMG beats CRF in seed 0 (24 > 21), not in seed 1 (24 < 25).
  assert by_claim['ppmg > crf']['per_seed'] == {0: True, 1: False}
  # One cycle helps in seed 0 only.
  assert by_claim['cycles=1 > cycles=0']['holds_in'] == 1
  # >= claims: a tie holds (pow 29 = none 29 in seed 0).
  assert by_claim['pus_pow >= pus_none']['per_seed'] == {0: True}
  # clamp vs ignore is judged only where both exist (seed 1: 31 < 32).
  assert by_claim['pus_clamp >= pus_ignore']['per_seed'] == {1: False}
  assert '| PPMG | 61.49 | 24.0 | 24.0 | 24.0 ± 0.0 |' in table
  assert '| 1 cycle | 68.50 | 33.0 | 30.0 | 31.5 ± 2.1 |' in table
  assert '| Table 5: cycles=1 > cycles=0 | 1/2 | +3.0, -1.0 |' in table


def test_foreground_stats_by_hand():
  import numpy as np  # pylint: disable=g-import-not-at-top
  import pmm_mask_stats  # pylint: disable=g-import-not-at-top
  truth = np.array([[0, 1, 1, 255]], np.uint8)
  label = np.array([[2, 1, 0, 2]], np.uint8)   # last pixel ignored
  stats = pmm_mask_stats.foreground_stats([label], [truth])
  # 3 counted pixels: label fg 2 (pixels 0, 1), truth fg 2 (pixels 1, 2),
  # both fg 1 (pixel 1), right class 1 (pixel 1).
  assert abs(stats['foreground_share'] - 200 / 3) < 1e-9
  assert stats['precision'] == 50.0 and stats['recall'] == 50.0
  assert stats['right_class'] == 50.0


def test_best_val_rows_and_table():
  import pmm_best_val  # pylint: disable=g-import-not-at-top
  final = {'pmm': {'rounds': [{'val_miou': 30.0},
                              {'val_miou': 33.0, 'label_miou': 28.0}]}}
  best = {'pmm': {'rounds': [
      {'val_miou': 30.0, 'selected_checkpoint': {
          'step': 240, 'val_miou': 31.5, 'max_images': 100}},
      {'val_miou': 32.0, 'label_miou': 27.5}]}}
  row = pmm_best_val.seed_row(0, final, best)
  assert (row['selected_step'], row['selected_score']) == (240, 31.5)
  assert (row['val_final'], row['val_best_val']) == (33.0, 32.0)
  text = pmm_best_val.table([row, dict(row, seed=1, val_best_val=34.0)], 300)
  assert '| 0 | 240 | 31.5 | 28.0 / 27.5 | 33.0 / 32.0 | -1.0 |' in text
  assert '0.0 ± 1.4' in text        # mean and s.d. of -1 and +1
