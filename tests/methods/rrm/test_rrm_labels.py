"""RRM's reliable labels (Eqs. 3–7), its cross-entropy (Eq. 9), the network
and the in-step CRF, on cases small enough to check by hand."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from wsss_jax import defaults
from wsss_jax.configs import rrm as rrm_config
from wsss_jax.crf import dense_crf as jax_crf
from wsss_jax.crf import traced
from wsss_jax.data import schema
from wsss_jax.host import crf as host_crf
from wsss_jax.methods.rrm import labels, model as rrm_model, objective
from wsss_jax.methods.rrm import pipeline as rrm_pipeline
from wsss_jax.training.step import LossContext

IGNORE = schema.IGNORE_LABEL


def test_foreground_background_probs_by_hand():
  cam = np.zeros((1, 1, 3, 2), np.float32)
  cam[0, 0, :, 0] = [2.0, 1.0, 0.0]          # class 1: max 2
  cam[0, 0, :, 1] = [5.0, 5.0, 5.0]          # class 2: absent
  probs = labels.foreground_background_probs(
      jnp.asarray(cam), jnp.asarray([[True, False]]), gamma=4.0, eps=0.0)
  np.testing.assert_allclose(probs[0, 0, :, 1], [1.0, 0.5, 0.0])
  np.testing.assert_allclose(probs[0, 0, :, 2], 0.0)
  np.testing.assert_allclose(probs[0, 0, :, 0], [0.0, 0.5**4, 1.0])


def _row(pairs):
  """(1, 1, W, 2) probs from [(bg, fg), ...]."""
  return jnp.asarray(np.array(pairs, np.float32)[None, None])


def test_top_ratio_labels_by_hand():
  probs = _row([(0.9, 0.1), (0.8, 0.2), (0.3, 0.7), (0.2, 0.8), (0.4, 0.6),
                (0.95, 0.05), (0.6, 0.4), (0.7, 0.3), (0.05, 0.08)])
  valid = jnp.ones((1, 1, 9), bool)
  got = labels.top_ratio_labels(probs, valid, ratio=0.4, fg_floor=0.1)
  # Background candidates 0.9 .8 .95 .6 .7 (n = 5): sorted, index
  # int(0.6 * 5) = 3 holds 0.9, so only 0.95 is strictly above.  Foreground
  # candidates .7 .8 .6 (0.08 is under the 0.1 floor; n = 3): index 1 holds
  # 0.7, so 0.8 stays.
  np.testing.assert_array_equal(
      got[0, 0], [IGNORE, IGNORE, IGNORE, 1, IGNORE, 0, IGNORE, IGNORE,
                  IGNORE])
  # Ratio 1: every candidate above its class's smallest.
  got = labels.top_ratio_labels(probs, valid, ratio=1.0, fg_floor=0.1)
  np.testing.assert_array_equal(
      got[0, 0], [0, 0, 1, 1, IGNORE, 0, IGNORE, 0, IGNORE])


def test_top_ratio_labels_ignores_invalid_pixels_and_empty_classes():
  probs = _row([(0.9, 0.1), (0.8, 0.2), (0.1, 0.9)])
  valid = jnp.asarray([[[True, True, False]]])
  got = labels.top_ratio_labels(probs, valid, ratio=1.0, fg_floor=0.1)
  # The only foreground pixel is padding: class 1 has no candidate.
  np.testing.assert_array_equal(got[0, 0], [0, IGNORE, IGNORE])


def test_reliable_labels_keep_agreement_on_valid_pixels():
  i_cam = jnp.asarray([[[0, 1, 2, IGNORE]]])
  i_crf = jnp.asarray([[[0, 2, 2, 1]]])
  valid = jnp.asarray([[[True, True, False, True]]])
  np.testing.assert_array_equal(
      labels.reliable_labels(i_cam, i_crf, valid)[0, 0],
      [0, IGNORE, IGNORE, IGNORE])


def test_label_statistics_counts():
  got = labels.label_statistics(
      jnp.asarray([[[0, 1, 1, IGNORE]]]), jnp.asarray([[[0, 2, 1, 1]]]),
      jnp.asarray([[[True, True, True, True]]]), num_classes=3)
  np.testing.assert_array_equal(got['labelled'], [1, 2, 0])
  np.testing.assert_array_equal(got['correct'], [1, 1, 0])
  assert float(got['valid']) == 4


def test_separate_cross_entropy_by_hand_and_empty_terms():
  logits = jnp.asarray([[[[2.0, 0.0], [0.0, 1.0]], [[1.0, 1.0], [3.0, 0.0]]]])
  label_map = jnp.asarray([[[0, 1], [IGNORE, 1]]])
  bg, fg = objective.separate_cross_entropy(logits, label_map)
  log_softmax = jax.nn.log_softmax(logits, -1)[0]
  np.testing.assert_allclose(bg, -log_softmax[0, 0, 0], rtol=1e-6)
  np.testing.assert_allclose(
      fg, -(log_softmax[0, 1, 1] + log_softmax[1, 1, 1]) / 2, rtol=1e-6)
  for only in (0, 1):             # no foreground / no background labelled
    def loss(x):
      return sum(objective.separate_cross_entropy(
          x, jnp.full((1, 2, 2), only)))
    value, grad = jax.value_and_grad(loss)(logits)
    assert np.isfinite(value) and np.all(np.isfinite(grad))
  value, grad = jax.value_and_grad(lambda x: sum(
      objective.separate_cross_entropy(x, jnp.full((1, 2, 2), IGNORE))))(
          logits)
  assert float(value) == 0.0 and np.all(grad == 0)


def _tiny_config(**changes):
  config = rrm_config.get_config('tiny')
  config.rrm.update(**changes)
  return config


def _net(config, classes=3):
  model = rrm_model.build_rrm_model(config, classes)
  images = jnp.zeros((2, 32, 32, 3))
  variables = model.init({'params': jax.random.PRNGKey(0),
                          'dropout': jax.random.PRNGKey(1)}, images)
  return model, variables


def test_network_outputs_and_cam_definition():
  config = _tiny_config()
  model, variables = _net(config)
  images = jax.random.normal(jax.random.PRNGKey(2), (2, 32, 32, 3))
  apply = jax.jit(model.apply, static_argnames=('train', 'method',
                                                 'mutable'))
  out = apply(variables, images)
  assert 'multiscale_cam' not in out
  assert out['logits'].shape == (2, 4, 4, 3)
  assert out['class_logits'].shape == (2, 2)
  kernel = variables['params']['classifier']['kernel'].reshape(-1, 2)
  np.testing.assert_allclose(out['cam'], jax.nn.relu(
      out['features'] @ kernel), rtol=1e-5, atol=1e-6)
  # The classifier has no bias: the class scores are the pooled CAM logits.
  np.testing.assert_allclose(out['class_logits'], jnp.mean(
      out['features'], (1, 2)) @ kernel, rtol=1e-5, atol=1e-6)
  trained, _ = apply(variables, images, train=True,
                     rngs={'dropout': jax.random.PRNGKey(3)},
                     mutable=('batch_stats',))
  # Eq. (2): the mean of the scales' CAMs on the 1.0 grid, inference mode.
  assert trained['multiscale_cam'].shape == (2, 4, 4, 2)
  single = apply(variables, images, method='class_activation_maps')
  half = apply(variables, jax.image.resize(
      images, (2, 16, 16, 3), 'bilinear', antialias=False),
               method='class_activation_maps')
  from wsss_jax.ops.resize import resize_bilinear
  np.testing.assert_allclose(
      trained['multiscale_cam'],
      (single + resize_bilinear(half, (4, 4))) / 2, rtol=1e-4, atol=1e-5)


def _batch(valid=True, image_labels=((1, 0), (0, 1))):
  rng = np.random.default_rng(0)
  images = rng.integers(0, 255, (2, 32, 32, 3)).astype(np.uint8)
  return {schema.IMAGE: jnp.asarray(images),
          schema.VALID: jnp.full((2, 32, 32), valid),
          schema.IMAGE_LABELS: jnp.asarray(image_labels, jnp.float32),
          schema.MASK: jnp.asarray(rng.integers(0, 3, (2, 32, 32)))}


@pytest.mark.parametrize('case,backend,rule', [
    ('normal', 'jax', 'paper'), ('no_class', 'pydensecrf', 'paper'),
    ('all_padding', 'pydensecrf', 'official'),
    ('normal', 'pydensecrf', 'official')])
def test_rrm_loss_is_finite_with_finite_gradients(case, backend, rule):
  config = _tiny_config(reliable_label_rule=rule)
  model, variables = _net(config)
  batch = _batch(valid=case != 'all_padding',
                 image_labels=((0, 0), (0, 0)) if case == 'no_class'
                 else ((1, 0), (1, 1)))
  options = objective.RRMOptions.from_config(config.rrm)
  loss_fn = objective.rrm_loss(options, 3, backend)

  def total(params):
    out, _ = model.apply({**variables, 'params': params},
                         batch[schema.IMAGE].astype(jnp.float32) / 255.0,
                         train=True, rngs={'dropout': jax.random.PRNGKey(0)},
                         mutable=['batch_stats'])
    return loss_fn(out, batch, LossContext(jnp.zeros((), jnp.int32),
                                           jax.random.PRNGKey(1), params))
  (value, metrics), grads = jax.jit(jax.value_and_grad(
      total, has_aux=True))(variables['params'])
  assert np.isfinite(float(value))
  assert all(np.all(np.isfinite(g)) for g in jax.tree_util.tree_leaves(grads))
  assert all(np.isfinite(float(v)) for v in metrics.values())
  if case == 'all_padding':
    assert float(metrics['labelled_pct']) == 0.0


def test_traced_crf_backends_agree_and_overflow_falls_back():
  rng = np.random.default_rng(1)
  images = rng.integers(0, 255, (2, 12, 10, 3)).astype(np.uint8)
  probs = rng.dirichlet(np.ones(3), (2, 12, 10)).astype(np.float32)
  params = host_crf.CrfParams(**rrm_config.LABEL_CRF)
  host = np.stack([host_crf.dense_crf(i, p.transpose(2, 0, 1), params)
                   .transpose(1, 2, 0) for i, p in zip(images, probs)])
  run = jax.jit(lambda i, p: traced.traced_dense_crf(i, p, params,
                                                     'pydensecrf'))
  waited = traced.host_callback_seconds()
  q, overflowed = run(images, probs)
  np.testing.assert_allclose(q, host, atol=1e-6)
  assert not bool(overflowed)
  assert traced.host_callback_seconds() > waited   # the host wait is counted
  full = jax_crf.dense_crf(jnp.asarray(images), jnp.asarray(probs), params)
  tight = jax.jit(lambda i, p: traced.traced_dense_crf(
      i, p, params, 'jax', capacity=(64, 64)))
  q, overflowed = tight(images, probs)
  assert bool(overflowed)
  np.testing.assert_allclose(q, full, atol=1e-6)
  np.testing.assert_allclose(q, host, atol=1e-3)


def test_reliable_label_summary_from_history():
  history = [{'step': 10, 'labels/valid': 100.0, 'labels/labelled_0': 10.0,
              'labels/judged_0': 10.0, 'labels/correct_0': 5.0,
              'labels/labelled_1': 0.0, 'labels/judged_1': 0.0,
              'labels/correct_1': 0.0},
             {'step': 20, 'labels/valid': 100.0, 'labels/labelled_0': 30.0,
              'labels/judged_0': 20.0, 'labels/correct_0': 20.0,
              'labels/labelled_1': 10.0, 'labels/judged_1': 10.0,
              'labels/correct_1': 5.0}]
  got = rrm_pipeline.reliable_label_summary(history, 2, last_steps=10,
                                            class_names=('bg', 'fg'))
  assert got['steps'] == [20, 20]
  assert got['labelled_pct'] == pytest.approx(40.0)
  assert got['precision'] == pytest.approx(25 / 30 * 100)
  assert got['per_class']['fg']['precision'] == pytest.approx(50.0)
  both = rrm_pipeline.reliable_label_summary(history, 2, last_steps=20)
  assert both['per_class']['0']['precision'] == pytest.approx(25 / 30 * 100)


def test_options_reject_bad_values():
  config = _tiny_config(label_source='crf')
  with pytest.raises(ValueError, match='rrm.label_source'):
    objective.RRMOptions.from_config(config.rrm)
  config = _tiny_config(energy_scale=0.25)
  with pytest.raises(ValueError, match='rrm.energy_scale'):
    objective.RRMOptions.from_config(config.rrm)
  assert defaults.crf_config(**rrm_config.TEST_CRF).bilateral_sxy == 83.0


def test_official_rule_by_hand():
  p_fg = jnp.asarray([[[[0.0], [0.05], [0.6], [0.9], [0.95]]]])
  q_low = jnp.asarray([[[[.9, .1], [.7, .3], [.2, .8], [.1, .9],
                         [.05, .95]]]])
  q_high = jnp.asarray([[[[.95, .05], [.5, .5], [.1, .9], [.3, .7],
                          [.85, .15]]]])
  valid = jnp.ones((1, 1, 5), bool)
  kwargs = dict(bg_exponent=32.0, ratio=0.4, fg_floor=0.1, bg_threshold=0.8,
                confidence=0.8)
  # CAM-sure: pixel 0 (background score 1 > 0.8) and pixel 4 (the top
  # foreground candidate of .6, .9, .95: index int(0.6 * 3) = 1 holds .9).
  # The CRF label: the low CRF says 0 0 1 1 1, its background made 255, the
  # high CRF's background (pixels 0, 1 (a tie) and 4) put back: 0 0 1 1 0.
  np.testing.assert_array_equal(
      labels.official_crf_label(q_low, q_high)[0, 0], [0, 0, 1, 1, 0])
  # Pixel 4 keeps the CRF's 0 although the CAM said 1: no agreement check.
  got = labels.official_reliable_labels(p_fg, q_low, q_high, valid, **kwargs)
  np.testing.assert_array_equal(got[0, 0], [0, IGNORE, IGNORE, IGNORE, 0])
  # A class the low CRF never shows has no sure pixel.
  flat = jnp.asarray([[[[.9, .1]] * 5]])
  got = labels.official_reliable_labels(p_fg, flat, q_high, valid, **kwargs)
  np.testing.assert_array_equal(got[0, 0], [0, IGNORE, IGNORE, IGNORE,
                                            IGNORE])
  # Low CRF confidence unlabels a sure pixel.
  unsure = q_high.at[0, 0, 0].set(jnp.asarray([.6, .4]))
  got = labels.official_reliable_labels(p_fg, q_low.at[0, 0, 0].set(
      jnp.asarray([.7, .3])), unsure, valid, **kwargs)
  assert int(got[0, 0, 0]) == IGNORE


def test_official_code_preset_sets_every_switch():
  config = rrm_config.get_config('official_code')
  assert config.rrm.reliable_label_rule == 'official'
  assert config.rrm.energy_kernel == 'lattice_scaled'
  assert config.rrm.energy_backward == 'rloss_custom'
  assert rrm_config.get_config('ce_only,tiny,official_code').rrm.energy_weight == 0
