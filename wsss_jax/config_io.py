"""A run's config read back from its workdir, and `a.b=value` overrides.

Every run writes `<workdir>/config.json` (`config_checks.check_workdir_config`);
commands that act on a finished run (`wsss_jax.predict`) rebuild the config
from it, so they need neither the config file nor the command line that
started the run.
"""

from __future__ import annotations

import difflib
import json
import os
from typing import Any

import ml_collections

from wsss_jax import defaults
from wsss_jax.config_checks import NEUTRAL_WHEN_ABSENT, ConfigError

CONFIG_FILE = 'config.json'


def _from_json(value: Any) -> Any:
  # The config keeps sequences as tuples (JSON wrote them as lists) and
  # sections as ConfigDicts.
  if isinstance(value, dict):
    return ml_collections.ConfigDict(
        {key: _from_json(item) for key, item in value.items()})
  if isinstance(value, list):
    return tuple(_from_json(item) for item in value)
  return value


def load_run_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a run in `workdir` was started with (its config.json).

  Fields added to the configs after the run was made are filled with the
  value that computes what the run computed (`NEUTRAL_WHEN_ABSENT`), so
  readers need no fallbacks.
  """
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.isdir(workdir):
    raise FileNotFoundError(f'No run directory {workdir!r}.')
  if not os.path.exists(path):
    raise FileNotFoundError(
        f'{path} does not exist: {workdir!r} is not the workdir of a run '
        '(`python -m wsss_jax.main --workdir=...` writes it first).')
  try:
    with open(path) as f:
      data = json.load(f)
  except (OSError, json.JSONDecodeError) as error:
    raise ConfigError(f'{path} is unreadable: {error}') from error
  config = _from_json(data)
  shared = set(defaults.base_config('', '').keys())
  for field, value in NEUTRAL_WHEN_ABSENT.items():
    *sections, name = field.split('.')
    if sections and sections[0] not in config and sections[0] not in shared:
      continue                  # another method's section (e.g. 'rrm')
    node = config
    for section in sections:
      if section not in node:
        node[section] = ml_collections.ConfigDict()
      node = node[section]
    if name not in node:
      node[name] = value
  return config


def _parse(text: str, current: Any, field: str) -> Any:
  if isinstance(current, bool):   # bool('False') would be True
    if text.lower() not in ('true', 'false'):
      raise ConfigError(f'{field}: expected True or False, got {text!r}.')
    return text.lower() == 'true'
  if isinstance(current, (tuple, list, ml_collections.ConfigDict)):
    try:
      return _from_json(json.loads(text))
    except json.JSONDecodeError as error:
      raise ConfigError(f'{field}: expected JSON (e.g. [0.5, 1.0]), got '
                        f'{text!r}.') from error
  if current is None:
    try:
      return json.loads(text)
    except json.JSONDecodeError:
      return text
  try:
    return type(current)(text)
  except ValueError as error:
    raise ConfigError(f'{field}: expected a {type(current).__name__}, got '
                      f'{text!r}.') from error


def apply_override(config: ml_collections.ConfigDict, override: str,
                   allowed_prefixes: tuple[str, ...] = ()) -> None:
  """Applies one 'a.b.c=value' override, parsed by the field's current type
  (bools from True/False, tuples and sections from JSON).

  Unknown fields are refused with the closest names; with
  `allowed_prefixes`, so is a field outside them.
  """
  if '=' not in override:
    raise ConfigError(f'Override {override!r}: expected field=value.')
  path, text = override.split('=', 1)
  if allowed_prefixes and not any(
      path == prefix or path.startswith(prefix + '.')
      for prefix in allowed_prefixes):
    raise ConfigError(f'config.{path} cannot be changed here; only '
                      f'{", ".join("config." + p for p in allowed_prefixes)}'
                      ' fields can.')
  names = path.split('.')
  node, walked = config, 'config'
  for depth, name in enumerate(names):
    if not isinstance(node, ml_collections.ConfigDict) or name not in node:
      choices = list(node.keys()) if isinstance(
          node, ml_collections.ConfigDict) else []
      close = difflib.get_close_matches(name, choices, n=3)
      hint = f' Did you mean {", ".join(close)}?' if close else ''
      raise ConfigError(f'{walked} has no field {name!r}.{hint}')
    if depth < len(names) - 1:
      node, walked = node[name], f'{walked}.{name}'
  node[names[-1]] = _parse(text, node[names[-1]], f'config.{path}')
