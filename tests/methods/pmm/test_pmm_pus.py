"""PMM's Pretended Under-fitting Strategy (Eqs. 10–13): the per-pixel
transforms, their gradients and the two switch scopes, by hand."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from wsss_jax.methods.pmm import pus

CE4 = jnp.asarray([0.2, 0.4, 0.6, 1.0], jnp.float32)


def _value_and_grad(mode, ce=CE4, kappa=0.5, **kwargs):
  fn = lambda x: jnp.sum(pus.pus_transform(x, mode, kappa, **kwargs))
  return pus.pus_transform(ce, mode, kappa, **kwargs), jax.grad(fn)(ce)


# ----------------------------------------------------------------------------
# Eqs. (11)–(13)
# ----------------------------------------------------------------------------
def test_clamp_values_and_gradients():
  value, grad = _value_and_grad('clamp')
  # min(L, 0.5); gradient 1 below κ, 0 above (Eq. 11's L·κ/L without
  # stop-gradient).
  np.testing.assert_allclose(value, [0.2, 0.4, 0.5, 0.5])
  np.testing.assert_allclose(grad, [1.0, 1.0, 0.0, 0.0])


def test_pow_values_and_gradients():
  value, grad = _value_and_grad('pow')
  # sqrt(L): 0.4472136 0.6324555 0.7745967 1; gradient 0.5 / sqrt(L):
  # 1.118034 0.7905694 0.6454972 0.5.
  np.testing.assert_allclose(value, [0.4472136, 0.6324555, 0.7745967, 1.0],
                             rtol=1e-6)
  np.testing.assert_allclose(grad, [1.118034, 0.7905694, 0.6454972, 0.5],
                             rtol=1e-5)
  # At L = 0 the code's 1e-9 keeps both finite: (1e-9)^0.5 = 3.16228e-5,
  # gradient 0.5 · (1e-9)^−0.5 = 15811.39.
  value, grad = _value_and_grad('pow', ce=jnp.zeros(1, jnp.float32))
  np.testing.assert_allclose(value, [3.16228e-5], rtol=1e-4)
  np.testing.assert_allclose(grad, [15811.39], rtol=1e-4)


def test_ignore_values_gradients_and_inclusive_switch():
  value, grad = _value_and_grad('ignore')
  np.testing.assert_allclose(value, [0.2, 0.4, 0.0, 0.0])
  np.testing.assert_allclose(grad, [1.0, 1.0, 0.0, 0.0])
  at_kappa = jnp.asarray([0.5, 0.3], jnp.float32)
  # Paper: L >= κ dropped; code: L <= κ kept.
  np.testing.assert_allclose(pus.pus_transform(at_kappa, 'ignore', 0.5),
                             [0.0, 0.3])
  np.testing.assert_allclose(
      pus.pus_transform(at_kappa, 'ignore', 0.5, ignore_inclusive=True),
      [0.5, 0.3])


def test_none_and_bad_modes():
  value, grad = _value_and_grad('none')
  np.testing.assert_allclose(value, CE4)
  np.testing.assert_allclose(grad, 1.0)
  with pytest.raises(ValueError, match='pus_mode'):
    pus.pus_transform(CE4, 'log', 0.5)
  with pytest.raises(ValueError, match='pus_kappa'):
    pus.pus_transform(CE4, 'pow', 0.0)


# ----------------------------------------------------------------------------
# Eq. (10), scope 'per_image_valid'
# ----------------------------------------------------------------------------
def test_per_image_switch_on_and_off():
  ce = jnp.asarray([[[0.2, 0.6]], [[0.9, 0.7]]], jnp.float32)
  valid = jnp.ones(ce.shape, bool)
  loss_fn = functools.partial(pus.pus_loss, mode='clamp', beta=0.5, kappa=0.5)
  loss, metrics = loss_fn(ce, valid)
  # Image 0: mean 0.4 < β -> clamp -> [0.2, 0.5]; image 1: mean 0.8 -> plain.
  # Loss (0.2 + 0.5 + 0.9 + 0.7) / 4 = 0.575; mean CE 2.4 / 4 = 0.6.
  np.testing.assert_allclose(loss, 0.575, rtol=1e-6)
  np.testing.assert_allclose(metrics['pus/active'], 0.5)
  np.testing.assert_allclose(metrics['pus/mean_ce'], 0.6, rtol=1e-6)
  grad = jax.grad(lambda x: loss_fn(x, valid)[0])(ce)
  # 1/4 per pixel, except the clamped 0.6 of the switched image.
  np.testing.assert_allclose(grad, [[[0.25, 0.0]], [[0.25, 0.25]]])
  # Mode 'none' never switches: plain mean 0.6.
  loss, metrics = pus.pus_loss(ce, valid, mode='none', beta=0.5, kappa=0.5)
  np.testing.assert_allclose(loss, 0.6, rtol=1e-6)
  np.testing.assert_allclose(metrics['pus/active'], 0.0)


def test_all_ignore_image_is_finite_and_not_switched():
  ce = jnp.asarray([[[0.3, 0.7]], [[5.0, 5.0]]], jnp.float32)
  valid = jnp.asarray([[[True, True]], [[False, False]]])
  loss_fn = functools.partial(pus.pus_loss, mode='pow', beta=0.5, kappa=0.5)
  loss, metrics = loss_fn(ce, valid)
  # Image 0: mean exactly β (not < β) -> plain; image 1: no valid pixel
  # (its mean would read 0 < β) -> not switched, contributes 0.
  # Loss (0.3 + 0.7) / 2 = 0.5.
  np.testing.assert_allclose(loss, 0.5, rtol=1e-6)
  np.testing.assert_allclose(metrics['pus/active'], 0.0)
  np.testing.assert_allclose(metrics['pus/mean_ce'], 0.5, rtol=1e-6)
  grad = jax.grad(lambda x: loss_fn(x, valid)[0])(ce)
  np.testing.assert_allclose(grad, [[[0.5, 0.5]], [[0.0, 0.0]]])
  # A whole batch without a valid pixel: 0, finite zero gradients.
  none = jnp.zeros(ce.shape, bool)
  for scope in pus.PUS_SCOPES:
    f = lambda x: pus.pus_loss(x, none, mode='pow', beta=0.5, kappa=0.5,
                               scope=scope)[0]
    grad = jax.grad(f)(jnp.zeros_like(ce))
    assert np.isfinite(f(ce)) and np.isfinite(grad).all()
    np.testing.assert_allclose(grad, 0.0)


# ----------------------------------------------------------------------------
# Eq. (10), scope 'per_device_batch_all_pixels' (official code)
# ----------------------------------------------------------------------------
def _group_batch():
  """B = 4, 1×4 images.  Images 0 and 1: one valid pixel of CE 1.6, three
  ignored; images 2 and 3: four valid pixels of CE 0.8."""
  ce = np.zeros((4, 1, 4), np.float32)
  valid = np.zeros((4, 1, 4), bool)
  ce[0:2, 0, 0] = 1.6
  valid[0:2, 0, 0] = True
  ce[2:4] = 0.8
  valid[2:4] = True
  return jnp.asarray(ce), jnp.asarray(valid)


def test_group_scope_switches_where_the_per_image_scope_does_not():
  ce, valid = _group_batch()
  kwargs = dict(mode='clamp', beta=0.5, kappa=0.5)
  loss, metrics = pus.pus_loss(ce, valid, scope='per_device_batch_all_pixels',
                               group_size=2, **kwargs)
  # Group 0 (images 0–1): valid-pixel mean 1.6 but all-pixel mean
  # 3.2 / 8 = 0.4 < β -> switched, 1.6 -> 0.5 twice (sum 1.0).  Group 1:
  # mean 0.8 -> plain, sum 6.4.  Loss (1.0 + 6.4) / 16 = 0.4625.
  np.testing.assert_allclose(loss, 0.4625, rtol=1e-6)
  np.testing.assert_allclose(metrics['pus/active'], 0.5)
  np.testing.assert_allclose(metrics['pus/mean_ce'], 9.6 / 10, rtol=1e-6)
  # Per image on valid pixels: means 1.6, 1.6, 0.8, 0.8, nothing switches;
  # loss 9.6 / 10 = 0.96.
  loss, metrics = pus.pus_loss(ce, valid, **kwargs)
  np.testing.assert_allclose(loss, 0.96, rtol=1e-6)
  np.testing.assert_allclose(metrics['pus/active'], 0.0)
  # 'pow' keeps the code's (0 + 1e-9)^κ on the six ignored pixels of the
  # switched group: (2 · sqrt(1.6) + 6 · 3.16228e-5 + 6.4) / 16
  # = (2.5298221 + 0.0001897 + 6.4) / 16 = 0.5581257.
  loss, _ = pus.pus_loss(ce, valid, mode='pow', beta=0.5, kappa=0.5,
                         scope='per_device_batch_all_pixels')
  np.testing.assert_allclose(loss, 0.5581257, rtol=1e-6)
  # Mode 'none': the all-pixel mean 9.6 / 16 = 0.6.
  loss, metrics = pus.pus_loss(ce, valid, mode='none', beta=0.5, kappa=0.5,
                               scope='per_device_batch_all_pixels')
  np.testing.assert_allclose(loss, 0.6, rtol=1e-6)
  np.testing.assert_allclose(metrics['pus/active'], 0.0)


def test_group_scope_gradient_and_jit():
  ce, valid = _group_batch()
  f = jax.jit(lambda x: pus.pus_loss(
      x, valid, mode='clamp', beta=0.5, kappa=0.5,
      scope='per_device_batch_all_pixels')[0])
  grad = np.asarray(jax.grad(f)(ce))
  # Switched group: the clamped 1.6s get 0, and so do the ignored pixels
  # (their CE is replaced by 0).  Plain group: 1/16 per pixel (all-pixel
  # mean over 16 pixels).
  np.testing.assert_allclose(grad[0:2], 0.0)
  np.testing.assert_allclose(grad[2:4], 1.0 / 16)
  assert np.isfinite(grad).all()


def test_bad_arguments():
  ce, valid = _group_batch()
  with pytest.raises(ValueError, match='pmm.pus_group_size'):
    pus.pus_loss(ce[:3], valid[:3], mode='clamp', beta=0.5, kappa=0.5,
                 scope='per_device_batch_all_pixels', group_size=2)
  with pytest.raises(ValueError, match='pus_switch_scope'):
    pus.pus_loss(ce, valid, mode='clamp', beta=0.5, kappa=0.5, scope='batch')
  with pytest.raises(ValueError, match='pus_mode'):
    pus.pus_loss(ce, valid, mode='soft', beta=0.5, kappa=0.5)
  with pytest.raises(ValueError, match='valid'):
    pus.pus_loss(ce, valid[:2], mode='clamp', beta=0.5, kappa=0.5)
