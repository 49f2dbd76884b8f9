"""Run-time weight files: a flat `.npz` of '/'-joined variable paths.

Keys include the collection, e.g. `params/backbone/conv1_1/kernel` or
`batch_stats/backbone/bn1/mean`; files are written by `save_weights` (or
`wsss_jax.tools.convert_weights`) with `numpy.savez`.  Loading is strict:
every file key must land on a model leaf of the same shape, and every model
leaf must be loaded unless a pattern allows it to keep its initial value.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import zipfile
from typing import Any, Iterable, Mapping

import jax.numpy as jnp
import numpy as np

log = logging.getLogger(__name__)

COLLECTIONS_WITH_BN_AFFINE = ('params', 'batch_stats')
# `model.init_weights` values naming weights the library makes itself
# (wsss_jax.pretraining) rather than a file.
BUILTIN_PREFIX = 'builtin:'
# Every model leaf outside the backbone: what a backbone-only file leaves at
# its initial value.
NOT_BACKBONE = (r'(params|batch_stats)/(?!backbone/).*',)
_BN_AFFINE_LEAVES = ('scale', 'bias')
_MAX_LISTED = 20


class WeightsError(ValueError):
  """A weight file that does not fit the model (or cannot be read)."""


def is_builtin(init_weights: str) -> bool:
  """Whether `model.init_weights` names built-in weights ('builtin:NAME')."""
  return str(init_weights).startswith(BUILTIN_PREFIX)


def flatten_variables(variables: Mapping[str, Any]) -> dict[str, Any]:
  """Nested dict of arrays -> {'/'-joined path: leaf}, paths sorted."""
  flat = {}
  def visit(prefix, node):
    if isinstance(node, Mapping):
      for key in node:
        if not isinstance(key, str) or '/' in key:
          raise WeightsError(f'variable name {key!r} under {prefix!r} must be '
                             f'a string without "/"')
        visit(f'{prefix}/{key}' if prefix else key, node[key])
    else:
      flat[prefix] = node
  visit('', variables)
  return dict(sorted(flat.items()))


def unflatten_variables(flat: Mapping[str, Any]) -> dict[str, Any]:
  """{'/'-joined path: leaf} -> nested dict (inverse of `flatten_variables`)."""
  nested: dict[str, Any] = {}
  for path, leaf in flat.items():
    node = nested
    parts = path.split('/')
    for part in parts[:-1]:
      node = node.setdefault(part, {})
      if not isinstance(node, dict):
        raise WeightsError(f'key {path!r} nests under a leaf')
    node[parts[-1]] = leaf
  return nested


def file_sha256(path: str | os.PathLike) -> str:
  """Hex sha256 of a file's bytes."""
  digest = hashlib.sha256()
  with open(path, 'rb') as f:
    for chunk in iter(lambda: f.read(1 << 20), b''):
      digest.update(chunk)
  return digest.hexdigest()


def save_weights(path: str | os.PathLike,
                 flat: Mapping[str, Any]) -> str:
  """Writes {'/'-joined key: array} with `numpy.savez`; returns its sha256.

  Use `flatten_variables(variables)` to save a model's variables.
  """
  path = os.fspath(path)
  if not path.endswith('.npz'):
    raise WeightsError(f'weight files must end in .npz, got {path!r}')
  arrays = {key: np.asarray(value) for key, value in flat.items()}
  for key, value in arrays.items():
    if value.dtype == object:
      raise WeightsError(f'{path}: key {key!r} is not a numeric array')
  directory = os.path.dirname(path)
  if directory:
    os.makedirs(directory, exist_ok=True)
  np.savez(path, **arrays)
  return file_sha256(path)


def read_weights(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """{'/'-joined key: array} from an `.npz` weight file (no pickles)."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise WeightsError(f'weight file {path!r} does not exist')
  try:
    with np.load(path, allow_pickle=False) as archive:
      return {key: archive[key] for key in archive.files}
  except (zipfile.BadZipFile, ValueError, OSError) as error:
    raise WeightsError(f'{path}: not a readable .npz weight archive written by '
                       f'numpy.savez ({error}); convert PyTorch files with '
                       f'`python -m wsss_jax.tools.convert_weights`') from error


def _matches(patterns: Iterable[str], key: str) -> bool:
  """Whether a pattern fully matches `key` with or without its collection."""
  short = key.split('/', 1)[1] if '/' in key else key
  return any(re.fullmatch(p, key) or re.fullmatch(p, short) for p in patterns)


def _relocated(key: str, model_keys: Mapping[str, Any]) -> str | None:
  """The model key for a BN scale/bias stored in the other collection.

  A trained BN keeps scale/bias in `params`, `FrozenBatchNorm` in
  `batch_stats`; one converted file serves both.
  """
  collection, _, rest = key.partition('/')
  if (collection not in COLLECTIONS_WITH_BN_AFFINE
      or rest.rsplit('/', 1)[-1] not in _BN_AFFINE_LEAVES):
    return None
  for other in COLLECTIONS_WITH_BN_AFFINE:
    candidate = f'{other}/{rest}'
    if other != collection and candidate in model_keys:
      return candidate
  return None


def _listing(title: str, items: list) -> str:
  shown = '\n    '.join(str(item) for item in items[:_MAX_LISTED])
  more = (f'\n    ... and {len(items) - _MAX_LISTED} more'
          if len(items) > _MAX_LISTED else '')
  return f'  {title} ({len(items)}):\n    {shown}{more}'


def load_weights(variables: Mapping[str, Any], path: str | os.PathLike,
                 dont_load: Iterable[str] = (),
                 allow_missing: Iterable[str] = ()) -> tuple[dict, dict]:
  """Merges a weight file into model variables, strictly.

  Patterns are regular expressions fully matched against a key with its
  collection (`params/head/classifier/kernel`) or without it
  (`head/classifier/kernel`), e.g. `dont_load=('head/.*',)` when the class
  count differs.

  Args:
    variables: nested dict of the model's variables (all collections), e.g.
      from `model.init`; arrays or anything with `.shape` / `.dtype`.
    path: `.npz` file of '/'-joined keys (see module docstring).
    dont_load: file keys matched here are skipped and the matching model
      leaves keep their initial values.
    allow_missing: model leaves matched here may be absent from the file.

  Returns:
    (variables, report): a new nested dict in which loaded leaves are jnp
    arrays of the model leaf's dtype (others untouched), and
    {'loaded': int, 'missing': [model keys not loaded], 'skipped': [file keys
    under dont_load], 'relocated': [(file key, model key)], 'unexpected': [],
    'shape_mismatch': [], 'sha256': str, 'path': str}.

  Raises:
    WeightsError: unreadable file, unexpected file keys, shape mismatches,
      non-finite values, or model keys missing without being allowed; the
      message lists every offending key.
  """
  path = os.fspath(path)
  dont_load, allow_missing = tuple(dont_load), tuple(allow_missing)
  for pattern in dont_load + allow_missing:
    try:
      re.compile(pattern)
    except re.error as error:
      raise WeightsError(f'bad weight-key pattern {pattern!r}: {error}') from error
  file_arrays = read_weights(path)
  sha256 = file_sha256(path)
  model_flat = flatten_variables(variables)

  loaded, skipped, relocated, unexpected, mismatch, non_finite = (
      {}, [], [], [], [], [])
  for key, value in file_arrays.items():
    if _matches(dont_load, key):
      skipped.append(key)
      continue
    target = key if key in model_flat else _relocated(key, model_flat)
    if target is None:
      unexpected.append(key)
      continue
    if target != key:
      relocated.append((key, target))
    model_shape = tuple(model_flat[target].shape)
    if tuple(value.shape) != model_shape:
      mismatch.append((key, tuple(value.shape), model_shape))
      continue
    if not np.issubdtype(value.dtype, np.number):
      raise WeightsError(f'{path}: key {key!r} has non-numeric dtype '
                         f'{value.dtype}')
    if np.issubdtype(value.dtype, np.inexact) and not np.all(np.isfinite(value)):
      non_finite.append(key)
      continue
    loaded[target] = value

  missing = [key for key in model_flat if key not in loaded]
  missing_not_allowed = [key for key in missing
                         if not _matches(dont_load + allow_missing, key)]
  report = dict(loaded=len(loaded), missing=missing, skipped=skipped,
                relocated=relocated, unexpected=unexpected,
                shape_mismatch=mismatch, sha256=sha256, path=path)
  problems = []
  if unexpected:
    problems.append(_listing('file keys with no model leaf', unexpected))
  if mismatch:
    problems.append(_listing('shape mismatches (key, file, model)', mismatch))
  if non_finite:
    problems.append(_listing('keys with NaN/Inf values', non_finite))
  if missing_not_allowed:
    problems.append(_listing('model keys missing from the file (allow them '
                             'with dont_load/allow_missing)',
                             missing_not_allowed))
  if problems:
    raise WeightsError(f'weight file {path} (sha256 {sha256}) does not fit the '
                       f'model:\n' + '\n'.join(problems))

  merged = dict(model_flat)
  for key, value in loaded.items():
    merged[key] = jnp.asarray(value, dtype=model_flat[key].dtype)
  log.info('Loaded %d arrays from %s (sha256 %s); %d model keys kept '
               'their initial values.', len(loaded), path, sha256, len(missing))
  return unflatten_variables(merged), report
