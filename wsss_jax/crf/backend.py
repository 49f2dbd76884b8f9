"""The JAX DenseCRF as a CRF backend named 'jax' (`host.crf.get_backend`).

Importing this module registers it.  It takes and returns what the
pydensecrf backend does (uint8 (H, W, 3) RGB, float (C, H, W) probabilities
-> float32 (C, H, W) marginals) and runs `dense_crf` on JAX's default device
in the calling process, so a caller uses it with no host worker processes
(`workers=0`): a pool would start JAX in every worker.  Each call finds the
image's lattice capacity (`dense_crf.lattice_capacity`) and runs a program
compiled once per (image size, labels, capacity bucket, parameters).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from wsss_jax.crf import dense_crf as jax_crf
from wsss_jax.host import crf as host_crf


@functools.lru_cache(maxsize=None)
def _compiled(params: host_crf.CrfParams, capacity: tuple[int, ...]):
  return jax.jit(lambda image, probs: jax_crf.dense_crf_and_overflow(
      image, probs, params, capacity))


# (image shape, labels, params) -> the capacities that held every image so
# far.
_capacities: dict[tuple, tuple[int, ...]] = {}


@dataclasses.dataclass(frozen=True)
class JaxCrfBackend:
  """`host.crf.CrfBackend` running `wsss_jax.crf.dense_crf` on the device."""
  name: str = 'jax'

  def __call__(self, image: np.ndarray, probs: np.ndarray,
               params: host_crf.CrfParams) -> np.ndarray:
    image, probs = host_crf.check_inputs(image, probs)
    device_image = jnp.asarray(image)
    device_probs = jnp.asarray(probs.transpose(1, 2, 0))
    key = (image.shape, probs.shape[0], params)
    capacity = _capacities.get(key)
    if capacity is None:
      capacity = jax_crf.lattice_capacity(device_image, params)
    marginals, overflowed = _compiled(params, capacity)(device_image,
                                                        device_probs)
    if bool(overflowed):
      capacity = tuple(max(old, new) for old, new in zip(
          capacity, jax_crf.lattice_capacity(device_image, params)))
      marginals, _ = _compiled(params, capacity)(device_image, device_probs)
    _capacities[key] = capacity
    return np.asarray(marginals, np.float32).transpose(2, 0, 1)


host_crf.register_backend(JaxCrfBackend())


def host_workers(backend: str, workers: int) -> int:
  """Worker processes for CRFs on `backend` (`config.crf.backend`): the
  requested count for 'pydensecrf'; 0 for 'jax', which runs on the device in
  the calling process (a pool would start JAX in every worker)."""
  host_crf.get_backend(backend)          # unknown names fail here
  return 0 if backend == JaxCrfBackend.name else int(workers)
