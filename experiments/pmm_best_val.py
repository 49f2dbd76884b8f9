"""PMM's cyclic round with the official best-val checkpoint selection against
the final checkpoint, on the embedded benchmark, over seeds.

  python experiments/pmm_best_val.py [--seeds=0,1,2] [--eval_every=30]
      [--override=field=value ...]

Per seed it takes the default run of `experiments/pmm_tables.py`
(experiments/out/pmm/pmm-seed<k>, which it runs when missing), copies its
stages before the segmenter into best_val-seed<k> and reruns the rounds with
`pmm.cyclic_checkpoint=best_val` and `train.eval_every`: round 1 then
validates with the test protocol every `eval_every` steps and its best
validation labels round 2.  Writes experiments/out/pmm/best_val.{md,json}:
per seed the step and validation score chosen, the labels' mIoU and the
final val mIoU of both selections.  Use the same --override values as the
default runs (RESULTS.md §14: pmm.multicrop_train=True).
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any, Sequence

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import pmm_tables  # pylint: disable=g-import-not-at-top,wrong-import-position
import sweep  # pylint: disable=g-import-not-at-top,wrong-import-position
from wsss_jax import run  # pylint: disable=g-import-not-at-top,wrong-import-position


def _define_flags() -> None:
  """Defined only when run as a script (tests import the functions)."""
  flags.DEFINE_list('seeds', ['0', '1', '2'], 'Training seeds.')
  flags.DEFINE_integer('eval_every', 30, 'Validation period of round 1.')
  flags.DEFINE_multi_string(
      'override', [], 'field=value config overrides applied to every run.')
  flags.DEFINE_string('out', 'experiments/out', 'Output root.')


FLAGS = flags.FLAGS


def seed_row(seed: int, final: dict[str, Any], best: dict[str, Any]
             ) -> dict[str, Any]:
  """One seed's comparison from the results.json of the final-checkpoint
  run (`final`) and of the best-val run (`best`)."""
  final_rounds, best_rounds = final['pmm']['rounds'], best['pmm']['rounds']
  selected = best_rounds[0].get('selected_checkpoint') or {}
  return {
      'seed': seed,
      'round1_final_val': final_rounds[0]['val_miou'],
      'selected_step': selected.get('step'),
      'selected_score': selected.get('val_miou'),
      'selection_images': selected.get('max_images'),
      'labels_final': final_rounds[1].get('label_miou'),
      'labels_best_val': best_rounds[1].get('label_miou'),
      'val_final': final_rounds[1]['val_miou'],
      'val_best_val': best_rounds[1]['val_miou'],
  }


def table(rows: Sequence[dict[str, Any]], num_steps: int) -> str:
  """The markdown table of `seed_row`s with mean ± s.d. of the differences."""
  lines = [
      '| seed | step chosen (of %d) | its val score | round-2 labels: final / '
      'best-val | round-2 val: final / best-val | difference |' % num_steps,
      '| --- | --- | --- | --- | --- | --- |']
  for r in rows:
    lines.append(
        f"| {r['seed']} | {r['selected_step']} | {r['selected_score']:.1f} | "
        f"{r['labels_final']:.1f} / {r['labels_best_val']:.1f} | "
        f"{r['val_final']:.1f} / {r['val_best_val']:.1f} | "
        f"{r['val_best_val'] - r['val_final']:+.1f} |")
  diffs = {r['seed']: r['val_best_val'] - r['val_final'] for r in rows}
  lines.append(f'| mean ± s.d. | | | | | {sweep.mean_sd_cell(diffs)} |')
  return '\n'.join(lines)


def main(argv):
  del argv
  seeds = [int(s) for s in FLAGS.seeds]
  root = os.path.join(FLAGS.out, 'pmm')
  rows, num_steps = [], 0
  for seed in seeds:
    default_dir = os.path.join(root, f'pmm-seed{seed}')
    config = sweep.sweep_config('configs/pmm.py', '', seed,
                                list(FLAGS.override))
    final = run.train_and_evaluate(config, default_dir)
    workdir = os.path.join(root, f'best_val-seed{seed}')
    sweep.copy_shared_stages(default_dir, workdir, pmm_tables.SHARED_STAGES)
    config = sweep.sweep_config(
        'configs/pmm.py', '', seed, list(FLAGS.override) + [
            'pmm.cyclic_checkpoint=best_val',
            f'train.eval_every={FLAGS.eval_every}'])
    num_steps = int(config.train.num_steps)
    best = run.train_and_evaluate(config, workdir)
    rows.append(seed_row(seed, final, best))
    print(json.dumps(rows[-1]), flush=True)
  text = ('# PMM: best-val against final checkpoint for the cyclic round\n\n'
          + table(rows, num_steps) + '\n')
  sweep.write_outputs(root, 'best_val', text, {'rows': rows})
  print(text)


if __name__ == '__main__':
  _define_flags()
  app.run(main)
