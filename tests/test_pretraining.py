"""The benchmark's pretrained backbone (wsss_jax.pretraining)."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import supervised
from wsss_jax import config_checks, losses, pretraining, segmentation
from wsss_jax.models import weights as weights_lib
from wsss_jax.runtime import make_runtime


def test_classes_in_crop_counts_pixels_per_crop():
  mask = np.zeros((2, 4, 4), np.uint8)
  mask[0, :2, :2] = 1          # 4 pixels of class 1
  mask[0, 3, 3] = 2            # 1 pixel of class 2: a sliver
  mask[0, 2, :] = 255          # ignore never counts
  mask[1, :, :2] = 3           # 8 pixels of class 3
  present = pretraining.classes_in_crop(jnp.asarray(mask), 3, min_pixels=2)
  np.testing.assert_array_equal(present, [[1, 0, 0], [0, 0, 1]])
  one = pretraining.classes_in_crop(jnp.asarray(mask), 3, min_pixels=1)
  np.testing.assert_array_equal(one, [[1, 1, 0], [0, 0, 1]])


def test_multilabel_soft_margin_by_hand():
  # s = 0: log 2 whatever the target; s = ln 3: -log σ(s) = log(4/3) for a
  # positive, -log σ(-s) = log 4 for a negative.
  scores = jnp.asarray([[0.0, np.log(3.0)], [np.log(3.0), 0.0]])
  targets = jnp.asarray([[1.0, 1.0], [0.0, 0.0]])
  expected = np.mean([np.log(2), np.log(4 / 3), np.log(4), np.log(2)])
  np.testing.assert_allclose(
      losses.multilabel_soft_margin(scores, targets), expected,
      rtol=1e-6)
  grads = jax.grad(losses.multilabel_soft_margin)(
      jnp.asarray([[80.0, -80.0]]), jnp.asarray([[0.0, 1.0]]))
  assert np.all(np.isfinite(grads))


def test_image_scores_are_the_spatial_mean():
  logits = jnp.arange(2 * 2 * 3 * 4, dtype=jnp.float32).reshape(2, 2, 3, 4)
  np.testing.assert_allclose(pretraining.image_scores(logits),
                             np.asarray(logits).mean(axis=(1, 2)))


def test_cache_key_follows_what_changes_the_weights():
  config = supervised.get_config()
  key = pretraining.cache_key(config, 1)
  assert key.startswith('shapes_pretrain-')
  assert pretraining.cache_key(config, 2) != key          # rounding order
  changed = config.copy_and_resolve_references()
  changed.pretrain.num_steps += 1
  assert pretraining.cache_key(changed, 1) != key
  changed = config.copy_and_resolve_references()
  changed.model.width = 0.25
  assert pretraining.cache_key(changed, 1) != key
  # fc6's dilation and the head do not change the backbone's parameters.
  same = config.copy_and_resolve_references()
  same.model.update(fc6_dilation=1, head='cosine', head_bias=False)
  same.optim.lr = 1.0
  assert pretraining.cache_key(same, 1) == key


def test_bad_builtin_settings_are_config_errors():
  config = supervised.get_config()
  config.model.init_weights = 'builtin:imagenet'
  config.pretrain.num_steps = 0
  with pytest.raises(config_checks.ConfigError) as error:
    config_checks.validate(config)
  assert 'builtin:shapes_pretrain' in str(error.value)
  assert 'pretrain.num_steps' in str(error.value)


@pytest.mark.parametrize('task, scores', [
    ('segmentation', {'miou', 'pixel_acc', 'images'}),
    ('classification', {'exact_match', 'mean_class_accuracy', 'mean_f1',
                        'images'})])
def test_builtin_backbone_is_built_once_and_loads_only_the_backbone(
    tmp_path, monkeypatch, task, scores):
  monkeypatch.setenv('WSSS_JAX_DATA_DIR', str(tmp_path))
  config = supervised.get_config('tiny')
  config.pretrain.task = task
  rt = make_runtime(config, builtin_weights=pretraining.builtin_weights)
  model = segmentation.build_segmenter(rt)
  variables, record = segmentation.initial_variables(
      rt, model, jax.random.PRNGKey(1))
  assert record['init'] == 'builtin:shapes_pretrain'
  path = record['path']
  assert path.startswith(str(tmp_path))
  info = json.loads(open(os.path.join(os.path.dirname(path),
                                      pretraining.INFO_FILE)).read())
  assert info['steps'] == config.pretrain.num_steps
  assert info['classes'] == ['diamond', 'trapezoid', 'tee', 'chevron',
                             'semicircle', 'capsule']
  assert info['sha256'] == record['sha256']
  assert info['settings']['task'] == task and set(info['val']) == scores
  assert info['val']['images'] == config.pretrain.num_val
  saved = weights_lib.read_weights(path)
  assert saved and all(k.split('/')[1] == 'backbone' for k in saved)
  flat = weights_lib.flatten_variables(variables)
  for key, value in saved.items():
    np.testing.assert_array_equal(flat[key], value)
  # The head is the model's own random init (the pretraining had 6 classes).
  fresh = weights_lib.flatten_variables(jax.device_get(
      segmentation.state_lib.random_variables(
          model, jax.random.PRNGKey(1), (1, 32, 32, 3))))
  heads = [k for k in flat if k.split('/')[1] == 'head']
  assert heads
  for key in heads:
    np.testing.assert_array_equal(flat[key], fresh[key])
  # A second run reuses the file.
  mtime = os.path.getmtime(path)
  _, again = segmentation.initial_variables(rt, model, jax.random.PRNGKey(2))
  assert again['path'] == path and os.path.getmtime(path) == mtime


def test_runtime_without_the_hook_refuses_builtin_weights(tmp_path,
                                                          monkeypatch):
  monkeypatch.setenv('WSSS_JAX_DATA_DIR', str(tmp_path))
  rt = make_runtime(supervised.get_config('tiny'))
  model = segmentation.build_segmenter(rt)
  with pytest.raises(ValueError, match='builtin_weights=pretraining'):
    segmentation.initial_variables(rt, model, jax.random.PRNGKey(0))


@pytest.mark.parametrize('variant', ['voc', 'voc_resnet', 'coco'])
def test_paper_presets_keep_the_papers_init_and_last_weights(variant):
  benchmark = supervised.get_config()
  assert benchmark.model.init_weights == 'builtin:shapes_pretrain'
  assert benchmark.train.ema_decay == 0.99
  paper = supervised.get_config(variant)
  assert paper.model.init_weights == ''
  assert paper.train.ema_decay == 0.0
