"""`train_and_evaluate(config, workdir)`: the whole run, importable and testable.

main (flags) -> train_and_evaluate -> method pipeline -> stages -> jitted steps.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import time
from typing import Any

import jax

from wsss_jax import config_checks, methods, pretraining, runtime, stages
from wsss_jax.atomic import write_json_atomic
from wsss_jax.training import mesh as mesh_lib
from wsss_jax.reporting import report, results as results_lib

log = logging.getLogger(__name__)


def configure_logging() -> None:
  """This package's INFO lines on; libraries that log through absl (orbax's
  per-save chatter) at WARNING."""
  import logging as std_logging  # pylint: disable=g-import-not-at-top
  from absl import logging as absl_logging  # pylint: disable=g-import-not-at-top
  absl_logging.set_verbosity(absl_logging.WARNING)
  std_logging.getLogger('wsss_jax').setLevel(std_logging.INFO)


COMPILATION_CACHE_ENV = 'WSSS_JAX_XLA_CACHE'


def enable_compilation_cache() -> str:
  """Keeps compiled XLA programs on disk so that later runs skip compiling.

  A rerun, another seed or variant of the same config, or a stage that
  compiles what an earlier stage did (BANA's two Labelers share an
  initialisation) loads the executable instead of compiling it again.  The
  folder is `$WSSS_JAX_XLA_CACHE`, default `~/.cache/wsss_jax/xla`; an empty
  value turns the cache off.  Must run before the first compilation.

  Returns the folder, or '' when off.
  """
  folder = os.environ.get(COMPILATION_CACHE_ENV,
                          os.path.join(os.path.expanduser('~'), '.cache',
                                       'wsss_jax', 'xla'))
  if folder:
    jax.config.update('jax_compilation_cache_dir', folder)
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.5)
  return folder


def _clean(text: str) -> str:
  text = text.split('Traceback (most recent call last):')[0]
  return ' '.join(line.strip() for line in text.splitlines() if line.strip())


def user_error_message(error: BaseException, argv: list[str] = ()) -> str:
  """One readable line for a mistake in the command line or config, from a
  chain of wrapped exceptions whose messages may embed tracebacks: the
  outermost message (it names the flag), completed by the innermost where
  the outer one only announces it; an unknown config field names its flag
  and the closest field."""
  chain = []
  while error is not None and error not in chain:
    chain.append(error)
    error = error.__cause__ or (None if error.__suppress_context__
                                else error.__context__)
  outer, inner = chain[0], chain[-1]
  if isinstance(outer, (AttributeError, KeyError)) and isinstance(
      inner, KeyError) and inner.args:
    name = str(inner.args[0])
    flag = next((arg.split('=')[0] for arg in argv if arg.startswith(
        '--config.') and name in arg.split('=')[0].split('.')[1:]), 'config')
    close = re.search(r'Did you mean \W*"(\w+)\W*"', str(outer))
    return (f'{flag}: no config field {name!r}.'
            + (f' Did you mean {close.group(1)!r}?' if close else ''))
  text = _clean(str(outer))
  if (not text or text.endswith(':')) and inner is not outer:
    text = f'{text} {_clean(str(inner))}'.strip()
  return text or type(outer).__name__


def resolve_config_arg(arg: str) -> str:
  """'--config=box2seg[:variant]' -> the packaged config's path (a bare
  name that is not a file here); any other argument unchanged."""
  from wsss_jax import configs  # pylint: disable=g-import-not-at-top
  if not arg.startswith('--config='):
    return arg
  name, colon, variant = arg[len('--config='):].partition(':')
  if (os.sep in name or name.endswith('.py') or os.path.exists(name)
      or name not in configs.available()):
    return arg
  return f'--config={configs.path_of(name)}{colon}{variant}'


def parse_command_line(argv: list[str]) -> list[str]:
  """absl flag parsing (as `app.run`'s `flags_parser`) that turns a bad flag,
  config field, value or variant into one line on stderr and exit status 2,
  not a traceback."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  try:
    return flags.FLAGS([resolve_config_arg(arg) for arg in argv])
  except Exception as error:  # pylint: disable=broad-except
    # config_flags reports typos, wrong types and config-file errors as
    # assorted exception types, often wrapped.
    print(f'error: {user_error_message(error, argv)}', file=sys.stderr)
    print(f'Run {os.path.basename(argv[0])} --helpfull for the flags.',
          file=sys.stderr)
    sys.exit(2)


def start_command(argv: list[str]) -> None:
  """What every command line does first: refuse stray arguments, turn on
  logging and the compilation cache, join a multi-host job if there is one."""
  from absl import app  # pylint: disable=g-import-not-at-top
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  configure_logging()
  enable_compilation_cache()
  mesh_lib.maybe_initialize_distributed()


def load_config_file(path: str, variant: str = ''):
  """`get_config(variant)` of the config file at `path` (what
  `--config=path:variant` does, for scripts and tests)."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  name = os.path.splitext(os.path.basename(path))[0]
  spec = importlib.util.spec_from_file_location(f'wsss_config_{name}', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(variant)


def default_workdir(config) -> str:
  name = config.name + (f'-{config.variant}' if config.variant else '')
  return os.path.join('runs', name)


def _own_fields(config):
  """`stage -> comparable fields` of the config a stage's network was built
  with, when that is not the run's (BANA's Labeler: its own steps and
  optimiser); None otherwise."""
  def own(stage):
    network = stage.network
    if network is None or network.runtime is None or (
        network.runtime.config is config):
      return None
    return config_checks.comparable_fields(
        config_checks.config_as_dict(network.runtime.config))
  return own


def train_and_evaluate(config, workdir: str) -> dict[str, Any]:
  """Runs (or resumes) every stage of `config.method`; writes the results.

  Writes `<workdir>/results.json` and `<workdir>/report.md` and returns the
  results dict.  Rerunning with the same config and workdir resumes; with a
  changed config it redoes only the stages that read a changed field (and
  those after them), saying which and why (`stages.plan_stage`).
  """
  start = time.time()
  config_checks.validate(config)
  rt = runtime.make_runtime(                # fails early on missing data
      config, builtin_weights=pretraining.builtin_weights)
  fields, previous_fields = config_checks.update_workdir_config(config,
                                                                workdir)
  log.info('Run %s (%s) on %s, %d device(s), workdir %s', config.name,
               config.method, rt.dataset.name, rt.mesh.devices.size, workdir)
  pipeline = methods.build_pipeline(config.method, rt)
  context = stages.StageContext(workdir=workdir)
  records = stages.run_stages(pipeline.stages, context, fields,
                              previous_fields, own_fields=_own_fields(config))
  session_s = time.time() - start
  # Time to produce the results: each main-line stage's wall time when it
  # ran (so a rerun that skips every stage still reports the real cost)
  # plus this session's time outside them (side stages ran beside them;
  # what they took beyond the main line is in that rest).
  main_line = [r for r in records if not r.get('side')]
  ran_now = sum(r['wall_s'] for r in main_line if r['status'] == 'done')
  wall_s = (sum(r['wall_s'] for r in main_line)
            + max(0.0, session_s - ran_now))
  results = results_lib.assemble(rt, pipeline, records, wall_s, session_s)
  report_path = os.path.join(workdir, 'report.md')
  if mesh_lib.is_primary():
    write_json_atomic(os.path.join(workdir, 'results.json'), results)
    report.write_report(rt, workdir, pipeline, records, results)
  val, pseudo = results.get('val') or {}, results.get('pseudo') or {}
  log.info('Done in %.1f s: val mIoU %s%s. Report: %s', results['wall_s'],
               f"{val['miou']:.2f}" if 'miou' in val else 'n/a',
               f", pseudo-mask mIoU {pseudo['miou']:.2f}" if 'miou' in pseudo
               else '', report_path)
  return results
