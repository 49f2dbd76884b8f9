"""Command line: python -m wsss_jax.main --config=configs/<name>.py[:<variant>]
(or `wsss-train --config=<name>[:<variant>]`, the packaged config)

  --workdir=DIR          default runs/<name>[-<variant>]; rerun to resume
  --config.a.b=value     override any field (typos and wrong types rejected)

Intentionally short: all the work is in `wsss_jax.run.train_and_evaluate`.
"""

from __future__ import annotations

import sys

from absl import app, flags
from ml_collections import config_flags

from wsss_jax import config_checks, run
from wsss_jax.data import registry

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Config file, e.g. configs/box_baseline.py[:variant], or a '
    'packaged config name, e.g. box2seg[:variant].',
    lock_config=True)
_WORKDIR = flags.DEFINE_string(
    'workdir', None, 'Run directory (default: runs/<name>[-<variant>]).')
flags.mark_flags_as_required(['config'])


def main(argv):
  run.start_command(argv)
  try:
    config = _CONFIG.value
    config.name    # config_flags reports a file it could not load only here
  except OSError as error:
    print(f'error: --config: {run.user_error_message(error)}',
          file=sys.stderr)
    return 2
  workdir = _WORKDIR.value or run.default_workdir(config)
  try:
    run.train_and_evaluate(config, workdir)
  except (config_checks.ConfigError, registry.DatasetError) as error:
    # A value out of range or missing data: the message says what to fix.
    print(f'error: {error}', file=sys.stderr)
    return 2
  return 0


def cli() -> None:
  """The `wsss-train` console script."""
  app.run(main, flags_parser=run.parse_command_line)


if __name__ == '__main__':
  cli()
