"""Wall time of the main jobs as multiples of `supervised`'s, one session.

  python experiments/main_jobs.py [--jobs=supervised,box2seg,bana,supervised]

Runs each job as a user would (`python -m wsss_jax.main --config=configs/<job>.py`,
output to a log file, not a terminal), one after the other, each with cold
data and compilation caches: a fresh `WSSS_JAX_DATA_DIR` and
`WSSS_JAX_XLA_CACHE`, into which only the pretrained benchmark backbone is
copied (it is made once per machine, like a download of ImageNet weights;
`--pretrained_from`, default the usual data folder).  Run it on an idle
machine: the budgets are ratios to `supervised` measured in the same session
(the mean of its runs), because 2-core machines differ ~2x in speed.

Writes `<out>/main_jobs.json` and prints a table: wall, ratio, val mIoU and,
per log, its size, longest line and carriage returns (progress-bar redraws,
which a log file should not have).
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from absl import app, flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from wsss_jax.data import registry  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position
from wsss_jax.pretraining import CACHE_DIR  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position

FLAGS = flags.FLAGS


def _define_flags() -> None:
  """Defined only when run as a script (tests import `log_stats`)."""
  flags.DEFINE_list('jobs', ['supervised', 'box2seg', 'bana', 'supervised'],
                    'Configs, in order.')
  flags.DEFINE_string('out', os.path.join(REPO, 'experiments', 'out',
                                          'main_jobs'), 'Output folder.')
  flags.DEFINE_string(
      'pretrained_from', None, 'Data folder holding the pretrained backbone '
      '(default: $WSSS_JAX_DATA_DIR or ~/.cache/wsss_jax/datasets).')


# Budgets of issue 12, as multiples of supervised's wall time.
BUDGETS = {'box2seg': 2.14, 'bana': 3.43}


def log_stats(path: str) -> dict[str, int]:
  with open(path, 'rb') as f:
    data = f.read()
  return {'log_bytes': len(data), 'carriage_returns': data.count(b'\r'),
          'longest_line': max((len(line) for line in
                               data.replace(b'\r', b'\n').split(b'\n')),
                              default=0)}


def run_job(name: str, index: int, out: str, pretrained: str) -> dict:
  scratch = tempfile.mkdtemp(prefix=f'main_job_{name}_')
  data_dir = os.path.join(scratch, 'data')
  os.makedirs(data_dir)
  if os.path.isdir(pretrained):
    shutil.copytree(pretrained, os.path.join(data_dir, CACHE_DIR))
  workdir = os.path.join(out, f'{index}-{name}')
  shutil.rmtree(workdir, ignore_errors=True)
  log_path = os.path.join(out, f'{index}-{name}.log')
  env = dict(os.environ, WSSS_JAX_DATA_DIR=data_dir,
             WSSS_JAX_XLA_CACHE=os.path.join(scratch, 'xla'))
  env.pop('WSSS_JAX_PROGRESS', None)
  start = time.perf_counter()
  with open(log_path, 'w') as log:
    subprocess.run([sys.executable, '-m', 'wsss_jax.main',
                    f'--config=configs/{name}.py', f'--workdir={workdir}'],
                   cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                   check=True)
  wall = time.perf_counter() - start
  shutil.rmtree(scratch, ignore_errors=True)
  with open(os.path.join(workdir, 'results.json')) as f:
    results = json.load(f)
  return {'job': name, 'wall_s': round(wall, 1),
          'val_miou': results['val']['miou'],
          'pseudo_miou': (results.get('pseudo') or {}).get('miou'),
          **log_stats(log_path)}


def main(argv):
  del argv
  out = FLAGS.out
  os.makedirs(out, exist_ok=True)
  pretrained = os.path.join(FLAGS.pretrained_from
                            or registry.default_data_dir(), CACHE_DIR)
  rows = []
  for index, name in enumerate(FLAGS.jobs):
    rows.append(run_job(name, index, out, pretrained))
    print(json.dumps(rows[-1]), flush=True)
  reference = [r['wall_s'] for r in rows if r['job'] == 'supervised']
  base = statistics.mean(reference) if reference else None
  lines = ['| job | wall | ÷ supervised (mean of its runs) | budget | val mIoU '
           '| log: bytes, longest line, \\r |', '| --- ' * 6 + '|']
  for row in rows:
    row['ratio'] = round(row['wall_s'] / base, 3) if base else None
    ratio = f"{row['ratio']:.2f}" if row['ratio'] is not None else '–'
    lines.append(f"| {row['job']} | {row['wall_s']:.1f} s | {ratio} | "
                 f"{BUDGETS.get(row['job'], '–')} | {row['val_miou']:.2f} | "
                 f"{row['log_bytes']}, {row['longest_line']}, "
                 f"{row['carriage_returns']} |")
  print('\n'.join(lines))
  with open(os.path.join(out, 'main_jobs.json'), 'w') as f:
    json.dump({'rows': rows, 'supervised_mean_s': base}, f, indent=2)


if __name__ == '__main__':
  _define_flags()
  app.run(main)
