"""Feature-vector operations shared by losses and pseudo-label rules."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

_EPS = 1e-12


def l2_normalize(x: jax.Array) -> jax.Array:
  """x / max(‖x‖, 1e-12) along the last axis (PyTorch's F.normalize), with a
  finite gradient at x = 0 (the norm's own gradient is NaN there)."""
  squared = jnp.sum(x * x, axis=-1, keepdims=True)
  return x * lax.rsqrt(jnp.maximum(squared, _EPS * _EPS))
