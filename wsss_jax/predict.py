"""Command line: label a folder of images with a finished run's network.

  python -m wsss_jax.predict --workdir=RUN --images=DIR --out=DIR
      [--stage=NAME] [--overlays] [--bucket_multiple=128]
      [--config.eval.crf=True --config.eval.scales='[0.75,1,1.25]' ...]

Writes one VOC-palette PNG per readable image (`<out>/<stem>.png`, the
image's size), optional overlays, and `<out>/predictions.json`.  Only
`config.eval` fields may be overridden; the rest of the config is the run's.
All the work is in `wsss_jax.prediction.predict_folder`.
"""

from __future__ import annotations

import sys

from absl import app, flags

from wsss_jax import config_checks, prediction, run

FLAGS = flags.FLAGS


def _define_flags() -> None:
  """Defined when the command starts (not at import), so that this module
  and `wsss_jax.main`, which both have --workdir, import side by side."""
  flags.DEFINE_string('workdir', None, 'A run directory.')
  flags.DEFINE_string('images', None, 'Folder of images.')
  flags.DEFINE_string('out', None, 'Output folder for the PNGs.')
  flags.DEFINE_string(
      'stage', None, 'Training stage whose network to use (default: the one '
      'the run evaluates).')
  flags.DEFINE_bool('overlays', False,
                    'Also write <out>/overlays/<stem>.jpg.')
  flags.DEFINE_integer(
      'bucket_multiple', 128, 'Images are padded to square buckets whose '
      'side is a multiple of this (one compilation per bucket).')
  flags.mark_flags_as_required(['workdir', 'images', 'out'])

_CONFIG_PREFIX = '--config.'
_overrides: list[str] = []


def _parse(argv: list[str]) -> list[str]:
  """absl parsing of the flags above (a bad one: a message and exit 2);
  `--config.a.b=v` kept as overrides, applied to the run's config."""
  rest = [argv[0]]
  for arg in argv[1:]:
    if arg.startswith(_CONFIG_PREFIX):
      _overrides.append(arg[len(_CONFIG_PREFIX):])
    else:
      rest.append(arg)
  return run.parse_command_line(rest)


def main(argv):
  run.start_command(argv)
  try:
    prediction.predict_folder(
        FLAGS.workdir, FLAGS.images, FLAGS.out, stage=FLAGS.stage,
        overrides=_overrides, overlays=FLAGS.overlays,
        bucket_multiple=FLAGS.bucket_multiple)
  except (prediction.PredictionError, config_checks.ConfigError,
          FileNotFoundError) as error:
    print(f'error: {error}', file=sys.stderr)
    return 2
  return 0


def cli() -> None:
  """The `wsss-predict` console script."""
  _define_flags()
  app.run(main, flags_parser=_parse)


if __name__ == '__main__':
  cli()
