"""BANA Tables 1, 3 and 4 on the embedded benchmark (same seed and budget).

  python experiments/bana_tables.py [--seeds=0] [--variants=...]

Runs `configs/bana.py:<variant>` for the stage-3 rows (nal, ce_only,
entropy_reg, bootstrap: Table 3; crf_only, ret_only: Table 4).  Stages 1-2
(the BAP and GAP Labelers and their pseudo-labels) do not depend on the
stage-3 loss: the first run computes them and the others reuse them, so
every row trains on the same Y_crf / Y_ret.  Writes
experiments/out/bana/tables.md (+ .json) with:

  Table 1  pseudo-label mIoU on train of GAP / BAP Y_crf, Y_ret and the
           agreement region (with its coverage)
  Table 3  val mIoU with and without the CRF per treatment of ~S
  Table 4  Y_crf only / Y_ret only / both with NAL

and checks the paper's orderings (BAP Y_crf > GAP Y_crf; Y_crf > Y_ret;
NAL >= ce_only, entropy_reg, bootstrap; NAL >= crf_only, ret_only).
"""

from __future__ import annotations

import json
import os
import statistics
import sys

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import sweep  # pylint: disable=g-import-not-at-top,wrong-import-position

_VARIANTS = flags.DEFINE_list(
    'variants', ['nal', 'ce_only', 'entropy_reg', 'bootstrap', 'crf_only',
                 'ret_only'], 'Stage-3 rows to run (the first computes the '
    'shared stages 1-2).')
_SEEDS = flags.DEFINE_list('seeds', ['0'], 'Training seeds of stage 3.')
_OVERRIDES = flags.DEFINE_multi_string(
    'override', [], 'field=value config overrides applied to every run.')
_TAG = flags.DEFINE_string('tag', '', 'Suffix of the output folder.')
_OUT = flags.DEFINE_string('out', 'experiments/out', 'Output root.')

SHARED_STAGES = ('classifier', 'labels', 'gap_classifier', 'gap_labels')
# Paper numbers (VOC): Table 1 train mIoU; Table 3 val before / after CRF;
# Table 4 val.
PAPER_T1 = {('gap', 'y_crf'): 75.5, ('bap', 'y_crf'): 78.7,
            ('bap', 'y_ret'): 70.8, ('bap', 'agreement'): 85.3}
PAPER_T3 = {'ce_only': (61.8, 67.5), 'entropy_reg': (61.4, 67.3),
            'bootstrap': (61.9, 67.6), 'nal': (62.4, 68.1)}
PAPER_T4 = {'crf_only': 67.8, 'ret_only': 66.1, 'nal': 68.1}


def _mean(rows, variant, key):
  values = [r[key] for r in rows if r['variant'] == variant and
            r[key] is not None]
  return statistics.mean(values) if values else float('nan')


def tables(rows: list[dict], pseudo: dict) -> tuple[str, dict[str, bool]]:
  """The markdown tables and the ordering checks."""
  lines = ['### Table 1: pseudo-labels (train mIoU)', '',
           '| labeller | label | paper (VOC train) | benchmark | images |',
           '| --- | --- | --- | --- | --- |']
  # GAP labels exist for the first `bana.gap_label_images` images; BAP is
  # also scored on those ('bap_on_gap_images') for the comparison.
  for name in ('gap', 'bap_on_gap_images', 'bap'):
    pooling = name.split('_')[0]
    for key in ('y_crf', 'y_ret', 'agreement'):
      value = pseudo.get(name, {}).get(key)
      if value is None or (name != 'bap' and key != 'y_crf'):
        continue
      note = ''
      if key == 'agreement':
        note = (f" ({pseudo[name].get('agreement_coverage_pct', 0):.1f} %"
                ' of pixels)')
      images = pseudo[name].get('images')
      lines.append(f'| {pooling.upper()} | {key} | '
                   f'{PAPER_T1.get((pooling, key), "–")} | '
                   f'{value:.1f}{note} | {images} |')
  lines += ['', '### Table 3: treatment of ~S (val mIoU, without / with '
            'CRF)', '', '| stage-3 loss | paper (VOC val) | benchmark '
            'without CRF | with CRF |', '| --- | --- | --- | --- |']
  for variant in ('ce_only', 'entropy_reg', 'bootstrap', 'nal'):
    if any(r['variant'] == variant for r in rows):
      paper = PAPER_T3[variant]
      lines.append(f'| {variant} | {paper[0]} / {paper[1]} | '
                   f'{_mean(rows, variant, "val_miou_without_crf"):.1f} | '
                   f'{_mean(rows, variant, "val_miou"):.1f} |')
  lines += ['', '### Table 4: which labels (val mIoU with CRF)', '',
            '| labels | paper (VOC val) | benchmark |', '| --- | --- | --- |']
  for variant in ('crf_only', 'ret_only', 'nal'):
    if any(r['variant'] == variant for r in rows):
      lines.append(f'| {variant} | {PAPER_T4[variant]} | '
                   f'{_mean(rows, variant, "val_miou"):.1f} |')
  checks = {}
  bap, gap = pseudo.get('bap', {}), pseudo.get('gap', {})
  same = pseudo.get('bap_on_gap_images', bap)
  if 'y_crf' in same and 'y_crf' in gap:
    checks['BAP Y_crf > GAP Y_crf'] = same['y_crf'] > gap['y_crf']
  if 'y_crf' in bap and 'y_ret' in bap:
    checks['Y_crf > Y_ret'] = bap['y_crf'] > bap['y_ret']
  nal = _mean(rows, 'nal', 'val_miou')
  for other in ('ce_only', 'entropy_reg', 'bootstrap', 'crf_only',
                'ret_only'):
    if any(r['variant'] == other for r in rows):
      checks[f'NAL >= {other}'] = nal >= _mean(rows, other, 'val_miou')
  lines += ['', '### Orderings of the paper', '']
  lines += [f'- {name}: {"holds" if ok else "DOES NOT HOLD"}'
            for name, ok in checks.items()]
  return '\n'.join(lines), checks


def main(argv):
  del argv
  root = os.path.join(_OUT.value, 'bana' + (f'-{_TAG.value}'
                                            if _TAG.value else ''))
  rows, pseudo = [], {}
  for variant, seed, results in sweep.run_sweep(
      'configs/bana.py', _VARIANTS.value, [int(s) for s in _SEEDS.value],
      _OVERRIDES.value, root, SHARED_STAGES):
    pseudo = pseudo or results['bana']['pseudo_labels']
    rows.append({'variant': variant, 'seed': seed,
                 'val_miou': results['val']['miou'],
                 'val_miou_without_crf':
                     results['bana'].get('val_miou_without_crf'),
                 'per_class_iou': results['val']['per_class_iou'],
                 'wall_s': results['wall_s']})
    print(json.dumps(rows[-1]), flush=True)
  table, checks = tables(rows, pseudo)
  print(table)
  sweep.write_outputs(root, 'tables', table,
                      {'rows': rows, 'pseudo_labels': pseudo,
                       'checks': checks, 'overrides': _OVERRIDES.value})


if __name__ == '__main__':
  app.run(main)
