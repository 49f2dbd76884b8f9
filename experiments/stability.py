"""How much of a config's score is the method and how much is noise.

  python experiments/stability.py --config=configs/supervised.py --seeds=0,1,2
  python experiments/stability.py --config=configs/supervised.py --seeds=0 \\
      --orders=one_device --eval_every=25 --tag=dense        # a dense curve
  python experiments/stability.py --config=configs/box2seg.py:grabcut \\
      --override=optim.lr=0.001 --tag=lr1e-3

Runs the config once per seed and per *rounding order*, each run a separate
`python -m wsss_jax.main` process with its own workdir (an interrupted sweep
resumes: finished runs are read back, unfinished ones resume from their
checkpoints).  The two rounding orders compute the same function with the
floating-point sums in another order, the way another CPU would:

  one_device    the process's single CPU device;
  two_devices   two host devices (`--xla_force_host_platform_device_count=2`),
                the batch split between them: every batch reduction (the
                gradient, BatchNorm's statistics) is summed as two partial
                sums, same semantics (jit + NamedSharding, global statistics).

Writes `experiments/out/stability_<config>[_<tag>].json`:

  runs              [{seed, order, val_miou, pseudo_miou, wall_s, curve
                      [[step, miou], ...]: the final training stage's
                      periodic validations (`train.eval_max_images`
                      images, the last at its final step),
                      max_drop_after_first_third}]
  val_miou          {"<order>/seed<s>": final val mIoU} of every run
  mean, std         over the seeds of the first order (std: sample s.d.)
  rounding_spread   max over seeds of |val(order 1) - val(order 2)|
  per_order         {order: {mean, std, values}}
  max_drop_after_first_third   the largest fall of val mIoU from one periodic
                    evaluation to the next after the first third of training,
                    over all runs (points; 0 when it only rises)

and a .md table and a .png of the validation curves next to it.  Only
compare runs made on one machine (docs/implementation_notes.md).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any, Mapping, Sequence

from absl import app, flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ORDERS = {
    'one_device': '--xla_force_host_platform_device_count=1',
    'two_devices': '--xla_force_host_platform_device_count=2',
}
FINAL_STAGE = 'train'

_CONFIG = flags.DEFINE_string(
    'config', None, 'Config file[:variant], as for wsss_jax.main.')
_SEEDS = flags.DEFINE_list('seeds', ['0', '1', '2'], 'Training seeds.')
_ORDERS = flags.DEFINE_list('orders', list(ORDERS),
                            f'Rounding orders, of {sorted(ORDERS)}.')
_OVERRIDES = flags.DEFINE_multi_string(
    'override', [], "Config overrides 'a.b=value' (each becomes "
    '--config.a.b=value).')
_EVAL_EVERY = flags.DEFINE_integer(
    'eval_every', 0, 'Periodic validation interval (0: the config\'s).')
_TAG = flags.DEFINE_string('tag', '', 'Suffix of the output names.')
_ROOT = flags.DEFINE_string(
    'root', '', 'Run folders (default /tmp/wsss_stability/<name>).')
_OUT = flags.DEFINE_string('out', os.path.join(REPO, 'experiments', 'out'),
                           'Output folder.')
flags.mark_flag_as_required('config')


def output_name(config: str, tag: str) -> str:
  """'configs/box2seg.py:grabcut' + 'x' -> 'stability_box2seg-grabcut_x'."""
  path, _, variant = config.partition(':')
  name = os.path.splitext(os.path.basename(path))[0]
  if variant:
    name += '-' + variant.replace(',', '-')
  return f'stability_{name}' + (f'_{tag}' if tag else '')


def max_drop_after_first_third(curve: Sequence[Sequence[float]],
                               num_steps: int) -> float:
  """Largest fall (points) between consecutive periodic evaluations whose
  later one lies after num_steps / 3; 0 when the curve never falls there.

  curve: [(step, miou), ...] in step order.
  """
  drops = [previous[1] - current[1]
           for previous, current in zip(curve, curve[1:])
           if current[0] > num_steps / 3]
  return max([0.0] + drops)


def rounding_differences(values: Mapping[tuple[str, int], float],
                         orders: Sequence[str],
                         seeds: Sequence[int]) -> list[float]:
  """|val(orders[0], s) - val(orders[1], s)| for every seed run in both."""
  if len(orders) < 2:
    return []
  first, second = orders[:2]
  return [abs(values[(first, s)] - values[(second, s)]) for s in seeds
          if (first, s) in values and (second, s) in values]


def _std(values: Sequence[float]) -> float | None:
  return statistics.stdev(values) if len(values) > 1 else None


def summarise(runs: Sequence[Mapping[str, Any]], orders: Sequence[str],
              seeds: Sequence[int]) -> dict[str, Any]:
  """The JSON's statistics from the per-run records."""
  values = {(r['order'], r['seed']): r['val_miou'] for r in runs}
  per_order = {}
  for order in orders:
    scores = [values[(order, s)] for s in seeds if (order, s) in values]
    per_order[order] = {'mean': statistics.mean(scores) if scores else None,
                        'std': _std(scores), 'values': scores}
  differences = rounding_differences(values, orders, seeds)
  return {
      'val_miou': {f'{order}/seed{seed}': v
                   for (order, seed), v in values.items()},
      'mean': per_order[orders[0]]['mean'],
      'std': per_order[orders[0]]['std'],
      'rounding_spread': max(differences) if differences else None,
      'rounding_differences': differences,
      'per_order': per_order,
      'max_drop_after_first_third': max(
          [r['max_drop_after_first_third'] for r in runs] or [0.0]),
  }


def _read_run(workdir: str) -> dict[str, Any] | None:
  path = os.path.join(workdir, 'results.json')
  if not os.path.exists(path):
    return None
  with open(path) as f:
    results = json.load(f)
  curve = []
  stage_file = os.path.join(workdir, FINAL_STAGE, 'stage.json')
  if os.path.exists(stage_file):
    with open(stage_file) as f:
      history = json.load(f).get('results', {}).get('history', {})
    curve = [[row['step'], row['miou']] for row in history.get('val', [])]
  num_steps = results['full_config']['train']['num_steps']
  return {'val_miou': results['val']['miou'],
          'pseudo_miou': (results.get('pseudo') or {}).get('miou'),
          'wall_s': results.get('wall_s'), 'curve': curve,
          'max_drop_after_first_third': max_drop_after_first_third(
              curve, num_steps)}


def run_one(config: str, seed: int, order: str, overrides: Sequence[str],
            workdir: str) -> dict[str, Any]:
  """Runs (or reads back) one seed in one rounding order."""
  record = _read_run(workdir)
  if record is None:
    env = dict(os.environ)
    env['XLA_FLAGS'] = ' '.join(
        flag for flag in env.get('XLA_FLAGS', '').split()
        if not flag.startswith('--xla_force_host_platform_device_count')
    ) + ' ' + ORDERS[order]
    command = [sys.executable, '-m', 'wsss_jax.main', f'--config={config}',
               f'--workdir={workdir}', f'--config.seed={seed}']
    command += [f'--config.{override}' for override in overrides]
    os.makedirs(workdir, exist_ok=True)
    start = time.time()
    with open(os.path.join(workdir, 'stability.log'), 'a') as log:
      done = subprocess.run(command, cwd=REPO, env=env, stdout=log,
                            stderr=subprocess.STDOUT, check=False)
    if done.returncode != 0:
      raise RuntimeError(f'{order} seed {seed} failed (exit '
                         f'{done.returncode}); see '
                         f'{os.path.join(workdir, "stability.log")}')
    record = _read_run(workdir)
    record['process_seconds'] = round(time.time() - start, 1)
  return {'seed': seed, 'order': order, **record}


def _table(payload: Mapping[str, Any]) -> str:
  lines = [f"# {payload['config']} {' '.join(payload['overrides'])}", '',
           '| order | seed | val mIoU | largest late drop | wall (s) |',
           '| --- | --- | --- | --- | --- |']
  for r in payload['runs']:
    lines.append(f"| {r['order']} | {r['seed']} | {r['val_miou']:.2f} | "
                 f"{r['max_drop_after_first_third']:.2f} | {r['wall_s']} |")
  fmt = lambda v: '–' if v is None else f'{v:.2f}'
  lines += ['', f"mean {fmt(payload['mean'])}, s.d. {fmt(payload['std'])} "
            f"({payload['orders'][0]}); rounding spread "
            f"{fmt(payload['rounding_spread'])}; largest late drop "
            f"{fmt(payload['max_drop_after_first_third'])}"]
  return '\n'.join(lines)


def _plot(payload: Mapping[str, Any], path: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
  styles = dict(zip(payload['orders'], ('o-', 's--', '^:')))
  for r in payload['runs']:
    steps, scores = zip(*r['curve'])
    ax.plot(steps, scores, styles[r['order']], color=f"C{r['seed'] % 10}",
            label=f"seed {r['seed']}, {r['order']}", markersize=3)
  ax.set_xlabel('step')
  ax.set_ylabel('val mIoU (%)')
  ax.set_title(f"{payload['config']} {' '.join(payload['overrides'])}"[:80])
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)


def main(argv):
  del argv
  unknown = set(_ORDERS.value) - set(ORDERS)
  if unknown:
    raise app.UsageError(f'--orders: unknown {sorted(unknown)}; known '
                         f'{sorted(ORDERS)}.')
  name = output_name(_CONFIG.value, _TAG.value)
  root = _ROOT.value or os.path.join('/tmp/wsss_stability', name)
  overrides = list(_OVERRIDES.value)
  if _EVAL_EVERY.value:
    overrides.append(f'train.eval_every={_EVAL_EVERY.value}')
  seeds = [int(s) for s in _SEEDS.value]
  runs = []
  for seed in seeds:
    for order in _ORDERS.value:
      runs.append(run_one(_CONFIG.value, seed, order, overrides,
                          os.path.join(root, f'{order}-seed{seed}')))
      print(json.dumps({k: runs[-1][k] for k in
                        ('seed', 'order', 'val_miou', 'wall_s',
                         'max_drop_after_first_third')}), flush=True)
  payload = {'config': _CONFIG.value, 'overrides': overrides,
             'seeds': seeds, 'orders': list(_ORDERS.value),
             'order_flags': {o: ORDERS[o] for o in _ORDERS.value},
             'runs': runs, **summarise(runs, _ORDERS.value, seeds)}
  os.makedirs(_OUT.value, exist_ok=True)
  base = os.path.join(_OUT.value, name)
  with open(base + '.json', 'w') as f:
    json.dump(payload, f, indent=2)
  with open(base + '.md', 'w') as f:
    f.write(_table(payload) + '\n')
  _plot(payload, base + '.png')
  print(_table(payload))


if __name__ == '__main__':
  app.run(main)
