"""experiments/lpg_tables.py: rows of a run, the overlap test, the claims."""

from __future__ import annotations

import os
import sys

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, 'experiments'))
import lpg_tables  # noqa: E402  pylint: disable=g-import-not-at-top


def _results(pseudo, val):
  return {'lpg': {'stages': [{'stage': s + 1, 'pseudo_miou': p,
                              'val_miou': v}
                             for s, (p, v) in enumerate(zip(pseudo, val))],
                  'references': {'box_fill': 50.0, 'dense_crf': 60.0}}}


def test_rows_and_claims():
  rows = lpg_tables.run_rows(0, _results((55, 58, 59), (40, 42, 43)),
                             'stagewise')
  rows += lpg_tables.run_rows(0, _results((0, 0, 0), (39, 41, 44)), 'fixed')
  rows += [{'table': 'fusion', 'row': 'overlap_rate', 'stage': 3, 'seed': 0,
            'miou': 30.0},
           {'table': 'fusion', 'row': 'first_come', 'stage': 3, 'seed': 0,
            'miou': 31.0}]
  by_claim = {c['claim']: c for c in lpg_tables.claims(rows, 3)}
  assert by_claim['val: stage 3 > stage 1 (Table 2)']['difference'] == [3.0]
  assert by_claim['stage-wise EM > fixed LPG, last stage (Table 2)'][
      'holds_in'] == 0                       # 43 < 44
  assert by_claim['LPG masks > box fill (Table 9)']['holds_in'] == 1
  assert by_claim['LPG masks > DenseCRF masks (Table 9)'][
      'difference'] == [-1.0]                 # 59 against 60
  assert by_claim['overlap rate > first come (overlap images, last stage)'][
      'difference'] == [-1.0]
  text = lpg_tables.markdown(rows, 3)
  assert '| stagewise stage 3 | 68.4 | 43.0 | 43.0 |' in text
  assert '| Box + DenseCRF | 69.7 | 60.0 | 60.0 |' in text


def test_overlapping_classes():
  boxes = np.array([[0, 0, 4, 4], [3, 3, 6, 6], [10, 10, 12, 12]])
  assert lpg_tables.overlapping_classes(boxes, np.array([1, 2, 1]))
  assert not lpg_tables.overlapping_classes(boxes, np.array([1, 1, 2]))
  # Touching edges do not overlap (half-open boxes); padding rows ignored.
  touching = np.array([[0, 0, 4, 4], [4, 0, 8, 4], [0, 0, 9, 9]])
  assert not lpg_tables.overlapping_classes(touching, np.array([1, 2, -1]))
