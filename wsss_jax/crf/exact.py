"""The exact Gaussian filter the lattice approximates, block by block.

    out_i = Σ_j exp(−½‖f_i − f_j‖²) v_j      (j = i included)

for (N, d) features and (N, C) values, computed for a block of query points
against all N points at a time (`lax.map` over blocks), so memory is
block × N, never N × N.  The squared distance is summed axis by axis from
differences (not ‖a‖² + ‖b‖² − 2a·b, which cancels badly when the features
are pixel positions over a small σ).  O(N²·(d + C)): a reference for tests
and small images, and the filter of `lattice`-vs-exact comparisons.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def exact_gaussian_filter(features: jax.Array, values: jax.Array,
                          block: int = 0) -> jax.Array:
  """(N, d) features, (N, C) values -> (N, C), float32.

  `block` query points at a time (0: as many as keep a block × N float32
  matrix under 64 MB).
  """
  features = jnp.asarray(features, jnp.float32)
  values = jnp.asarray(values, jnp.float32)
  if features.ndim != 2 or values.ndim != 2 or (
      features.shape[0] != values.shape[0]):
    raise ValueError(f'exact_gaussian_filter: features (N, d) and values '
                     f'(N, C) expected, got {features.shape} and '
                     f'{values.shape}.')
  n, d = features.shape
  block = int(block) or max(1, min(n, (1 << 24) // max(n, 1)))
  padded = -(-n // block) * block
  queries = jnp.pad(features, ((0, padded - n), (0, 0)))

  def one_block(query: jax.Array) -> jax.Array:
    squared = jnp.zeros((query.shape[0], n), jnp.float32)
    for k in range(d):
      squared += jnp.square(query[:, None, k] - features[None, :, k])
    return jnp.exp(-0.5 * squared) @ values

  out = jax.lax.map(one_block, queries.reshape(-1, block, d))
  return out.reshape(padded, -1)[:n]
