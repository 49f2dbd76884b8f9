"""Weight files: strict loading, sha256, flatten/unflatten."""

from __future__ import annotations


import jax
import numpy as np
import pytest

from wsss_jax.models import build
from wsss_jax.models import weights

from torch_reference import _vgg_config, _init


# --------------------------------------------------------------------------
# Strictness of load_weights
# --------------------------------------------------------------------------
@pytest.fixture(name='tiny_vgg')
def _tiny_vgg_fixture(tmp_path):
  model = build.build_model(_vgg_config(), 3)
  variables = _init(model, 9)
  path = str(tmp_path / 'good.npz')
  weights.save_weights(path, weights.flatten_variables(variables))
  return model, variables, path


def _edited(tmp_path, path, **changes):
  flat = dict(weights.read_weights(path))
  for key, value in changes.items():
    key = key.replace('__', '/')
    if value is None:
      del flat[key]
    else:
      flat[key] = value
  out = str(tmp_path / 'edited.npz')
  weights.save_weights(out, flat)
  return out


def test_load_weights_round_trip_and_sha256(tiny_vgg):
  _, variables, path = tiny_vgg
  loaded, report = weights.load_weights(variables, path)
  assert report['loaded'] == len(weights.flatten_variables(variables))
  assert report['sha256'] == weights.file_sha256(path) and len(
      report['sha256']) == 64
  for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(variables)):
    np.testing.assert_array_equal(a, b)


def test_load_weights_rejects_shape_mismatch(tiny_vgg, tmp_path):
  _, variables, path = tiny_vgg
  bad = _edited(tmp_path, path, params__head__classifier__kernel=np.zeros(
      (1, 1, 16, 5), np.float32))
  with pytest.raises(weights.WeightsError,
                     match=r'shape mismatches[\s\S]*head/classifier/kernel'):
    weights.load_weights(variables, bad)
  # dont_load keeps the initial head (the class-count-change case).
  kept, report = weights.load_weights(variables, bad, dont_load=('head/.*',))
  assert 'params/head/classifier/kernel' in report['skipped']
  np.testing.assert_array_equal(kept['params']['head']['classifier']['kernel'],
                                variables['params']['head']['classifier'][
                                    'kernel'])


def test_load_weights_rejects_unexpected_missing_and_nan(tiny_vgg, tmp_path):
  _, variables, path = tiny_vgg
  extra = _edited(tmp_path, path, params__backbone__fc8__kernel=np.zeros(3))
  with pytest.raises(weights.WeightsError, match='no model leaf[\\s\\S]*fc8'):
    weights.load_weights(variables, extra)
  missing = _edited(tmp_path, path, params__backbone__conv3_2__bias=None)
  with pytest.raises(weights.WeightsError, match='missing[\\s\\S]*conv3_2/bias'):
    weights.load_weights(variables, missing)
  _, report = weights.load_weights(variables, missing,
                                   allow_missing=(r'backbone/conv3_2/bias',))
  assert report['missing'] == ['params/backbone/conv3_2/bias']
  nan = np.full((16,), np.nan, np.float32)
  bad = _edited(tmp_path, path, params__backbone__fc7__bias=nan)
  with pytest.raises(weights.WeightsError, match='NaN'):
    weights.load_weights(variables, bad)


def test_load_weights_bad_files(tiny_vgg, tmp_path):
  _, variables, _ = tiny_vgg
  with pytest.raises(weights.WeightsError, match='does not exist'):
    weights.load_weights(variables, str(tmp_path / 'absent.npz'))
  junk = tmp_path / 'junk.npz'
  junk.write_bytes(b'not a zip')
  with pytest.raises(weights.WeightsError, match='convert_weights'):
    weights.load_weights(variables, str(junk))
  with pytest.raises(weights.WeightsError, match='bad weight-key pattern'):
    weights.load_weights(variables, str(junk), dont_load=('head/(',))


def test_flatten_unflatten_inverse():
  tree = {'params': {'a': {'b': np.ones(2)}, 'c': np.zeros(1)},
          'batch_stats': {'a': {'mean': np.ones(3)}}}
  flat = weights.flatten_variables(tree)
  assert list(flat) == ['batch_stats/a/mean', 'params/a/b', 'params/c']
  assert jax.tree.structure(weights.unflatten_variables(flat)) == (
      jax.tree.structure(tree))


