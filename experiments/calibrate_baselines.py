"""Supervised (upper bound) vs box baseline (lower bound) on the benchmark.

  python experiments/calibrate_baselines.py --seeds=0,1,2

Runs `configs/supervised.py` and `configs/box_baseline.py` with their default
settings for each training seed (same dataset), then writes
experiments/out/calibrate_baselines.json and prints a markdown table of val
mIoU, pseudo-mask mIoU and wall time.  The benchmark is calibrated when the
supervised run is clearly above the box baseline (gap >= 8 mIoU).
"""

from __future__ import annotations

import json
import os
import statistics

from absl import app, flags

from wsss_jax import run

_SEEDS = flags.DEFINE_list('seeds', ['0', '1', '2'], 'Training seeds.')
_OUT = flags.DEFINE_string('out', 'experiments/out', 'Output folder.')
_CONFIGS = flags.DEFINE_list('configs', ['supervised', 'box_baseline'],
                             'Config files under configs/.')

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(name: str, variant: str = ''):
  return run.load_config_file(
      os.path.join(REPO, 'configs', f'{name}.py'), variant)


def main(argv):
  del argv
  run.configure_logging()
  rows = []
  for seed in (int(s) for s in _SEEDS.value):
    for name in _CONFIGS.value:
      config = load_config(name)
      config.seed = seed
      workdir = os.path.join(_OUT.value, 'runs', f'{name}-seed{seed}')
      results = run.train_and_evaluate(config, workdir)
      rows.append({'config': name, 'seed': seed,
                   'val_miou': results['val']['miou'],
                   'pseudo_miou': (results['pseudo'] or {}).get('miou'),
                   'wall_s': results['wall_s'],
                   'per_class_iou': results['val']['per_class_iou']})
      print(json.dumps(rows[-1]), flush=True)
  summary = {}
  for name in _CONFIGS.value:
    values = [r['val_miou'] for r in rows if r['config'] == name]
    summary[name] = {'mean': statistics.mean(values),
                     'stdev': statistics.pstdev(values), 'runs': values}
  os.makedirs(_OUT.value, exist_ok=True)
  with open(os.path.join(_OUT.value, 'calibrate_baselines.json'), 'w') as f:
    json.dump({'rows': rows, 'summary': summary}, f, indent=2)
  print('\n| config | seed | val mIoU | pseudo-mask mIoU (train) | wall (s) |')
  print('| --- | --- | --- | --- | --- |')
  for r in rows:
    pseudo = f"{r['pseudo_miou']:.1f}" if r['pseudo_miou'] is not None else '–'
    print(f"| {r['config']} | {r['seed']} | {r['val_miou']:.1f} | {pseudo} | "
          f"{r['wall_s']:.0f} |")
  for name, values in summary.items():
    print(f"\n{name}: mean {values['mean']:.1f} ± {values['stdev']:.1f}")


if __name__ == '__main__':
  app.run(main)
