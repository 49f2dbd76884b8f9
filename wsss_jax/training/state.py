"""The train state: one pytree holding everything a step changes.

Shapes come from `jax.eval_shape` and the state is created directly with its
sharding (big_vision), so nothing is materialised on one device first.
"""

from __future__ import annotations

import functools
from typing import Any
import weakref

import flax
import jax
import jax.numpy as jnp
import optax

from wsss_jax.training import mesh as mesh_lib


class TrainState(flax.struct.PyTreeNode):
  """(step, params, batch_stats, opt_state, rng, ema); the optimiser and the
  EMA decay are static.

  `rng` is a raw uint32 key; each step uses fold_in(rng, step), so a resumed
  run draws exactly the numbers an uninterrupted run would.  `ema` is the
  exponential moving average of {params, batch_stats} (`ema_update`), or {}
  when `ema_decay` is 0.
  """
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  rng: jax.Array
  ema: Any
  tx: optax.GradientTransformation = flax.struct.field(pytree_node=False)
  ema_decay: float = flax.struct.field(pytree_node=False, default=0.0)

  @property
  def live_variables(self) -> dict[str, Any]:
    """The variables the optimiser is training."""
    return {'params': self.params, 'batch_stats': self.batch_stats}

  @property
  def variables(self) -> dict[str, Any]:
    """The variables to evaluate, export and label with: the EMA when on."""
    return self.ema if self.ema_decay else self.live_variables


def ema_decay_at(step: jax.Array, decay: float) -> jax.Array:
  """The averaging weight of update `step` (0-based): min(decay,
  (1 + step) / (10 + step)), so the average is not dominated by the
  initialisation in the first hundred steps (TensorFlow's
  `ExponentialMovingAverage` with `num_updates`)."""
  step = jnp.asarray(step, jnp.float32)
  return jnp.minimum(decay, (1.0 + step) / (10.0 + step))


def ema_update(ema: Any, variables: Any, step: jax.Array,
               decay: float) -> Any:
  """Polyak averaging: ema <- d·ema + (1 − d)·variables, d = `ema_decay_at`.

  Applied to the parameters and BatchNorm's running statistics alike, so
  the averaged network carries statistics of the averaged weights' era.
  A leaf equal to its average (a frozen module's) keeps it bit-exactly:
  d·e + (1 − d)·e can round off e by an ulp.
  """
  d = ema_decay_at(step, decay)
  return jax.tree.map(
      lambda e, v: jnp.where(v == e, e, (d * e + (1.0 - d) * v).astype(
          e.dtype)), ema, variables)


def init_variables(model, rng: jax.Array, image_shape: tuple[int, ...]
                   ) -> dict[str, Any]:
  """Model variables for a (B, H, W, 3) float input; batch_stats may be {}."""
  variables = model.init({'params': rng, 'dropout': rng},
                         jnp.zeros(image_shape, jnp.float32), train=False)
  variables = flax.core.unfreeze(variables)
  return {'params': variables['params'],
          'batch_stats': variables.get('batch_stats', {})}


def random_variables(model, rng: jax.Array, image_shape: tuple[int, ...]
                     ) -> dict[str, Any]:
  """`init_variables`, compiled once at XLA's lowest backend optimisation.

  An eager `model.init` compiles every initialiser shape and every layer of
  the tracing forward pass separately, and at the default optimisation level
  XLA:CPU spends seconds on each random-number kernel: the benchmark
  backbone took 7 s eager and 5.5 s jitted, 1 s like this (LargeFOV 8.8 s →
  4.2 s, ResNet-101 18 s → 16 s, compile and run; experiments/RESULTS.md
  §10).  The draws are the same random numbers, rounded differently (1e-7
  level) from the eager ones, so runs from scratch are not bit-identical to
  runs of versions before this.
  """
  init = functools.partial(init_variables, model, image_shape=image_shape)
  compiled = jax.jit(init).lower(rng).compile(
      compiler_options={'xla_backend_optimization_level': 0})
  return compiled(rng)


# make_tx -> {parameter tree structure: transformation}.
_OPTIMIZERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _optimizer(make_tx, params) -> optax.GradientTransformation:
  """`make_tx(params)`, built once per (make_tx, tree structure).

  The transformation is a static field of TrainState and compares by
  identity: states from separate calls (the abstract one used for restore
  and for compiling the step, the concrete one) must share it, or jit sees
  different pytrees and compiles the step again.
  """
  try:
    by_structure = _OPTIMIZERS.setdefault(make_tx, {})
  except TypeError:                      # not weak-referenceable: no reuse
    return make_tx(params)
  structure = jax.tree.structure(params)
  if structure not in by_structure:
    by_structure[structure] = make_tx(params)
  return by_structure[structure]


def _state_fn(model, make_tx, image_shape, ema_decay):
  def init_fn(init_rng, train_rng, variables):
    if variables is None:
      variables = init_variables(model, init_rng, image_shape)
    tx = _optimizer(make_tx, variables['params'])
    live = {'params': variables['params'],
            'batch_stats': variables.get('batch_stats', {})}
    return TrainState(step=jnp.zeros((), jnp.int32),
                      params=live['params'],
                      batch_stats=live['batch_stats'],
                      opt_state=tx.init(variables['params']),
                      rng=train_rng,
                      ema=jax.tree.map(jnp.copy, live) if ema_decay else {},
                      tx=tx, ema_decay=float(ema_decay))
  return init_fn


def abstract_train_state(model, make_tx, rng: jax.Array,
                         image_shape: tuple[int, ...], mesh,
                         ema_decay: float = 0.0) -> TrainState:
  """Shapes, dtypes and (replicated) shardings of the state; no compute.

  What a checkpoint restore needs: a resumed run never initialises or
  loads pretrained weights only to throw them away.
  """
  init_rng, train_rng = jax.random.split(rng)
  abstract = jax.eval_shape(_state_fn(model, make_tx, image_shape, ema_decay),
                            init_rng, train_rng, None)
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                     sharding=mesh_lib.replicated(mesh)),
      abstract)


def create_train_state(model, make_tx, rng: jax.Array,
                       image_shape: tuple[int, ...], mesh,
                       variables: dict[str, Any] | None = None,
                       ema_decay: float = 0.0) -> TrainState:
  """A replicated TrainState, created directly with its sharding.

  Args:
    model: the Flax module.
    make_tx: params -> optax transformation (built from abstract params).
    rng: base key; the init key and the per-step training key derive from it.
    image_shape: input shape used to trace the model once.
    mesh: the device mesh; every leaf is replicated over it.
    variables: optional initial variables (e.g. pretrained weights merged into
      a fresh init); when given, they replace the random init.
    ema_decay: 0 (no average) or the decay of `ema_update`; the average
      starts at the initial variables.
  """
  init_rng, train_rng = jax.random.split(rng)
  init_fn = _state_fn(model, make_tx, image_shape, ema_decay)
  abstract = jax.eval_shape(init_fn, init_rng, train_rng, variables)
  sharding = jax.tree.map(lambda _: mesh_lib.replicated(mesh), abstract)
  return jax.jit(init_fn, out_shardings=sharding)(init_rng, train_rng,
                                                  variables)


def abstract_state(state: TrainState) -> TrainState:
  """ShapeDtypeStructs (with shardings) of a state, for checkpoint restore,
  or of any pytree of arrays (e.g. a device batch, to compile a step for)."""
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
      state)
