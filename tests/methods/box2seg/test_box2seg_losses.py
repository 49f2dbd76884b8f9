"""Box2Seg losses (Eqs. 1–11) by hand-computed cases and edge cases."""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from wsss_jax.methods.box2seg import losses as L
from wsss_jax.methods.box2seg import objective


def _onehot(labels, num):
  return jax.nn.one_hot(jnp.asarray(labels), num)


# A 2x2 image, L = 2 foreground classes (3 channels):
#   cells (0,0), (0,1): box of class 1;  (1,0): box of class 2;  (1,1): bg.
B = _onehot([[[1, 1], [2, 0]]], 3)
Y = jnp.asarray([[[[0.2, 0.5, 0.3], [0.1, 0.8, 0.1]],
                  [[0.3, 0.3, 0.4], [0.6, 0.2, 0.2]]]])
LOG_Y = jnp.log(Y)
VALID = jnp.ones((1, 2, 2), bool)
ALPHA = jnp.asarray([[[[0.5, 0.0], [1.0, 0.0]],
                      [[0.0, 0.25], [0.0, 0.0]]]])


def test_box_and_grabcut_loss_hand_computed():
  expected = -(np.log(0.5) + np.log(0.8) + np.log(0.4) + np.log(0.6)) / 4
  np.testing.assert_allclose(L.box_loss(LOG_Y, B, VALID), expected, rtol=1e-6)
  # M differs from B in one cell; a padded cell is not counted (m = 3).
  M = _onehot([[[1, 0], [2, 0]]], 3)
  valid = VALID.at[0, 1, 1].set(False)
  expected = -(np.log(0.5) + np.log(0.1) + np.log(0.4)) / 3
  np.testing.assert_allclose(L.grabcut_loss(LOG_Y, M, valid), expected,
                             rtol=1e-6)


def test_foreground_attention_loss_hand_computed():
  class1 = -(0.5 * np.log(0.5) + 1.0 * np.log(0.8)) / 2
  class2 = -(0.25 * np.log(0.4)) / 1
  np.testing.assert_allclose(
      L.foreground_attention_loss(LOG_Y, ALPHA, B, VALID, 'sum'),
      class1 + class2,
      rtol=1e-6)
  np.testing.assert_allclose(
      L.foreground_attention_loss(LOG_Y, ALPHA, B, VALID, 'mean'),
      (class1 + class2) / 2, rtol=1e-6)


def test_background_and_aw_loss_hand_computed():
  np.testing.assert_allclose(L.background_loss(LOG_Y, B, VALID), -np.log(0.6),
                             rtol=1e-6)
  np.testing.assert_allclose(
      L.attention_weighted_loss(LOG_Y, ALPHA, B, VALID, 'sum'),
      L.foreground_attention_loss(LOG_Y, ALPHA, B, VALID, 'sum')
      - np.log(0.6),
      rtol=1e-6)


def test_bbox_attention_loss_hand_computed():
  # Per cell Σ_c (B − α)²: (0,0): 0.25; (0,1): 0; (1,0): 0.5625; (1,1): 0.
  np.testing.assert_allclose(L.bbox_attention_loss(ALPHA, B, VALID, 'mean'),
                             (0.25 + 0.5625) / 4, rtol=1e-6)
  np.testing.assert_allclose(L.bbox_attention_loss(ALPHA, B, VALID, 'sum'),
                             0.25 + 0.5625, rtol=1e-6)


def test_fill_rates_and_margin_hand_computed():
  M = _onehot([[[1, 0], [2, 0]]], 3)      # GrabCut keeps 1 of 2 class-1 cells
  eta, present = L.grabcut_fill_rates(M, B, VALID)
  np.testing.assert_allclose(eta, [[0.5, 1.0]])
  np.testing.assert_array_equal(present, [[True, True]])
  np.testing.assert_allclose(L.predicted_fill_rates(ALPHA, B, VALID),
                             [[0.75, 0.25]])
  # hinge: class 1: max(0, 0.35 − 0.75) = 0; class 2: 0.7 − 0.25 = 0.45.
  np.testing.assert_allclose(
      L.fill_rate_loss(ALPHA, M, B, VALID, 0.7, 'image_sum'),
      0.45, rtol=1e-6)                                   # summed per image
  np.testing.assert_allclose(L.fill_rate_loss(ALPHA, M, B, VALID, 0.7, 'mean'),
                             0.45 / 2, rtol=1e-6)        # mean over pairs
  np.testing.assert_allclose(L.fill_rate_loss(ALPHA, M, B, VALID, 0.7, 'sum'),
                             0.45, rtol=1e-6)


def test_edge_cases_no_boxes_zero_area_all_background_zero_attention():
  background_only = _onehot(jnp.zeros((1, 2, 2), jnp.int32), 3)
  zeros_alpha = jnp.zeros((1, 2, 2, 2))
  # No box at all: L_fg = 0, L_α terms = 0, L_bg over every cell.
  assert float(L.foreground_attention_loss(LOG_Y, zeros_alpha,
                                           background_only, VALID,
                                           'sum')) == 0.0
  assert float(L.fill_rate_loss(zeros_alpha, background_only,
                                background_only, VALID, 0.7, 'sum')) == 0.0
  # A class whose box covers no cell is absent, not 0/0.
  eta, present = L.grabcut_fill_rates(B, background_only, VALID)
  assert not bool(present.any()) and np.all(np.isfinite(eta))
  # All cells inside boxes: no definite background -> L_bg = 0, not NaN.
  all_boxes = _onehot([[[1, 1], [2, 2]]], 3)
  assert float(L.background_loss(LOG_Y, all_boxes, VALID)) == 0.0
  # Attention all zeros: L_fg = 0 and the fill-rate margin pushes α up.
  M = B
  grad = jax.grad(lambda a: L.fill_rate_loss(a, M, B, VALID, 0.7, 'sum'))(
      zeros_alpha)
  assert float(L.foreground_attention_loss(LOG_Y, zeros_alpha, B, VALID,
                                           'sum')) == 0
  assert float(grad[0, 0, 0, 0]) < 0 and float(grad[0, 1, 0, 1]) < 0
  # Every cell padded: everything finite and zero.
  none = jnp.zeros((1, 2, 2), bool)
  for value in (L.box_loss(LOG_Y, B, none), L.background_loss(LOG_Y, B, none),
                L.foreground_attention_loss(LOG_Y, ALPHA, B, none, 'sum'),
                L.bbox_attention_loss(ALPHA, B, none, 'mean'),
                L.fill_rate_loss(ALPHA, B, B, none, 0.7, 'sum')):
    assert float(value) == 0.0


def test_affinity_is_cosine():
  np.testing.assert_allclose(
      L.affinity(jnp.asarray([3.0, 0.0]), jnp.asarray([1.0, 1.0])),
      1 / np.sqrt(2), rtol=1e-6)
  assert float(L.affinity(jnp.zeros(2), jnp.ones(2))) == 0.0   # no NaN


def _explicit_affinity_loss(beta, targets, picked, reduction):
  out = []
  for b, t, p in zip(beta, targets, picked):
    b, t = b[p], t[p]
    b = b / np.maximum(np.linalg.norm(b, axis=-1, keepdims=True), 1e-12)
    diff = b @ b.T - t @ t.T
    np.fill_diagonal(diff, 0.0)
    total = (diff ** 2).sum()
    n = len(b)
    out.append(total / max(n * (n - 1), 1) if reduction == 'mean' else total)
  return np.mean(out)


@pytest.mark.parametrize('reduction', ['mean', 'sum'])
def test_affinity_loss_equals_explicit_pairwise_sum(reduction):
  rng = np.random.default_rng(0)
  beta = rng.normal(size=(3, 9, 4))
  targets = jax.nn.softmax(rng.normal(size=(3, 9, 5)) * 3)
  picked = rng.random((3, 9)) < 0.7
  picked[2] = False                                    # an empty image
  got = L.affinity_loss(jnp.asarray(beta, jnp.float32),
                        jnp.asarray(targets, jnp.float32),
                        jnp.asarray(picked), reduction)
  expected = _explicit_affinity_loss(beta, np.asarray(targets), picked,
                                     reduction)
  np.testing.assert_allclose(got, expected, rtol=1e-4)


def test_affinity_loss_is_zero_for_perfect_embeddings():
  labels = jnp.asarray([[0, 0, 1, 2, 1]])
  targets = jax.nn.one_hot(labels, 3)
  beta = targets * 4.0                                  # orthogonal per class
  assert abs(float(L.affinity_loss(beta, targets, jnp.ones((1, 5), bool),
                                   'mean'))) < 1e-6


def test_sampler_is_class_balanced_and_redistributes():
  # 100 background, 10 of class 1, 50 of class 2, 40 padded cells.
  labels = jnp.asarray([[0] * 100 + [1] * 10 + [2] * 50 + [0] * 40])
  valid = jnp.asarray([[True] * 160 + [False] * 40])
  for n, expected in ((30, [10, 10, 10]), (60, [25, 10, 25]),
                      (160, [100, 10, 50])):
    index, picked = L.class_balanced_sample(labels, valid,
                                            jax.random.PRNGKey(n), n)
    chosen = np.asarray(labels[0])[np.asarray(index[0])[np.asarray(picked[0])]]
    np.testing.assert_array_equal(np.bincount(chosen, minlength=3), expected)
    assert len(set(np.asarray(index[0]).tolist())) == n      # no repeats
    assert np.all(np.asarray(valid[0])[np.asarray(index[0])[
        np.asarray(picked[0])]])
  # More samples than valid cells: the extra slots are flagged unpicked.
  _, picked = L.class_balanced_sample(labels, valid, jax.random.PRNGKey(0),
                                      180)
  assert int(picked.sum()) == 160


def test_total_loss_weights():
  assert float(L.total_loss(1.0, 2.0, 3.0, 4.0, lambda_aw=10.0,
                            lambda_alpha=1.0,
                            lambda_affinity=1.0)) == 1 + 20 + 3 + 4
  assert float(L.total_loss(1.0, 2.0, 3.0, 4.0, lambda_aw=0.0,
                            lambda_alpha=0.0, lambda_affinity=0.0)) == 1.0


def test_reductions_have_no_default():
  # The value always comes from config.box2seg (one source per default).
  for fn, args in ((L.foreground_attention_loss, (LOG_Y, ALPHA, B, VALID)),
                   (L.bbox_attention_loss, (ALPHA, B, VALID)),
                   (L.fill_rate_loss, (ALPHA, B, B, VALID, 0.7))):
    with pytest.raises(TypeError):
      fn(*args)


def _box2seg_config():
  import ml_collections  # pylint: disable=g-import-not-at-top
  return ml_collections.ConfigDict(dict(
      weights=dict(box=0.0, grabcut=1.0, aw=10.0, alpha=1.0, affinity=1.0),
      alpha_regularizer='fill_rate', fill_rate_gamma=0.7,
      fill_rate_reduction='sum', fg_class_reduction='sum',
      bbox_reg_reduction='sum', affinity_pair_fraction=0.1,
      affinity_reduction='mean', affinity_stop_grad_y=False,
      aw_warmup_steps=300))


def test_options_hold_plain_values():
  options = objective.Box2SegLossOptions.from_config(_box2seg_config())
  assert options.weights == objective.LossWeights(0.0, 1.0, 10.0, 1.0, 1.0)
  assert type(options.aw_warmup_steps) is int
  assert type(options.fill_rate_gamma) is float
  with pytest.raises(dataclasses.FrozenInstanceError):
    options.fill_rate_gamma = 0.5  # type: ignore[misc]


@pytest.mark.parametrize('field, value, message', [
    ('alpha_regularizer', 'x',
     "box2seg.alpha_regularizer='x': expected one of ('fill_rate', 'bbox')"),
    ('fill_rate_reduction', 'max', 'box2seg.fill_rate_reduction='),
    ('fg_class_reduction', 'max', 'box2seg.fg_class_reduction='),
    ('bbox_reg_reduction', 'max', 'box2seg.bbox_reg_reduction='),
    ('affinity_reduction', 'max', 'box2seg.affinity_reduction='),
    ('fill_rate_gamma', 1.5, 'box2seg.fill_rate_gamma='),
    ('affinity_pair_fraction', -0.1, 'box2seg.affinity_pair_fraction='),
    ('aw_warmup_steps', -1, 'box2seg.aw_warmup_steps='),
])
def test_options_name_the_bad_field(field, value, message):
  cfg = _box2seg_config()
  cfg[field] = value
  with pytest.raises(ValueError, match=re.escape(message)):
    objective.Box2SegLossOptions.from_config(cfg)
  cfg = _box2seg_config()
  cfg.weights.aw = -1.0
  with pytest.raises(ValueError, match=re.escape('box2seg.weights.aw=-1.0')):
    objective.Box2SegLossOptions.from_config(cfg)


@settings(max_examples=20, deadline=None)
@given(st.integers(0, 2**31 - 1), st.floats(0.0, 1.0), st.booleans())
def test_gradients_finite_on_random_and_degenerate_inputs(seed, pad, no_boxes):
  rng = np.random.default_rng(seed)
  logits = jnp.asarray(rng.normal(0, 30, (2, 4, 4, 3)), jnp.float32)
  labels = rng.integers(0, 3, (2, 4, 4))
  if no_boxes:
    labels[:] = 0
  box = _onehot(labels, 3)
  grabcut = _onehot(rng.integers(0, 3, (2, 4, 4)), 3)
  valid = jnp.asarray(rng.random((2, 4, 4)) >= pad)
  alpha_logits = jnp.asarray(rng.normal(0, 30, (2, 4, 4, 2)), jnp.float32)
  beta = jnp.asarray(rng.normal(0, 1, (2, 16, 3)) * (rng.random() < 0.5),
                     jnp.float32)

  def loss(logits, alpha_logits, beta):
    log_y = jax.nn.log_softmax(logits)
    alpha = jax.nn.sigmoid(alpha_logits)
    index, picked = L.class_balanced_sample(
        jnp.asarray(labels.reshape(2, -1)), valid.reshape(2, -1),
        jax.random.PRNGKey(seed % 1000), 6)
    y = jnp.take_along_axis(jnp.exp(log_y).reshape(2, 16, 3),
                            index[..., None], axis=1)
    b = jnp.take_along_axis(beta, index[..., None], axis=1)
    return L.total_loss(
        L.grabcut_loss(log_y, grabcut, valid),
        L.attention_weighted_loss(log_y, alpha, box, valid, 'sum'),
        L.fill_rate_loss(alpha, grabcut, box, valid, 0.7, 'sum')
        + L.bbox_attention_loss(alpha, box, valid, 'mean'),
        L.affinity_loss(b, y, picked, 'mean'),
        lambda_aw=10.0, lambda_alpha=1.0, lambda_affinity=1.0)

  value, grads = jax.value_and_grad(loss, argnums=(0, 1, 2))(
      logits, alpha_logits, beta)
  assert np.isfinite(float(value))
  for g in grads:
    assert np.all(np.isfinite(np.asarray(g)))
