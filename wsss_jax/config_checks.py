"""Rejects out-of-range configuration values before any work starts."""

from __future__ import annotations

import json
import os
from typing import Any

from wsss_jax import pretraining
from wsss_jax.atomic import write_json_atomic

# Fields that may change between a run and its resumption without changing
# what any stage computes (so no stage reruns for them): host CRF/GrabCut workers, evaluation decoding processes,
# the in-memory record cache, device count (the state is
# replicated), logging cadence, and where the raw or prepared data lives.
# Not `input.worker_count`: grain's iterator state depends on it.
RESUME_SAFE_FIELDS = ('eval.crf_workers', 'eval.worker_count', 'input.cache_mb',
                      'mesh.num_devices',
                      'train.log_every', 'data.data_dir', 'data.voc.voc_root',
                      'data.voc.sbd_root', 'data.voc.seg_aug_root',
                      'data.coco.root')

# Fields added after runs already existed, with the value that computes what
# the code did before them: a workdir whose config.json lacks one resumes
# when the new config holds that value.
NEUTRAL_WHEN_ABSENT = {'train.ema_decay': 0.0, 'optim.warmup_steps': 0,
                       'eval.window_size': 0, 'eval.window_stride': 0,
                       'crf.backend': 'pydensecrf',
                       'rrm.hparam_preset': 'paper',
                       'pmm.classify_crop_size': 0,
                       'pmm.classify_scale_range': [],
                       'pmm.classifier_dropout': 0.0,
                       'pmm.relabel.window_size': 0,
                       'pmm.relabel.window_stride': 0}


# `config.crf.backend` values (`host.crf.get_backend` names).
CRF_BACKENDS = ('pydensecrf', 'jax')


class ConfigError(ValueError):
  """One or more configuration values are invalid (all are listed)."""


def choice(field: str, value: Any, allowed: tuple[str, ...]) -> str:
  """`value` if it is one of `allowed`, else ValueError naming `field`
  (e.g. 'bana.loss')."""
  if value not in allowed:
    raise ValueError(f'{field}={value!r}: expected one of {tuple(allowed)}.')
  return str(value)


def number(field: str, value: Any, low: float, high: float | None = None,
           integer: bool = False) -> float | int:
  """`value` as float (int with `integer`) if it is a number in [low, high]
  (no upper bound when `high` is None), else ValueError naming `field`."""
  ok = (isinstance(value, (int, float)) and not isinstance(value, bool)
        and low <= value and (high is None or value <= high)
        and (not integer or value == int(value)))
  if not ok:
    what = 'an integer' if integer else 'a number'
    expected = f'in [{low}, {high}]' if high is not None else f'>= {low}'
    raise ValueError(f'{field}={value!r}: expected {what} {expected}.')
  return int(value) if integer else float(value)


def _positive_numbers(values: Any, allow_empty: bool = False) -> bool:
  """A tuple/list of positive numbers (a string from a mistyped override
  is refused, not compared)."""
  return (isinstance(values, (tuple, list)) and (allow_empty or values)
          and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                  and v > 0 for v in values))


def validate(config) -> None:
  """Raises ConfigError naming every invalid field of `config`."""
  errors: list[str] = []

  def need(condition: bool, field: str, message: str) -> None:
    if not condition:
      errors.append(f'{field}: {message}')

  optim, train, inp, ev = config.optim, config.train, config.input, config.eval
  need(optim.lr > 0, 'optim.lr', f'must be > 0, got {optim.lr}')
  need(0 <= optim.momentum < 1, 'optim.momentum',
       f'must be in [0, 1), got {optim.momentum}')
  need(optim.get('warmup_steps', 0) >= 0, 'optim.warmup_steps',
       f"must be >= 0, got {optim.get('warmup_steps')}")
  need(optim.weight_decay >= 0, 'optim.weight_decay',
       f'must be >= 0, got {optim.weight_decay}')
  for group, mult in optim.lr_mult.items():
    need(mult >= 0, f'optim.lr_mult.{group}', f'must be >= 0, got {mult}')
  need(train.num_steps >= 1, 'train.num_steps',
       f'must be >= 1, got {train.num_steps}')
  for field in ('log_every', 'checkpoint_every', 'keep_checkpoints'):
    need(train[field] >= 1, f'train.{field}',
         f'must be >= 1, got {train[field]}')
  need(train.eval_every >= 0, 'train.eval_every', 'must be >= 0')
  need(0 <= train.get('ema_decay', 0.0) < 1, 'train.ema_decay',
       f"must be in [0, 1), got {train.get('ema_decay')}")
  need(inp.batch_size >= 1, 'input.batch_size',
       f'must be >= 1, got {inp.batch_size}')
  need(inp.crop_size >= 8, 'input.crop_size',
       f'must be >= 8, got {inp.crop_size}')
  low, high = tuple(inp.scale_range)
  need(0 < low <= high, 'input.scale_range',
       f'must satisfy 0 < low <= high, got {(low, high)}')
  need(_positive_numbers(inp.scales, allow_empty=True), 'input.scales',
       f'must be positive, got {tuple(inp.scales)}')
  need(inp.color_jitter >= 0, 'input.color_jitter', 'must be >= 0')
  need(inp.max_boxes >= 1, 'input.max_boxes', 'must be >= 1')
  need(inp.worker_count >= 0, 'input.worker_count', 'must be >= 0')
  need(inp.get('cache_mb', 0) >= 0, 'input.cache_mb', 'must be >= 0')
  need(ev.worker_count >= 0, 'eval.worker_count', 'must be >= 0')
  need(ev.batch_size >= 1, 'eval.batch_size', 'must be >= 1')
  need(ev.bucket_size == 0 or ev.bucket_size >= inp.crop_size,
       'eval.bucket_size', f'({ev.bucket_size}) is smaller than '
       f'input.crop_size ({inp.crop_size}); use 0 (automatic) or a larger '
       'bucket')
  need(_positive_numbers(ev.scales), 'eval.scales',
       f'must be non-empty and positive, got {tuple(ev.scales)}')
  need(ev.max_images >= 0, 'eval.max_images', 'must be >= 0')
  window_size = ev.get('window_size', 0)
  window_stride = ev.get('window_stride', 0)
  need(window_size >= 0, 'eval.window_size',
       f'must be >= 0 (0: whole image), got {window_size}')
  need(window_size <= 0 or 0 < window_stride <= window_size,
       'eval.window_stride', f'must be in [1, eval.window_size '
       f'({window_size})] with sliding windows, got {window_stride}')
  backend = config.get('crf', {}).get('backend', 'pydensecrf')
  need(backend in CRF_BACKENDS, 'crf.backend',
       f'must be one of {CRF_BACKENDS}, got {backend!r}')
  need(config.compute_dtype in ('float32', 'bfloat16'), 'compute_dtype',
       f"must be 'float32' or 'bfloat16', got {config.compute_dtype!r}")
  if config.data.name.startswith('shapes'):
    shapes = config.data.shapes
    need(16 <= shapes.image_size <= 1024, 'data.shapes.image_size',
         f'must be in [16, 1024], got {shapes.image_size}')
    need(1 <= shapes.num_classes <= 6, 'data.shapes.num_classes',
         f'must be in [1, 6], got {shapes.num_classes}')
    need(shapes.num_train >= 1 and shapes.num_val >= 1,
         'data.shapes.num_train/num_val', 'must be >= 1')
    need(1 <= shapes.min_objects <= shapes.max_objects,
         'data.shapes.min_objects/max_objects',
         'need 1 <= min_objects <= max_objects')
  init_weights = str(config.model.get('init_weights', ''))
  if init_weights.startswith('builtin:'):
    try:
      pretraining.builtin_name(init_weights)
    except ValueError as error:
      errors.append(str(error))
    p = config.get('pretrain')
    need(p is not None, 'pretrain', 'built-in weights need a pretrain section '
         '(defaults.benchmark_pretraining)')
    if p is not None:
      for field, low in (('num_steps', 1), ('batch_size', 1),
                         ('crop_size', 8), ('image_size', 16),
                         ('num_train', 1), ('num_val', 1),
                         ('fc6_dilation', 1), ('min_pixels', 1)):
        need(p[field] >= low, f'pretrain.{field}',
             f'must be >= {low}, got {p[field]}')
      need(p.lr > 0, 'pretrain.lr', f'must be > 0, got {p.lr}')
      need(p.task in pretraining.TASKS, 'pretrain.task',
           f'must be one of {pretraining.TASKS}, got {p.task!r}')
  if errors:
    raise ConfigError('Invalid configuration:\n  ' + '\n  '.join(errors))


def _flatten(tree: Any, prefix: str = '') -> dict[str, Any]:
  if isinstance(tree, dict):
    out = {}
    for key, value in tree.items():
      out.update(_flatten(value, f'{prefix}{key}.'))
    return out
  return {prefix[:-1]: tree}


def config_as_dict(config) -> dict[str, Any]:
  """A JSON round-trippable dict of the config (tuples become lists)."""
  return json.loads(config.to_json_best_effort())


def comparable_fields(tree: dict[str, Any]) -> dict[str, Any]:
  """The flattened config ('a.b': value) that decides whether a stage's
  outputs are current: without RESUME_SAFE_FIELDS, and without fields of
  NEUTRAL_WHEN_ABSENT at their neutral value (so configs written before
  those fields existed compare equal)."""
  fields = _flatten(tree)
  return {key: value for key, value in fields.items()
          if key not in RESUME_SAFE_FIELDS
          and not (key in NEUTRAL_WHEN_ABSENT
                   and value == NEUTRAL_WHEN_ABSENT[key])}


def update_workdir_config(config, workdir: str
                          ) -> tuple[dict[str, Any], dict[str, Any] | None]:
  """Writes the config to `<workdir>/config.json`; returns (its comparable
  fields, those of the config.json it replaced, or None for a new run).

  A workdir is not locked to its first config: `stages.run_stages` redoes
  exactly the stages whose fields changed (evaluation settings rerun only
  the evaluation; a raised `train.num_steps` continues training).
  """
  path = os.path.join(workdir, 'config.json')
  previous = None
  if os.path.exists(path):
    try:
      with open(path) as f:
        previous = comparable_fields(json.load(f))
    except (OSError, json.JSONDecodeError) as error:
      raise ConfigError(f'{path} is unreadable ({error}); delete it to let '
                        'the stage markers decide, or use another '
                        '--workdir.') from error
  current = config_as_dict(config)
  os.makedirs(workdir, exist_ok=True)
  write_json_atomic(path, current)
  return comparable_fields(current), previous
