"""BANA stage-3 losses (Eqs. 10–14, supp. 1, 4–8) by hand-computed cases."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from wsss_jax.methods.bana import losses as L
from wsss_jax.methods.bana import objective

# The paper's values (configs/bana.py passes them from config.bana).
PAPER = dict(gamma=7.0, lam=0.1, sigma_gradient=True)

# One image, 1x4 pixels, C = 3 classes:
#   p0: Y_crf = Y_ret = 0           -> S
#   p1: Y_crf = 1, Y_ret = 2        -> ~S
#   p2: Y_crf = 2, Y_ret = 255      -> ~S (Y_ret ignore does not exclude)
#   p3: Y_crf = 255, Y_ret = 1      -> neither
Y_CRF = jnp.asarray([[[0, 1, 2, 255]]], jnp.int32)
Y_RET = jnp.asarray([[[0, 2, 255, 1]]], jnp.int32)
LOGITS_NP = np.asarray([[[[2.0, 0.5, -1.0],
                          [0.3, 1.2, 0.1],
                          [-0.4, 0.8, 0.6],
                          [1.0, 1.0, 1.0]]]], np.float32)
LOGITS = jnp.asarray(LOGITS_NP)
# D = 1 + cos: p1: [1.2, 1.5, 0.9], c* = 1 is the argmax -> ratio 1;
#              p2: [1.6, 1.0, 1.2], c* = 2 -> ratio 1.2 / 1.6 = 0.75.
COSINES = jnp.asarray([[[[0.9, -0.5, 0.1],
                         [0.2, 0.5, -0.1],
                         [0.6, 0.0, 0.2],
                         [0.3, 0.3, 0.3]]]], jnp.float32)


def _np_ce(logits, label):
  z = np.asarray(logits, np.float64)
  log_softmax = z - z.max() - np.log(np.sum(np.exp(z - z.max())))
  return -log_softmax[label]


CE0 = _np_ce(LOGITS_NP[0, 0, 0], 0)
CE1 = _np_ce(LOGITS_NP[0, 0, 1], 1)
CE2 = _np_ce(LOGITS_NP[0, 0, 2], 2)


def _finite_tree(tree):
  return all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(tree))


def test_regions_partition_excludes_ignore():
  reliable, unreliable = L.regions(Y_CRF, Y_RET)
  np.testing.assert_array_equal(reliable, [[[True, False, False, False]]])
  np.testing.assert_array_equal(unreliable, [[[False, True, True, False]]])
  assert not bool(jnp.any(reliable & unreliable))


def test_cosine_scores():
  np.testing.assert_allclose(L.cosine_scores(COSINES)[0, 0, 1],
                             [1.2, 1.5, 0.9], rtol=1e-6)


def test_nal_confidence_hand_computed():
  sigma = L.nal_confidence(COSINES, Y_CRF, gamma=2.0)
  # p0: D = [1.9, 0.5, 1.1], c* = 0 is the argmax -> 1; p3 ignore -> 0.
  np.testing.assert_allclose(sigma, [[[1.0, 1.0, 0.75 ** 2, 0.0]]],
                             rtol=1e-6)
  sigma7 = L.nal_confidence(COSINES, Y_CRF, gamma=7.0)
  np.testing.assert_allclose(sigma7[0, 0, 2], 0.75 ** 7, rtol=1e-5)


def test_nal_confidence_large_gamma_is_binary():
  sigma = L.nal_confidence(COSINES, Y_CRF, gamma=200.0)
  np.testing.assert_allclose(sigma[0, 0, :2], [1.0, 1.0], rtol=1e-6)
  assert float(sigma[0, 0, 2]) < 1e-20                   # 0.75^200 ≈ 1e-25


def test_nal_confidence_degenerate_scores_finite():
  # All cosines −1 (max D = 0): ratio defined as 1; slightly below −1 is
  # clamped; the gradient is finite in both cases.
  cos = jnp.asarray([[[[-1.0, -1.0, -1.0], [-1.0000001, -1.0, 0.5]]]])
  labels = jnp.asarray([[[1, 0]]])

  def total(c):
    return jnp.sum(L.nal_confidence(c, labels, 7.0))

  sigma = L.nal_confidence(cos, labels, 7.0)
  np.testing.assert_allclose(sigma[0, 0, 0], 1.0)
  assert 0.0 <= float(sigma[0, 0, 1]) < 1e-30
  assert _finite_tree(jax.grad(total)(cos))


def test_reliable_cross_entropy_hand_computed():
  reliable, _ = L.regions(Y_CRF, Y_RET)
  np.testing.assert_allclose(L.reliable_cross_entropy(LOGITS, Y_CRF, reliable),
                             CE0, rtol=1e-6)
  # With p1 also reliable, the mean covers both pixels.
  both = reliable.at[0, 0, 1].set(True)
  np.testing.assert_allclose(L.reliable_cross_entropy(LOGITS, Y_CRF, both),
                             (CE0 + CE1) / 2, rtol=1e-6)


def test_weighted_cross_entropy_normalised_by_sigma():
  _, unreliable = L.regions(Y_CRF, Y_RET)
  s2 = 0.75 ** 2
  expected = (1.0 * CE1 + s2 * CE2) / (1.0 + s2)
  np.testing.assert_allclose(
      L.weighted_cross_entropy(LOGITS, COSINES, Y_CRF, unreliable, 2.0,
                               True),
      expected, rtol=1e-6)


def test_noise_aware_loss_total_and_metrics():
  s7 = 0.75 ** 7
  wce = (CE1 + s7 * CE2) / (1.0 + s7)
  loss, metrics = L.noise_aware_loss(LOGITS, COSINES, Y_CRF, Y_RET, **PAPER)
  np.testing.assert_allclose(loss, CE0 + 0.1 * wce, rtol=1e-6)
  np.testing.assert_allclose(metrics['ce'], CE0, rtol=1e-6)
  np.testing.assert_allclose(metrics['wce'], wce, rtol=1e-6)
  np.testing.assert_allclose(metrics['reliable_fraction'], 1 / 3, rtol=1e-6)
  np.testing.assert_allclose(metrics['sigma_mean'], (1.0 + s7) / 2, rtol=1e-5)
  assert all(np.shape(v) == () for v in metrics.values())


def _loss_and_grads(logits, cosines, y_crf, y_ret, **kw):
  kw = dict(PAPER, **kw)

  def f(lg, cs):
    return L.noise_aware_loss(lg, cs, y_crf, y_ret, **kw)
  (loss, metrics), grads = jax.value_and_grad(f, argnums=(0, 1),
                                              has_aux=True)(logits, cosines)
  return loss, metrics, grads


def test_empty_reliable_region_is_zero_and_finite():
  y_ret = jnp.asarray([[[1, 2, 0, 0]]])                 # disagrees everywhere
  loss, metrics, grads = _loss_and_grads(LOGITS, COSINES, Y_CRF, y_ret)
  assert float(metrics['ce']) == 0.0
  assert float(metrics['reliable_fraction']) == 0.0
  np.testing.assert_allclose(loss, 0.1 * metrics['wce'], rtol=1e-6)
  assert np.isfinite(float(loss)) and _finite_tree(grads)


def test_empty_unreliable_region_is_zero_and_finite():
  loss, metrics, grads = _loss_and_grads(LOGITS, COSINES, Y_CRF, Y_CRF)
  assert float(metrics['wce']) == 0.0
  assert float(metrics['sigma_mean']) == 0.0
  np.testing.assert_allclose(metrics['reliable_fraction'], 1.0)
  np.testing.assert_allclose(loss, (CE0 + CE1 + CE2) / 3, rtol=1e-6)
  assert _finite_tree(grads)
  np.testing.assert_array_equal(grads[1], 0.0)           # σ unused


def test_zero_sigma_sum_is_zero_and_finite():
  # ~S = {p1, p2} and D_{c*} = 0 at both (cos = −1 for the Y_crf class).
  cos = COSINES.at[0, 0, 1, 1].set(-1.0).at[0, 0, 2, 2].set(-1.0)
  loss, metrics, grads = _loss_and_grads(LOGITS, cos, Y_CRF, Y_RET)
  assert float(metrics['wce']) == 0.0
  np.testing.assert_allclose(loss, CE0, rtol=1e-6)
  assert _finite_tree(grads)


def test_everything_ignored_is_zero_and_finite():
  ignore = jnp.full_like(Y_CRF, 255)
  loss, metrics, grads = _loss_and_grads(LOGITS, COSINES, ignore, ignore)
  assert float(loss) == 0.0
  assert all(float(v) == 0.0 for v in metrics.values())
  assert _finite_tree(grads)


def test_sigma_gradient_switch():
  on = _loss_and_grads(LOGITS, COSINES, Y_CRF, Y_RET, sigma_gradient=True)
  off = _loss_and_grads(LOGITS, COSINES, Y_CRF, Y_RET, sigma_gradient=False)
  np.testing.assert_allclose(on[0], off[0], rtol=1e-7)  # same value
  np.testing.assert_allclose(on[2][0], off[2][0], rtol=1e-6)  # d/d logits
  np.testing.assert_array_equal(off[2][1], 0.0)          # σ detached
  # Only p2 has σ < 1 with a non-trivial ratio: its cosines get a gradient.
  assert float(jnp.max(jnp.abs(on[2][1][0, 0, 2]))) > 1e-4


def test_entropy_regularization():
  _, unreliable = L.regions(Y_CRF, Y_RET)
  uniform = jnp.zeros_like(LOGITS)
  np.testing.assert_allclose(L.entropy_regularization(uniform, unreliable),
                             np.log(3.0), rtol=1e-6)
  peaked = jnp.asarray([[[[50.0, 0.0, 0.0]] * 4]])
  assert float(L.entropy_regularization(peaked, unreliable)) < 1e-15
  # Only ~S counts: p0 (S) is uniform, ~S peaked.
  mixed = peaked.at[0, 0, 0].set(0.0)
  assert float(L.entropy_regularization(mixed, unreliable)) < 1e-15
  empty = jnp.zeros_like(unreliable)
  g = jax.grad(L.entropy_regularization)(LOGITS, empty)
  assert float(L.entropy_regularization(LOGITS, empty)) == 0.0
  assert _finite_tree(g)


def test_bootstrapping_beta_one_is_ce_on_unreliable():
  _, unreliable = L.regions(Y_CRF, Y_RET)
  np.testing.assert_allclose(
      L.bootstrapping_loss(LOGITS, Y_CRF, unreliable, 1.0), (CE1 + CE2) / 2,
      rtol=1e-6)


def test_bootstrapping_value_and_stop_gradient():
  _, unreliable = L.regions(Y_CRF, Y_RET)
  beta = 0.3
  # Value: β CE + (1 − β) entropy, averaged over ~S.
  z = LOGITS_NP[0, 0, 1:3].astype(np.float64)
  logp = z - np.log(np.sum(np.exp(z), -1, keepdims=True))
  entropy = -np.sum(np.exp(logp) * logp, -1)
  expected = np.mean(beta * np.array([CE1, CE2]) + (1 - beta) * entropy)
  for target_gradient in (False, True):
    np.testing.assert_allclose(
        L.bootstrapping_loss(LOGITS, Y_CRF, unreliable, beta,
                             target_gradient), expected, rtol=1e-6)
  # Gradient with a constant target: β × gradient of CE on ~S.
  g_bs = jax.grad(L.bootstrapping_loss)(LOGITS, Y_CRF, unreliable, beta,
                                        False)
  g_ce = jax.grad(L.reliable_cross_entropy)(LOGITS, Y_CRF, unreliable)
  np.testing.assert_allclose(g_bs, beta * g_ce, atol=1e-6)
  # Differentiated target, β = 0: exactly entropy regularisation.
  g_full = jax.grad(L.bootstrapping_loss)(LOGITS, Y_CRF, unreliable, 0.0,
                                          True)
  g_er = jax.grad(L.entropy_regularization)(LOGITS, unreliable)
  np.testing.assert_allclose(g_full, g_er, atol=1e-6)
  assert float(jnp.max(jnp.abs(g_full))) > 1e-3


def test_bootstrapping_empty_is_zero_and_finite():
  empty = jnp.zeros(Y_CRF.shape, bool)
  assert float(L.bootstrapping_loss(LOGITS, Y_CRF, empty, 0.5)) == 0.0
  assert _finite_tree(jax.grad(L.bootstrapping_loss)(LOGITS, Y_CRF, empty,
                                                     0.5))


def test_bootstrap_beta_schedule():
  np.testing.assert_allclose(L.bootstrap_beta(0, 100), 1.0)
  np.testing.assert_allclose(L.bootstrap_beta(50, 100), 0.5 ** 0.9,
                             rtol=1e-6)
  np.testing.assert_allclose(L.bootstrap_beta(100, 100), 0.0)
  np.testing.assert_allclose(L.bootstrap_beta(150, 100), 0.0)
  jitted = jax.jit(L.bootstrap_beta)
  np.testing.assert_allclose(jitted(jnp.int32(25), 100), 0.75 ** 0.9,
                             rtol=1e-6)


def test_baseline_loss_kinds_under_jit():
  _, unreliable = L.regions(Y_CRF, Y_RET)
  expected = {
      'nal': L.noise_aware_loss(LOGITS, COSINES, Y_CRF, Y_RET, **PAPER)[0],
      'ce_only': CE0,
      'entropy_reg': CE0 + 0.1 * L.entropy_regularization(LOGITS, unreliable),
      'bootstrap': CE0 + 0.1 * L.bootstrapping_loss(
          LOGITS, Y_CRF, unreliable, 0.5 ** 0.9),
      'crf_only': (CE0 + CE1 + CE2) / 3,
      'ret_only': (CE0 + _np_ce(LOGITS_NP[0, 0, 1], 2)
                   + _np_ce(LOGITS_NP[0, 0, 3], 1)) / 3,
  }
  assert set(expected) == set(L.LOSS_KINDS)
  for kind in L.LOSS_KINDS:
    def loss_fn(lg, kind=kind):
      return L.baseline_loss(kind, lg, COSINES, Y_CRF, Y_RET,
                             step=jnp.int32(50), total_steps=100, **PAPER)
    fn = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))
    (loss, metrics), grads = fn(LOGITS)
    np.testing.assert_allclose(loss, expected[kind], rtol=1e-6, err_msg=kind)
    assert 'ce' in metrics and 'reliable_fraction' in metrics
    assert _finite_tree(grads), kind


def test_ce_only_ignores_unreliable_pixels():
  changed = LOGITS.at[0, 0, 1:3].add(jnp.asarray([[3.0, -2.0, 1.0],
                                                  [-1.0, 4.0, 0.5]]))
  kw = dict(step=0, total_steps=10, **PAPER)
  a = L.baseline_loss('ce_only', LOGITS, COSINES, Y_CRF, Y_RET, **kw)[0]
  b = L.baseline_loss('ce_only', changed, COSINES, Y_CRF, Y_RET, **kw)[0]
  np.testing.assert_allclose(a, b, rtol=1e-7)
  # ...whereas NAL uses them.
  c = L.baseline_loss('nal', LOGITS, COSINES, Y_CRF, Y_RET, **kw)[0]
  d = L.baseline_loss('nal', changed, COSINES, Y_CRF, Y_RET, **kw)[0]
  assert abs(float(c) - float(d)) > 1e-3


def test_invalid_kind_raises():
  with pytest.raises(ValueError, match='nal'):
    L.baseline_loss('focal', LOGITS, COSINES, Y_CRF, Y_RET, step=0,
                    total_steps=10, **PAPER)


def test_nal_parameters_have_no_default():
  # γ, λ and the σ switch always come from config.bana (one source).
  with pytest.raises(TypeError):
    L.noise_aware_loss(LOGITS, COSINES, Y_CRF, Y_RET)
  with pytest.raises(TypeError):
    L.baseline_loss('nal', LOGITS, COSINES, Y_CRF, Y_RET, step=0,
                    total_steps=10)


def _bana_config(**changes):
  import ml_collections  # pylint: disable=g-import-not-at-top
  cfg = ml_collections.ConfigDict(dict(
      loss='nal', lam=0.1, gamma=7.0, grid=4, pooling='bap',
      min_background_fraction=0.125, balance_rows=True,
      compat=dict(bap_roi_grid=(1, 1), bap_sampling='aligned',
                  nal_sigma_gradient=True)))
  for key, value in changes.items():
    section, name = (cfg.compat, key[7:]) if key.startswith('compat_') else (
        cfg, key)
    section[name] = value
  return cfg


def test_options_hold_plain_values():
  nal = objective.NoiseAwareOptions.from_config(_bana_config())
  assert nal == objective.NoiseAwareOptions('nal', 0.1, 7.0, True)
  bap = objective.BapOptions.from_config(_bana_config())
  assert bap == objective.BapOptions(4, (1, 1), 'aligned', 'bap', 0.125, True)
  assert type(bap.roi_grid) is tuple and type(bap.grid) is int


@pytest.mark.parametrize('changes, message', [
    (dict(loss='focal'), "bana.loss='focal': expected one of"),
    (dict(lam=-1.0), 'bana.lam=-1.0'),
    (dict(gamma=-7.0), 'bana.gamma=-7.0'),
])
def test_noise_aware_options_name_the_bad_field(changes, message):
  with pytest.raises(ValueError, match=re.escape(message)):
    objective.NoiseAwareOptions.from_config(_bana_config(**changes))


@pytest.mark.parametrize('changes, message', [
    (dict(grid=0), 'bana.grid=0'),
    (dict(pooling='max'), "bana.pooling='max'"),
    (dict(min_background_fraction=2.0), 'bana.min_background_fraction=2.0'),
    (dict(compat_bap_roi_grid=(3, 3)), 'bana.compat.bap_roi_grid=(3, 3)'),
    (dict(compat_bap_sampling='nearest'), "bana.compat.bap_sampling='nearest'"),
])
def test_bap_options_name_the_bad_field(changes, message):
  with pytest.raises(ValueError, match=re.escape(message)):
    objective.BapOptions.from_config(_bana_config(**changes))
