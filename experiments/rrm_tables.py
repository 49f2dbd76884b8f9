"""RRM Tables 1, 2 and 5 on the embedded benchmark, over seeds.

  python experiments/rrm_tables.py [--seeds=0,1,2] [--tables=2,1,5]
      [--ratios=0.1,0.2,0.3,0.4,0.6,0.8,1.0] [--override=field=value ...]

Table 2: {CAM labels, RRM labels} x {CE, CE + energy}
(`configs/rrm.py:cam_ce_only`, `:cam_labels`, `:ce_only`, the default).
Table 1: the reliable-region ratio of Eq. (6) swept with the joint loss
(`rrm.reliable_ratio`).  Table 5: the two-step variant
(`configs/rrm.py:two_step`) against the one-step network it labels with
(the default run's stages when its workdir exists, copied, not retrained;
paper: ResNet-38 one step 62.6, DeepLab-v2 second step 66.3).  Every run
of a seed starts from the same classification stage (computed once per
seed, copied into the other runs' workdirs).  Writes
experiments/out/rrm/tables_<tables>.{md,json} with the per-seed val mIoU,
mean ± s.d., and the paper's claims checked seed by seed: RRM labels > CAM
labels, joint loss > CE only, a middle ratio (0.3, 0.4) above both ends
(0.1, 1.0), two-step > one-step.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any, Sequence

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import sweep  # pylint: disable=g-import-not-at-top,wrong-import-position
from wsss_jax import run  # pylint: disable=g-import-not-at-top,wrong-import-position



def _define_flags() -> None:
  """Defined only when run as a script, so that tests can import the table
  functions next to other experiment scripts' flags."""
  flags.DEFINE_list('seeds', ['0', '1', '2'], 'Training seeds.')
  flags.DEFINE_list('tables', ['2', '1', '5'], 'Which tables to run.')
  flags.DEFINE_list('ratios', ['0.1', '0.2', '0.3', '0.4', '0.6', '0.8',
                               '1.0'], 'Table 1 ratios.')
  flags.DEFINE_multi_string(
      'override', [], 'field=value config overrides applied to every run.')
  flags.DEFINE_string('out', 'experiments/out', 'Output root.')
  flags.DEFINE_list(
      'previous', [], 'tables_*.json files of earlier runs of this script '
      'whose rows join the tables (a row run now replaces the same row and '
      'seed from them), e.g. Table 2 for a Table 1 sweep.')


FLAGS = flags.FLAGS
SHARED_STAGES = ('classify',)
# The two-step variant's first step is the default run's, stage for stage.
ONE_STEP_STAGES = ('classify', 'train', 'cam_quality')
# Paper values (VOC val mIoU, %): Table 2 and Table 1.
TABLE2 = (('CAM + CE', 'cam_ce_only', 46.1), ('CAM + joint', 'cam_labels', 55.7),
          ('RRM + CE', 'ce_only', 48.5), ('RRM + joint', 'rrm', 62.6))
TABLE1 = {0.1: 42.8, 0.2: 62.3, 0.3: 62.6, 0.4: 62.6, 0.6: 60.9, 0.8: 59.4,
          1.0: 58.2}
DEFAULT_RATIO = 0.4   # configs/rrm.py: the 'rrm' row of Table 2 is this one


def _row_key(variant: str, ratio: float | None) -> str:
  return variant if ratio is None else f'ratio={ratio:g}'


def run_rows(seeds: Sequence[int], rows: Sequence[tuple[str, float | None]],
             overrides: Sequence[str], root: str) -> list[dict[str, Any]]:
  """Runs every (variant, ratio) row for every seed; returns result rows."""
  run.configure_logging()
  out = []
  for seed in seeds:
    donor = None
    for variant, ratio in rows:
      extra = [] if ratio is None else [f'rrm.reliable_ratio={ratio}']
      config = sweep.sweep_config('configs/rrm.py', variant, seed,
                                  list(overrides) + extra)
      workdir = os.path.join(root, f'{_row_key(variant, ratio)}-seed{seed}')
      # The default run's stages when it exists (earlier Table 2 runs), so
      # every row of a seed starts from the same classifier.
      default_run = os.path.join(root, f'rrm-seed{seed}')
      if not os.path.isdir(default_run) or workdir == default_run:
        default_run = donor
      if default_run is not None:
        sweep.copy_shared_stages(
            default_run, workdir,
            ONE_STEP_STAGES if variant == 'two_step' else SHARED_STAGES)
      results = run.train_and_evaluate(config, workdir)
      donor = donor or workdir
      labels = results['rrm'].get('reliable_labels', {})
      out.append({'row': _row_key(variant, ratio), 'seed': int(seed),
                  'val_miou': results['val']['miou'],
                  'val_miou_without_crf': results['rrm'].get(
                      'val_miou_without_crf'),
                  'cam_miou': results['rrm'].get('cam_miou'),
                  'labelled_pct': labels.get('labelled_pct'),
                  'precision': labels.get('precision'),
                  'wall_s': results['wall_s']})
      if 'one_step' in results['rrm']:
        out[-1]['one_step_val_miou'] = results['rrm']['one_step']['val_miou']
        out[-1]['label_miou'] = (results.get('pseudo') or {}).get('miou')
      print(json.dumps(out[-1]), flush=True)
  return out


def merge_previous(rows: Sequence[dict[str, Any]], paths: Sequence[str]
                   ) -> list[dict[str, Any]]:
  """`rows` plus the rows of earlier outputs (`paths`) not run now."""
  done = {(r['row'], r['seed']) for r in rows}
  merged = list(rows)
  for path in paths:
    with open(path) as f:
      for row in json.load(f)['rows']:
        if (row['row'], row['seed']) not in done:
          merged.append(row)
          done.add((row['row'], row['seed']))
  return merged


def _values(rows, key):
  if key == _row_key('rrm', DEFAULT_RATIO) and not any(
      r['row'] == key for r in rows):
    key = 'rrm'                        # Table 2's default run
  return {r['seed']: r['val_miou'] for r in rows if r['row'] == key}


_cell = sweep.mean_sd_cell


def claim(rows, better: Sequence[str], worse: Sequence[str]) -> dict:
  """Whether every `better` row beats every `worse` row, seed by seed."""
  seeds = sorted({r['seed'] for r in rows})
  per_seed = {}
  for seed in seeds:
    best_of_worse = [v for k in worse for s, v in _values(rows, k).items()
                     if s == seed]
    worst_of_better = [v for k in better for s, v in _values(rows, k).items()
                       if s == seed]
    if best_of_worse and worst_of_better:
      per_seed[seed] = min(worst_of_better) > max(best_of_worse)
  return {'holds_in': sum(per_seed.values()), 'seeds': len(per_seed),
          'per_seed': per_seed}


def tables(rows: Sequence[dict[str, Any]], ratios: Sequence[float]
           ) -> tuple[str, dict[str, dict]]:
  """The markdown tables and the claims checked."""
  seeds = sorted({r['seed'] for r in rows})
  head = ('| row | paper (VOC val) | ' + ' | '.join(f'seed {s}' for s in seeds)
          + ' | mean ± s.d. |')
  rule = '| --- | --- | ' + ' | '.join('---' for _ in seeds) + ' | --- |'

  def line(name, key, paper):
    values = _values(rows, key)
    return (f'| {name} | {paper} | ' + ' | '.join(
        f'{values[s]:.1f}' if s in values else '–' for s in seeds)
            + f' | {_cell(values)} |')
  lines = []
  table2 = [line(name, key, paper) for name, key, paper in TABLE2
            if _values(rows, key)]
  if table2:
    lines += ['**Table 2** (pseudo-masks × loss)', '', head, rule] + table2
  swept = any(r['row'].startswith('ratio=') for r in rows)
  ratio_rows = [(f'ratio {r:g}', _row_key('rrm', r), TABLE1.get(r, '–'))
                for r in ratios if swept and _values(rows, _row_key('rrm', r))]
  if ratio_rows:
    lines += ['', '**Table 1** (reliable-region ratio, joint loss)', '', head,
              rule] + [line(*row) for row in ratio_rows]
  two_step = [r for r in rows if r['row'] == 'two_step']
  if two_step:
    # Each two-step run scores the one-step network it labels with.
    by_key = {'one_step': {r['seed']: r['one_step_val_miou']
                           for r in two_step},
              'two_step': {r['seed']: r['val_miou'] for r in two_step},
              'labels': {r['seed']: r['label_miou'] for r in two_step
                         if r.get('label_miou') is not None}}
    names = (('one-step', 'one_step', 62.6), ('two-step', 'two_step', 66.3),
             ("the second step's labels (train mIoU)", 'labels', '–'))
    lines += ['', '**Table 5** (one step against two steps)', '', head, rule]
    for name, key, paper in names:
      values = by_key[key]
      if values:
        lines.append(f'| {name} | {paper} | ' + ' | '.join(
            f'{values[s]:.1f}' if s in values else '–' for s in seeds)
                     + f' | {_cell(values)} |')
  checks = {}
  if two_step:
    per_seed = {r['seed']: r['val_miou'] > r['one_step_val_miou']
                for r in two_step}
    checks['two-step > one-step'] = {'holds_in': sum(per_seed.values()),
                                     'seeds': len(per_seed),
                                     'per_seed': per_seed}
  if _values(rows, 'rrm') and _values(rows, 'cam_labels'):
    checks['RRM labels > CAM labels (joint)'] = claim(rows, ['rrm'],
                                                      ['cam_labels'])
  if _values(rows, 'ce_only') and _values(rows, 'cam_ce_only'):
    checks['RRM labels > CAM labels (CE)'] = claim(rows, ['ce_only'],
                                                   ['cam_ce_only'])
  if _values(rows, 'rrm') and _values(rows, 'ce_only'):
    checks['joint > CE only (RRM labels)'] = claim(rows, ['rrm'], ['ce_only'])
  middle = [_row_key('rrm', r) for r in (0.3, 0.4) if r in ratios]
  ends = [_row_key('rrm', r) for r in (0.1, 1.0) if r in ratios]
  if middle and ends and all(_values(rows, k) for k in middle + ends):
    checks['middle ratio (0.3, 0.4) > both ends (0.1, 1.0)'] = claim(
        rows, middle, ends)
  if checks:
    lines += ['', 'Claims, seed by seed:', '']
    for name, result in checks.items():
      verdict = ('holds' if result['holds_in'] == result['seeds']
                 else 'DOES NOT HOLD' if result['holds_in'] == 0
                 else 'mixed')
      lines.append(f"- {name}: {verdict} ({result['holds_in']} of "
                   f"{result['seeds']} seeds)")
  return '\n'.join(lines).lstrip('\n'), checks


def main(argv):
  del argv
  root = os.path.join(FLAGS.out, 'rrm')
  ratios = [float(r) for r in FLAGS.ratios]
  rows_to_run: list[tuple[str, float | None]] = []
  if '2' in FLAGS.tables:
    rows_to_run += [(variant, None) for _, variant, _ in TABLE2]
  if '1' in FLAGS.tables:
    rows_to_run += [('rrm', r) for r in ratios
                    if not (r == DEFAULT_RATIO and '2' in FLAGS.tables)]
  if '5' in FLAGS.tables:
    # Copies the default run's first step when that run exists.
    rows_to_run.append(('two_step', None))
  rows = run_rows([int(s) for s in FLAGS.seeds], rows_to_run,
                  FLAGS.override, root)
  rows = merge_previous(rows, FLAGS.previous)
  if '1' in FLAGS.tables:
    # Every ratio with rows (earlier runs' too), and the default run's.
    ratios = sorted(set(ratios) | {
        float(r['row'][len('ratio='):]) for r in rows
        if r['row'].startswith('ratio=')} | (
            {DEFAULT_RATIO} if any(r['row'] == 'rrm' for r in rows) else set()))
  table, checks = tables(rows, ratios)
  print(table)
  # One file per table selection: a Table 5 run keeps Table 2's file.
  sweep.write_outputs(root, 'tables_' + '_'.join(FLAGS.tables), table,
                      {'rows': rows, 'checks': checks,
                       'overrides': FLAGS.override})


if __name__ == '__main__':
  _define_flags()
  app.run(main)
