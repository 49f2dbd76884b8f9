"""Optimisers: PyTorch-equivalent SGD / Adam with DeepLab parameter groups.

PyTorch SGD with momentum μ and weight decay λ adds λ·w to the gradient before
the momentum buffer and applies the learning rate after it; per-group learning
rates therefore act as a per-leaf scale *after* the momentum update
(docs/implementation_notes.md, "Optimisers").  This is what `make_optimizer`
builds:

    add_decayed_weights(λ, mask=kernels)  ->  sgd(schedule, μ)  ->  ×group_mult

Deliberately *not* reproduced: the PSA-style PolyOptimizer of the PMM/RRM code
passes the weight decay as SGD's momentum, and the official LPG code drops its
×10/×20 groups; here momentum is momentum and every group is applied.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

GROUPS = ('backbone_weight', 'backbone_bias', 'head_weight', 'head_bias')


def _leaf_name(path) -> str:
  last = path[-1]
  return str(getattr(last, 'key', getattr(last, 'name', last)))


def _top_name(path) -> str:
  first = path[0]
  return str(getattr(first, 'key', getattr(first, 'name', first)))


def parameter_groups(params: Any, head_modules: tuple[str, ...]) -> Any:
  """Labels every parameter leaf with one of `GROUPS`.

  A leaf is in the head group when its top-level module name is listed in
  `head_modules` (e.g. 'head'); it is a bias when its own name is 'bias'.
  Everything else (kernels, trainable BN scales) is a weight.
  """
  def label(path, _):
    part = 'head' if _top_name(path) in head_modules else 'backbone'
    kind = 'bias' if _leaf_name(path) == 'bias' else 'weight'
    return f'{part}_{kind}'
  return jax.tree_util.tree_map_with_path(label, params)


def weight_decay_mask(params: Any) -> Any:
  """True for convolution/dense kernels: the only leaves with weight decay."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: _leaf_name(path) == 'kernel', params)


def linear_warmup(schedule: Callable[[Any], Any],
                  warmup_steps: int) -> Callable[[Any], Any]:
  """`schedule` scaled by min(1, (t + 1) / W) at the 0-based step t: the
  first W updates ramp linearly up to the schedule (W = 0: unchanged)."""
  if warmup_steps <= 0:
    return schedule
  def warmed(count):
    ramp = jnp.minimum(1.0, (jnp.asarray(count, jnp.float32) + 1.0) /
                       float(warmup_steps))
    return schedule(count) * ramp
  return warmed


def make_schedule(optim_config, num_steps: int) -> Callable[[Any], Any]:
  """Learning-rate schedule evaluated at the 0-based step count.

  'poly': lr·(1 − t/T)^p, the DeepLab "poly" policy (Chen et al., TPAMI
  2018, Sect. 4.1, after ParseNet), identical to a PyTorch LambdaLR stepped
  after each optimiser step (docs/implementation_notes.md, "Optimisers").
  'step': ×0.1 at each boundary
  given as a fraction of `num_steps` (BANA stage 1).  'constant'.
  Any of them times `linear_warmup` over `optim.warmup_steps` (0: none).
  """
  lr = float(optim_config.lr)
  kind = optim_config.schedule
  if kind == 'poly':
    schedule = optax.polynomial_schedule(
        init_value=lr, end_value=0.0, power=float(optim_config.poly_power),
        transition_steps=max(int(num_steps), 1))
  elif kind == 'step':
    boundaries = {int(round(f * num_steps)): 0.1
                  for f in optim_config.step_boundaries}
    schedule = optax.piecewise_constant_schedule(lr, boundaries)
  elif kind == 'constant':
    schedule = optax.constant_schedule(lr)
  else:
    raise ValueError(f"optim.schedule={kind!r}; expected 'poly', 'step' or "
                     "'constant'.")
  return linear_warmup(schedule, int(optim_config.get('warmup_steps', 0)))


def make_optimizer(optim_config, params: Any, num_steps: int,
                   frozen_modules: tuple[str, ...] = ()
                   ) -> optax.GradientTransformation:
  """The optimiser of `config.optim` for a parameter tree shaped like `params`.

  `params` may be abstract (shapes only); only its tree structure and leaf
  names are used.  Top-level modules in `frozen_modules` get no update at
  all (neither gradient nor weight decay), e.g. branches that a training
  phase does not use.
  """
  schedule = make_schedule(optim_config, num_steps)
  mults = optim_config.lr_mult
  group_scale = optax.multi_transform(
      {group: optax.scale(float(mults[group])) for group in GROUPS},
      parameter_groups(params, tuple(optim_config.head_modules)))
  decay = optax.add_decayed_weights(float(optim_config.weight_decay),
                                    mask=weight_decay_mask(params))
  if optim_config.name == 'sgd':
    core = optax.sgd(schedule, momentum=float(optim_config.momentum))
  elif optim_config.name == 'adam':
    # PyTorch Adam(weight_decay=λ) is L2 added to the gradient, not AdamW.
    core = optax.chain(
        optax.scale_by_adam(b1=float(optim_config.adam_b1),
                            b2=float(optim_config.adam_b2),
                            eps=float(optim_config.adam_eps)),
        optax.scale_by_learning_rate(schedule))
  else:
    raise ValueError(f"optim.name={optim_config.name!r}; expected 'sgd' or "
                     "'adam'.")
  chain = [decay, core, group_scale]
  if frozen_modules:
    frozen = jax.tree_util.tree_map_with_path(
        lambda path, _: _top_name(path) in frozen_modules, params)
    chain.append(optax.masked(optax.set_to_zero(), frozen))
  return optax.chain(*chain)
