"""Optimiser: parameter groups, PyTorch-equivalent SGD/Adam, schedules."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from wsss_jax import defaults
from wsss_jax.training import optim


def _params():
  return {'backbone': {'conv': {'kernel': jnp.ones((2, 2)),
                                'bias': jnp.ones((2,))}},
          'head': {'classifier': {'kernel': jnp.ones((2, 3)),
                                  'bias': jnp.ones((3,))}}}


def test_parameter_groups_and_decay_mask():
  groups = optim.parameter_groups(_params(), ('head',))
  assert groups['backbone']['conv'] == {'kernel': 'backbone_weight',
                                        'bias': 'backbone_bias'}
  assert groups['head']['classifier'] == {'kernel': 'head_weight',
                                          'bias': 'head_bias'}
  mask = optim.weight_decay_mask(_params())
  assert mask['backbone']['conv'] == {'kernel': True, 'bias': False}


def test_poly_schedule_matches_pytorch_lambdalr():
  config = defaults.sgd_deeplab(lr=1.0)
  schedule = optim.make_schedule(config, 10)
  # 1-based iteration t trains with lr·(1 − (t−1)/T)^0.9.
  np.testing.assert_allclose([schedule(0), schedule(1), schedule(9)],
                             [1.0, 0.9 ** 0.9, 0.1 ** 0.9], rtol=1e-5)


def test_linear_warmup_hand_computed():
  config = defaults.sgd_deeplab(lr=1.0)
  config.schedule = 'constant'
  config.warmup_steps = 4
  schedule = optim.make_schedule(config, 10)
  np.testing.assert_allclose([float(schedule(t)) for t in (0, 1, 3, 7)],
                             [0.25, 0.5, 1.0, 1.0], rtol=1e-6)
  config.schedule, config.warmup_steps = 'poly', 2
  schedule = optim.make_schedule(config, 10)
  # step 0: 1 · 1/2;  step 1: 0.9^0.9 · 1.
  np.testing.assert_allclose([float(schedule(0)), float(schedule(1))],
                             [0.5, 0.9 ** 0.9], rtol=1e-5)


def test_step_schedule():
  config = defaults.sgd_deeplab(lr=1.0)
  config.schedule = 'step'
  config.step_boundaries = (0.5,)
  schedule = optim.make_schedule(config, 10)
  assert float(schedule(4)) == 1.0 and abs(float(schedule(5)) - 0.1) < 1e-7


def _pytorch_sgd(params, grads_per_step, lr_of_step, momentum, wd, mults,
                 decay):
  """PyTorch's SGD rule, written out: d = g + wd·w (if decayed);
  buf = d (first step) or μ·buf + d; w -= lr·mult·buf."""
  params = {k: np.array(v, np.float64) for k, v in params.items()}
  bufs = {}
  for step, grads in enumerate(grads_per_step):
    for k in params:
      d = grads[k] + (wd * params[k] if decay[k] else 0.0)
      bufs[k] = d if k not in bufs else momentum * bufs[k] + d
      params[k] = params[k] - lr_of_step(step) * mults[k] * bufs[k]
  return params


def test_sgd_with_groups_equals_pytorch_rule_over_three_steps():
  config = defaults.sgd_deeplab(lr=0.1)
  params = _params()
  rng = np.random.default_rng(0)
  grads = [jax.tree.map(lambda p: rng.normal(size=p.shape), params)
           for _ in range(3)]
  tx = optim.make_optimizer(config, params, num_steps=10)
  state = tx.init(params)
  current = params
  for g in grads:
    updates, state = tx.update(jax.tree.map(jnp.asarray, g), state, current)
    current = optax.apply_updates(current, updates)
  flat = lambda tree: {'/'.join(str(p.key) for p in path): v
                       for path, v in jax.tree_util.tree_leaves_with_path(tree)}
  mults = {'backbone/conv/kernel': 1.0, 'backbone/conv/bias': 2.0,
           'head/classifier/kernel': 10.0, 'head/classifier/bias': 20.0}
  decay = {k: k.endswith('kernel') for k in mults}
  schedule = optim.make_schedule(config, 10)
  expected = _pytorch_sgd(flat(params), [flat(g) for g in grads],
                          lambda s: float(schedule(s)), 0.9, 5e-4, mults,
                          decay)
  for key, value in flat(current).items():
    np.testing.assert_allclose(value, expected[key], rtol=1e-5, atol=1e-6)


def test_adam_is_l2_not_adamw():
  config = defaults.sgd_deeplab(lr=0.01)
  config.name = 'adam'
  config.schedule = 'constant'
  config.lr_mult = ml_collections.ConfigDict(dict(
      backbone_weight=1.0, backbone_bias=1.0, head_weight=1.0,
      head_bias=1.0))
  params = {'backbone': {'w': {'kernel': jnp.full((1,), 2.0)}}}
  tx = optim.make_optimizer(config, params, num_steps=1)
  grads = {'backbone': {'w': {'kernel': jnp.zeros((1,))}}}
  updates, _ = tx.update(grads, tx.init(params), params)
  # With zero gradient, L2 decay enters Adam's moments: the first Adam step
  # moves by ~lr·sign(wd·w) = -0.01 (AdamW would move by -lr·wd·w = -1e-5).
  np.testing.assert_allclose(updates['backbone']['w']['kernel'], [-0.01],
                             rtol=1e-3)
