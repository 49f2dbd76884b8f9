"""Command line: python -m wsss_jax.main --config=configs/<name>.py[:<variant>]

  --workdir=DIR          default runs/<name>[-<variant>]; rerun to resume
  --config.a.b=value     override any field (typos and wrong types rejected)

Intentionally short: all the work is in `wsss_jax.run.train_and_evaluate`.
"""

from __future__ import annotations

import sys

from absl import app, flags
from ml_collections import config_flags

from wsss_jax import run

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Config file, e.g. configs/box_baseline.py[:variant].',
    lock_config=True)
_WORKDIR = flags.DEFINE_string(
    'workdir', None, 'Run directory (default: runs/<name>[-<variant>]).')
flags.mark_flags_as_required(['config'])


def main(argv):
  run.start_command(argv)
  config = _CONFIG.value
  workdir = _WORKDIR.value or run.default_workdir(config)
  run.train_and_evaluate(config, workdir)


if __name__ == '__main__':
  sys.exit(app.run(main))
