"""A run's runtime, and a second dataset opened next to the target one."""

import os

import pytest

from wsss_jax import defaults, run, runtime

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_with_data_opens_an_auxiliary_dataset_and_leaves_the_target():
  config = run.load_config_file(os.path.join(REPO, 'configs',
                                             'supervised.py'), 'tiny')
  rt = runtime.make_runtime(config)
  aux_data = defaults.shapes_data('aux')
  aux_data.shapes.update(image_size=32, num_train=6, num_val=2)
  aux = rt.with_data(aux_data)
  assert (rt.dataset.name, aux.dataset.name) == ('shapes', 'shapes_aux')
  assert rt.config.data.name == 'shapes' and aux.config.data.name == \
      'shapes_aux'
  assert set(aux.class_names[1:]).isdisjoint(rt.class_names[1:])
  assert len(aux.dataset.index(aux.train_split).image_ids) == 6
  assert aux.mesh is rt.mesh and aux.normalization == rt.normalization


def test_with_config_keeps_the_dataset_and_refuses_another():
  config = run.load_config_file(os.path.join(REPO, 'configs',
                                             'supervised.py'), 'tiny')
  rt = runtime.make_runtime(config)
  other = config.copy_and_resolve_references()
  other.train.num_steps = 7
  assert rt.with_config(other).config.train.num_steps == 7
  assert rt.with_config(other).dataset is rt.dataset
  # A stage's own model brings the normalisation its weights expect.
  assert rt.normalization == 'imagenet'
  other.model.weights_source = 'caffe'
  assert rt.with_config(other).normalization == 'caffe'
  assert rt.with_config(other).pad_color != rt.pad_color
  with other.unlocked():
    other.data.name = 'shapes_aux'
  with pytest.raises(ValueError, match='with_data'):
    rt.with_config(other)


def test_allocator_settings_apply_on_import_and_can_be_turned_off():
  import subprocess
  import sys
  code = ('import wsss_jax; from wsss_jax.host import allocator; '
          'print(sorted(allocator.keep_freed_memory().items()))')
  default = subprocess.run([sys.executable, '-c', code], check=True,
                           capture_output=True, text=True).stdout.strip()
  off = subprocess.run(
      [sys.executable, '-c', code], check=True, capture_output=True,
      text=True, env={**os.environ, 'WSSS_JAX_MALLOC_TUNING': '0'}
  ).stdout.strip()
  assert off == '[]'
  if sys.platform.startswith('linux'):       # glibc: all three accepted
    assert default == '[(-8, 1), (-4, 0), (-1, 2147483647)]'
