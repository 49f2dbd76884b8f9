"""PMM Tables 2, 4 and 5 on the embedded benchmark, over seeds.

  python experiments/pmm_tables.py [--seeds=0,1,2] [--override=field=value ...]

Per seed, the default run (`configs/pmm.py`: PUS clamp, one cycle) gives
Table 2 (the pseudo-masks of its `pseudo_masks` stage: CAM at the best
threshold, CRF, CRF & CVS, PPMG without CVS, PPMG; train-split mIoU) and
Table 5 (round 1 = zero cycles, round 2 = one cycle; val mIoU).  Table 4's
other rows (`:pus_none`, `:pus_pow`, `:pus_ignore`) train round 1's
segmenter only (`pmm.cycles=0`) on the same pseudo-masks: the default run's
stages before the segmenter are copied into their workdirs.  Writes
experiments/out/pmm/tables.{md,json} with the per-seed numbers, mean ± s.d.
and the paper's claims checked seed by seed: PPMG > CRF, CVS helps (CRF &
CVS > CRF, PPMG > PPMG without CVS), the proportion rule alone (PPMG
without CVS > CRF), clamp >= ignore, pow >= no PUS, one cycle > zero
cycles.  RESULTS.md §14 ran it with `--override=pmm.multicrop_train=True`
(the paper's pipeline, multi-crop training included).
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
  """Defined only when run as a script (tests import the functions)."""
  flags.DEFINE_list('seeds', ['0', '1', '2'], 'Training seeds.')
  flags.DEFINE_list('variants', ['pus_none', 'pus_pow', 'pus_ignore'],
                    "Table 4's rows besides the default (clamp).")
  flags.DEFINE_multi_string(
      'override', [], 'field=value config overrides applied to every run.')
  flags.DEFINE_string('out', 'experiments/out', 'Output root.')


FLAGS = flags.FLAGS
# What the Table 4 runs take from the default run of their seed.
SHARED_STAGES = ('classify', 'base_mask', 'classify_multicrop',
                 'pseudo_masks')
# Paper values (VOC val mIoU, %).
TABLE2 = (('CAM', 'cam', 58.21), ('CRF', 'crf', 59.19),
          ('CRF & CVS', 'crf_cvs', 60.83),
          ('PPMG w/o CVS', 'ppmg_no_cvs', 61.23), ('PPMG', 'ppmg', 61.49))
TABLE4 = (('no PUS', 'pus_none', 64.86), ('pow', 'pus_pow', 64.92),
          ('ignore', 'pus_ignore', 65.44), ('clamp', 'pus_clamp', 66.73))
TABLE5 = (('0 cycles', 'cycles=0', 66.73), ('1 cycle', 'cycles=1', 68.50))


def default_rows(seed: int, results: dict[str, Any]) -> list[dict[str, Any]]:
  """Table 2, 4 (clamp) and 5 rows of one default run's results.json."""
  pmm = results['pmm']
  masks = pmm.get('pseudo_masks') or {}
  rows = [{'table': 2, 'row': 'cam', 'seed': seed,
           'miou': pmm.get('cam_miou'),
           'threshold': pmm.get('cam_threshold')}]
  rows += [{'table': 2, 'row': name, 'seed': seed, 'miou': masks.get(name)}
           for _, name, _ in TABLE2[1:]]
  rounds = pmm['rounds']
  rows.append({'table': 4, 'row': 'pus_clamp', 'seed': seed,
               'miou': rounds[0]['val_miou'],
               'without_crf': rounds[0].get('val_miou_without_crf')})
  for k, row in enumerate(rounds):
    rows.append({'table': 5, 'row': f'cycles={k}', 'seed': seed,
                 'miou': row['val_miou'],
                 'without_crf': row.get('val_miou_without_crf'),
                 'label_miou': row.get('label_miou')})
  return rows


def run_rows(seeds: Sequence[int], variants: Sequence[str],
             overrides: Sequence[str], root: str) -> list[dict[str, Any]]:
  """Every seed's default run, then its Table 4 variants."""
  run.configure_logging()
  rows = []
  for seed in seeds:
    default_dir = os.path.join(root, f'pmm-seed{seed}')
    config = sweep.sweep_config('configs/pmm.py', '', seed, overrides)
    results = run.train_and_evaluate(config, default_dir)
    rows += default_rows(seed, results)
    rows[-1]['wall_s'] = results['wall_s']
    for variant in variants:
      workdir = os.path.join(root, f'{variant}-seed{seed}')
      sweep.copy_shared_stages(default_dir, workdir, SHARED_STAGES)
      config = sweep.sweep_config('configs/pmm.py', variant, seed,
                                  list(overrides) + ['pmm.cycles=0'])
      results = run.train_and_evaluate(config, workdir)
      first = results['pmm']['rounds'][0]
      rows.append({'table': 4, 'row': variant, 'seed': seed,
                   'miou': first['val_miou'],
                   'without_crf': first.get('val_miou_without_crf')})
      print(json.dumps(rows[-1]), flush=True)
  return rows


def _values(rows, table: int, key: str) -> dict[int, float]:
  return {r['seed']: r['miou'] for r in rows
          if r['table'] == table and r['row'] == key
          and r['miou'] is not None}


_cell = sweep.mean_sd_cell


def claim(rows, table: int, better: str, worse: str, *,
          ties_hold: bool = False) -> dict[str, Any]:
  """Whether row `better` beats row `worse` of `table`, seed by seed (with
  `ties_hold`, ≥)."""
  high, low = _values(rows, table, better), _values(rows, table, worse)
  per_seed = {seed: (high[seed] >= low[seed] if ties_hold
                     else high[seed] > low[seed])
              for seed in sorted(set(high) & set(low))}
  return {'claim': f'{better} {">=" if ties_hold else ">"} {worse}',
          'table': table, 'holds_in': sum(per_seed.values()),
          'seeds': len(per_seed), 'per_seed': per_seed,
          'difference': [round(high[s] - low[s], 2) for s in per_seed]}


CLAIMS = ((2, 'ppmg', 'crf', False), (2, 'crf_cvs', 'crf', False),
          (2, 'ppmg_no_cvs', 'crf', False),
          (2, 'ppmg', 'ppmg_no_cvs', False), (4, 'pus_clamp', 'pus_ignore',
                                              True),
          (4, 'pus_pow', 'pus_none', True), (4, 'pus_clamp', 'pus_none',
                                             False),
          (5, 'cycles=1', 'cycles=0', False))


def tables(rows: Sequence[dict[str, Any]]) -> tuple[str, list[dict]]:
  """The markdown tables and the checked claims."""
  seeds = sorted({r['seed'] for r in rows})
  head = '| row | paper (VOC val) | ' + ' | '.join(
      f'seed {s}' for s in seeds) + ' | mean ± s.d. |'
  rule = '| --- | --- | ' + ' | '.join('---' for _ in seeds) + ' | --- |'
  out = []
  for number, spec, what in (
      (2, TABLE2, 'pseudo-mask mIoU on the first `pmm.compare_images` '
       'training images'),
      (4, TABLE4, 'val mIoU (test CRF) of round 1'),
      (5, TABLE5, 'val mIoU (test CRF) after each round')):
    out += [f'Table {number}: {what}.', '', head, rule]
    for label, key, paper in spec:
      values = _values(rows, number, key)
      out.append(f'| {label} | {paper:.2f} | ' + ' | '.join(
          f'{values[s]:.1f}' if s in values else '–' for s in seeds)
                 + f' | {_cell(values)} |')
    out.append('')
  checks = [claim(rows, *spec[:3], ties_hold=spec[3]) for spec in CLAIMS]
  out += ['| claim | holds in | differences |', '| --- | --- | --- |']
  out += [f"| Table {c['table']}: {c['claim']} | {c['holds_in']}/"
          f"{c['seeds']} | {', '.join(f'{d:+.1f}' for d in c['difference'])}"
          ' |' for c in checks]
  return '\n'.join(out), checks


def main(argv):
  del argv
  root = os.path.join(FLAGS.out, 'pmm')
  rows = run_rows([int(s) for s in FLAGS.seeds], FLAGS.variants,
                  FLAGS.override, root)
  table, checks = tables(rows)
  print(table)
  sweep.write_outputs(root, 'tables', table,
                      {'rows': rows, 'checks': checks,
                       'overrides': FLAGS.override})


if __name__ == '__main__':
  _define_flags()
  app.run(main)
