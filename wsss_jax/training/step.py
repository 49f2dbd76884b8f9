"""Pure, jitted train and predict steps; methods plug in a loss function.

A loss function has the signature

    loss_fn(outputs: dict, batch: dict, context: LossContext) -> (loss, metrics)

where `outputs` is what the model returns (logits, features, method heads),
`batch` the device batch of `wsss_jax.data.schema`, and `metrics` a dict of
scalars to log.  The step knows nothing about any method.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from wsss_jax.data import schema
from wsss_jax.ops import image as image_ops
from wsss_jax.training import mesh as mesh_lib
from wsss_jax.training import state as state_lib
from wsss_jax.training.state import TrainState


class LossContext(NamedTuple):
  """What a loss may need besides outputs and batch."""
  step: jax.Array            # 0-based step of the update being computed
  rng: jax.Array             # a fresh key for stochastic losses (sampling)
  params: Any                # current parameters (e.g. classifier weights)


LossFn = Callable[[dict, dict, LossContext], tuple[jax.Array, dict]]


def make_train_step(model, loss_fn: LossFn, normalization: str, mesh,
                    compute_dtype=jnp.float32,
                    model_inputs: tuple[str, ...] = ()) -> Callable:
  """Returns jitted `train_step(state, batch) -> (state, metrics)`.

  The state buffer is donated; metrics are replicated scalars (loss, the
  loss function's own terms and the global gradient norm).  `model_inputs`
  names batch keys the model takes as keyword arguments besides the images
  (e.g. LPG's generator reads the boxes).
  """

  def train_step(state: TrainState, batch: dict[str, jax.Array]):
    step_rng = jax.random.fold_in(state.rng, state.step)
    dropout_rng, loss_rng = jax.random.split(step_rng)
    images = image_ops.normalize_images(batch[schema.IMAGE], normalization,
                                        compute_dtype)

    def compute_loss(params):
      outputs, updates = model.apply(
          {'params': params, 'batch_stats': state.batch_stats}, images,
          train=True, rngs={'dropout': dropout_rng}, mutable=['batch_stats'],
          **{key: batch[key] for key in model_inputs})
      loss, metrics = loss_fn(outputs, batch,
                              LossContext(state.step, loss_rng, params))
      return loss, (metrics, updates.get('batch_stats', state.batch_stats))

    (loss, (metrics, batch_stats)), grads = jax.value_and_grad(
        compute_loss, has_aux=True)(state.params)
    updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = dict(metrics, loss=loss, grad_norm=optax.global_norm(grads))
    ema = state.ema
    if state.ema_decay:
      ema = state_lib.ema_update(
          ema, {'params': params, 'batch_stats': batch_stats}, state.step,
          state.ema_decay)
    new_state = state.replace(step=state.step + 1, params=params,
                              batch_stats=batch_stats, opt_state=opt_state,
                              ema=ema)
    return new_state, metrics

  replicated = mesh_lib.replicated(mesh)
  return jax.jit(train_step, donate_argnums=(0,),
                 out_shardings=(replicated, replicated))


def make_forward(model, normalization: str, compute_dtype=jnp.float32
                 ) -> Callable:
  """Returns jitted `forward(variables, images_uint8) -> outputs` (eval mode)."""

  def forward(variables, images):
    x = image_ops.normalize_images(images, normalization, compute_dtype)
    return model.apply(variables, x, train=False)

  return jax.jit(forward)
