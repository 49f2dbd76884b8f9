"""BANA Tables 1, 3 and 4 on the embedded benchmark (same seed and budget).

  python experiments/bana_tables.py [--seeds=0] [--variants=...] \
      [--label_seeds=0,1,2]

Runs `configs/bana.py:<variant>` for the stage-3 rows (nal, ce_only,
entropy_reg, bootstrap: Table 3; crf_only, ret_only: Table 4).  Stages 1-2
(the BAP and GAP Labelers and their pseudo-labels) do not depend on the
stage-3 loss: the first run computes them and the others reuse them, so
every row trains on the same Y_crf / Y_ret.  `--label_seeds` adds runs of
stages 1-2 alone with other seeds, so that Table 1 too has a seed spread.
Writes
experiments/out/bana/tables.md (+ .json) with:

  Table 1  pseudo-label mIoU on train of GAP / BAP Y_crf, Y_ret and the
           agreement region (with its coverage), mean ± s.d. over the
           label seeds ('label_rows' in the JSON, for rounding_spread.py)
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


def _define_flags() -> None:
  """Defined only when run as a script, so that tests can import the table
  functions next to other experiment scripts' flags."""
  flags.DEFINE_list(
      'variants', ['nal', 'ce_only', 'entropy_reg', 'bootstrap', 'crf_only',
                   'ret_only'], 'Stage-3 rows to run (the first computes the '
      'shared stages 1-2).')
  flags.DEFINE_list('seeds', ['0'], 'Training seeds of stage 3.')
  flags.DEFINE_multi_string(
      'override', [], 'field=value config overrides applied to every run.')
  flags.DEFINE_list(
      'label_seeds', [], 'More seeds of stages 1-2 for Table 1 over seeds: '
      'each runs only the BAP and GAP Labelers, in <root>/labels-seed<s> (the '
      "first sweep run's seed is always included; Table 3's rows keep training "
      'on its labels).')
  flags.DEFINE_string('tag', '', 'Suffix of the output folder.')
  flags.DEFINE_string('out', 'experiments/out', 'Output root.')


FLAGS = flags.FLAGS
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


def _row_stat(rows, variant, key) -> str:
  """Mean ± s.d. over the seeds of one variant's `key`."""
  values = [r[key] for r in rows if r['variant'] == variant and
            r[key] is not None]
  return _mean_sd(values) if values else '–'


def label_rows(pseudo_by_seed: dict[int, dict]) -> list[dict]:
  """Table 1 as sweep rows: [{variant: '<labeller> <label>', seed, miou}]
  ('bap_on_gap_images y_crf' is BAP on GAP's images), for rounding_spread.py
  --rows=label_rows --key=miou."""
  rows = []
  for seed, pseudo in sorted(pseudo_by_seed.items()):
    for name, values in pseudo.items():
      for key in ('y_crf', 'y_ret', 'agreement'):
        if values.get(key) is not None:
          rows.append({'variant': f'{name} {key}', 'seed': seed,
                       'miou': values[key]})
  return rows


def _mean_sd(values: list[float]) -> str:
  if len(values) < 2:
    return f'{values[0]:.1f}'
  return f'{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}'


def tables(rows: list[dict], pseudo_by_seed: dict[int, dict]
           ) -> tuple[str, dict[str, bool]]:
  """The markdown tables and the ordering checks.

  `pseudo_by_seed`: {seed of stages 1-2: results['bana']['pseudo_labels']};
  Table 1 shows the mean ± s.d. over those seeds and the per-seed values,
  and its orderings are checked per seed (they must hold for every one).
  """
  seeds = sorted(pseudo_by_seed)
  lines = ['### Table 1: pseudo-labels (train mIoU'
           + (f', seeds {", ".join(map(str, seeds))} of stages 1-2)'
              if len(seeds) > 1 else ')'), '',
           '| labeller | label | paper (VOC train) | benchmark | per seed '
           '| images |', '| --- | --- | --- | --- | --- | --- |']
  # GAP labels exist for the first `bana.gap_label_images` images; BAP is
  # also scored on those ('bap_on_gap_images') for the comparison.
  first = pseudo_by_seed[seeds[0]] if seeds else {}
  for name in ('gap', 'bap_on_gap_images', 'bap'):
    pooling = name.split('_')[0]
    for key in ('y_crf', 'y_ret', 'agreement'):
      values = [pseudo_by_seed[s].get(name, {}).get(key) for s in seeds]
      if not values or None in values or (name != 'bap' and key != 'y_crf'):
        continue
      note = ''
      if key == 'agreement':
        coverage = statistics.mean(
            pseudo_by_seed[s][name].get('agreement_coverage_pct', 0)
            for s in seeds)
        note = f' ({coverage:.1f} % of pixels)'
      lines.append(f'| {pooling.upper()} | {key} | '
                   f'{PAPER_T1.get((pooling, key), "–")} | '
                   f'{_mean_sd(values)}{note} | '
                   f'{", ".join(f"{v:.2f}" for v in values)} | '
                   f'{first[name].get("images")} |')
  lines += ['', '### Table 3: treatment of ~S (val mIoU, without / with '
            'CRF, mean ± s.d. over seeds)', '', '| stage-3 loss | paper (VOC val) | benchmark '
            'without CRF | with CRF |', '| --- | --- | --- | --- |']
  for variant in ('ce_only', 'entropy_reg', 'bootstrap', 'nal'):
    if any(r['variant'] == variant for r in rows):
      paper = PAPER_T3[variant]
      lines.append(f'| {variant} | {paper[0]} / {paper[1]} | '
                   f'{_row_stat(rows, variant, "val_miou_without_crf")} | '
                   f'{_row_stat(rows, variant, "val_miou")} |')
  lines += ['', '### Table 4: which labels (val mIoU with CRF)', '',
            '| labels | paper (VOC val) | benchmark |', '| --- | --- | --- |']
  for variant in ('crf_only', 'ret_only', 'nal'):
    if any(r['variant'] == variant for r in rows):
      lines.append(f'| {variant} | {PAPER_T4[variant]} | '
                   f'{_row_stat(rows, variant, "val_miou")} |')
  checks = {}
  for seed in seeds:
    bap, gap = pseudo_by_seed[seed].get('bap', {}), pseudo_by_seed[seed].get(
        'gap', {})
    same = pseudo_by_seed[seed].get('bap_on_gap_images', bap)
    suffix = f' (labels seed {seed})' if len(seeds) > 1 else ''
    if 'y_crf' in same and 'y_crf' in gap:
      checks['BAP Y_crf > GAP Y_crf' + suffix] = same['y_crf'] > gap['y_crf']
    if 'y_crf' in bap and 'y_ret' in bap:
      checks['Y_crf > Y_ret' + suffix] = bap['y_crf'] > bap['y_ret']
  nal = _mean(rows, 'nal', 'val_miou')
  for other in ('ce_only', 'entropy_reg', 'bootstrap', 'crf_only',
                'ret_only'):
    if any(r['variant'] == other for r in rows):
      checks[f'NAL >= {other}'] = nal >= _mean(rows, other, 'val_miou')
  # Table 3's first column (the paper's ordering holds there too).
  nal_raw = _mean(rows, 'nal', 'val_miou_without_crf')
  for other in ('ce_only', 'entropy_reg', 'bootstrap'):
    if any(r['variant'] == other for r in rows):
      checks[f'NAL >= {other} without CRF'] = nal_raw >= _mean(
          rows, other, 'val_miou_without_crf')
  lines += ['', '### Orderings of the paper', '']
  lines += [f'- {name}: {"holds" if ok else "DOES NOT HOLD"}'
            for name, ok in checks.items()]
  return '\n'.join(lines), checks


def main(argv):
  del argv
  root = os.path.join(FLAGS.out, 'bana' + (f'-{FLAGS.tag}'
                                            if FLAGS.tag else ''))
  rows, pseudo_by_seed = [], {}
  for variant, seed, results in sweep.run_sweep(
      'configs/bana.py', FLAGS.variants, [int(s) for s in FLAGS.seeds],
      FLAGS.override, root, SHARED_STAGES):
    if not pseudo_by_seed:
      pseudo_by_seed[seed] = results['bana']['pseudo_labels']
    rows.append({'variant': variant, 'seed': seed,
                 'val_miou': results['val']['miou'],
                 'val_miou_without_crf':
                     results['bana'].get('val_miou_without_crf'),
                 'per_class_iou': results['val']['per_class_iou'],
                 'wall_s': results['wall_s']})
    print(json.dumps(rows[-1]), flush=True)
  for seed in map(int, FLAGS.label_seeds):
    if seed in pseudo_by_seed:
      continue
    config = sweep.sweep_config('configs/bana.py', FLAGS.variants[0], seed,
                                FLAGS.override)
    pipeline, by_stage = sweep.run_first_stages(
        config, os.path.join(root, f'labels-seed{seed}'), SHARED_STAGES)
    pseudo_by_seed[seed] = pipeline.extra_results(by_stage)['pseudo_labels']
    print(json.dumps({'labels_seed': seed, **pseudo_by_seed[seed]}),
          flush=True)
  table, checks = tables(rows, pseudo_by_seed)
  print(table)
  first_seed = min(pseudo_by_seed) if pseudo_by_seed else None
  sweep.write_outputs(root, 'tables', table,
                      {'rows': rows,
                       'pseudo_labels': pseudo_by_seed.get(first_seed, {}),
                       'pseudo_labels_by_seed': {
                           str(s): p for s, p in pseudo_by_seed.items()},
                       'label_rows': label_rows(pseudo_by_seed),
                       'checks': checks, 'overrides': FLAGS.override})


if __name__ == '__main__':
  _define_flags()
  app.run(main)
