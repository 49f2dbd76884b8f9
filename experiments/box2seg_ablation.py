"""Box2Seg Table 3 on the embedded benchmark: every variant, same seed/budget.

  python experiments/box2seg_ablation.py [--variants=box,grabcut,...]
      [--seeds=0] [--override=box2seg.fill_rate_reduction=mean ...]

Runs `configs/box2seg.py:<variant>` for each variant and seed (each in its own
workdir under experiments/out/box2seg/), then writes a markdown table of val
mIoU (experiments/out/box2seg_ablation.md) and the JSON rows.  The label
stages (box fills B, GrabCut M) are identical for every variant, so they are
computed by the first run and copied into the others' workdirs (their stage
markers make the copies count as complete).
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
    'variants', ['box', 'grabcut', 'affinity', 'aw_box', 'aw_fr', 'box2seg'],
    'Table 3 rows to run.')
_SEEDS = flags.DEFINE_list('seeds', ['0'], 'Training seeds.')
_OVERRIDES = flags.DEFINE_multi_string(
    'override', [], 'field=value config overrides (e.g. '
    'box2seg.fill_rate_reduction=mean), applied to every run.')
_TAG = flags.DEFINE_string('tag', '', 'Suffix of the output folder.')
_OUT = flags.DEFINE_string('out', 'experiments/out', 'Output root.')

SHARED_STAGES = ('box_labels', 'grabcut')
PAPER = {'box': 59.3, 'grabcut': 72.7, 'affinity': 73.9, 'aw_box': 74.1,
         'aw_fr': 74.6, 'box2seg': 74.9}


def main(argv):
  del argv
  root = os.path.join(_OUT.value, 'box2seg' + (f'-{_TAG.value}'
                                               if _TAG.value else ''))
  rows = []
  for variant, seed, results in sweep.run_sweep(
      'configs/box2seg.py', _VARIANTS.value, [int(s) for s in _SEEDS.value],
      _OVERRIDES.value, root, SHARED_STAGES):
    training = results['training'].get('train', {})
    rows.append({'variant': variant, 'seed': seed,
                 'val_miou': results['val']['miou'],
                 'per_class_iou': results['val']['per_class_iou'],
                 'box_miou': results['box2seg'].get('box_miou'),
                 'grabcut_miou': results['box2seg'].get('grabcut_miou'),
                 'wall_s': results['wall_s'],
                 'train_images_per_second': training.get('images_per_second')})
    print(json.dumps(rows[-1]), flush=True)
  lines = ['| variant | paper (VOC val) | ' + ' | '.join(
      f'seed {s}' for s in _SEEDS.value) + ' | mean ± s.d. |',
           '| --- | --- | ' + ' | '.join('---' for _ in _SEEDS.value)
           + ' | --- |']
  for variant in _VARIANTS.value:
    values = [r['val_miou'] for r in rows if r['variant'] == variant]
    spread = (f' ± {statistics.stdev(values):.1f}' if len(values) > 1
              else '')
    lines.append(f'| {variant} | {PAPER.get(variant, "–")} | ' + ' | '.join(
        f'{v:.1f}' for v in values) + f' | {statistics.mean(values):.1f}'
                 f'{spread} |')
  first = rows[0]
  lines.append('')
  lines.append(f"Pseudo-masks on train: B (box fills) {first['box_miou']:.1f},"
               f" M (GrabCut) {first['grabcut_miou']:.1f} mIoU.")
  table = '\n'.join(lines)
  print(table)
  sweep.write_outputs(root, 'ablation', table,
                      {'rows': rows, 'overrides': _OVERRIDES.value})


if __name__ == '__main__':
  app.run(main)
