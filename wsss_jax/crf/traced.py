"""DenseCRF marginals inside a jitted function, on either backend.

Methods that make labels inside a training step (RRM's I_crf, every step)
call `traced_dense_crf` with `config.crf.backend`:

* 'jax': `dense_crf` on the device, with a static lattice capacity.  A batch
  whose lattice does not fit is recomputed with a table large enough for any
  image (`lax.cond`: only the taken branch runs), so a tight capacity costs
  speed on an unusual batch, never correctness; the flag is returned for
  logging.
* any registered host backend ('pydensecrf'): a `jax.pure_callback` that runs
  the backend over the batch's images in a process pool kept open for the
  run (`host.pool`).  The step waits for it: the labels of a step depend on
  that step's parameters, so there is nothing to overlap them with, and the
  pool's workers may use every core meanwhile.

Shapes: images (B, H, W, 3) colours 0..255, probs (B, H, W, L); returns
float32 (B, H, W, L) marginals and a bool () overflow flag.
"""

from __future__ import annotations

import atexit
import functools
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from wsss_jax.crf import dense_crf as jax_crf
from wsss_jax.crf.backend import JaxCrfBackend
from wsss_jax.host import crf as host_crf
from wsss_jax.host import pool as pool_lib


@functools.lru_cache(maxsize=None)
def _host_pool(backend: str, params: host_crf.CrfParams,
               workers: int) -> pool_lib.HostPool:
  """A pool kept open for the process's life: every step reuses its
  workers (starting them costs seconds); closed at exit."""
  host_pool = pool_lib.HostPool(
      functools.partial(host_crf.crf_item, params=params, argmax=False,
                        backend=backend),
      workers, desc=f'in-step {backend} CRF', progress=False)
  host_pool.__enter__()
  atexit.register(host_pool.__exit__, None, None, None)
  return host_pool


# Seconds this process has spent inside host CRF callbacks: the time the
# jitted step waits for them (experiments/benchmark_rrm.py reports it as the
# device's idle share of a step).
_host_seconds = [0.0]


def host_callback_seconds() -> float:
  """Total seconds spent in host-backend callbacks by this process."""
  return _host_seconds[0]


def _host_marginals(backend: str, params: host_crf.CrfParams, workers: int,
                    images: np.ndarray, probs: np.ndarray) -> np.ndarray:
  start = time.perf_counter()
  images = np.asarray(images).astype(np.uint8)
  probs = np.asarray(probs, np.float32)
  items = [(image, p.transpose(2, 0, 1)) for image, p in zip(images, probs)]
  out = list(_host_pool(backend, params, workers).imap(items))
  result = np.stack(out).transpose(0, 2, 3, 1)
  _host_seconds[0] += time.perf_counter() - start
  return result


def traced_dense_crf(images: jax.Array, probs: jax.Array,
                     params: host_crf.CrfParams, backend: str,
                     capacity: Sequence[int] | None = None,
                     workers: int = 0) -> tuple[jax.Array, jax.Array]:
  """(marginals, overflowed) of a batch inside a traced function.

  Args:
    images: (B, H, W, 3) colours in 0..255 (uint8 or float).
    probs: (B, H, W, L) probabilities.
    params: the kernels (`host.crf.CrfParams`).
    backend: 'jax' or a registered host backend name.
    capacity: 'jax' only: lattice table rows per kernel for the batch
      (`dense_crf.lattice_capacity` of typical batches); None: enough for any.
    workers: host backends only: worker processes (0: in this process).
      The device waits for the labels, so the workers may take every core.
  """
  host_crf.get_backend(backend)        # unknown names fail at trace time
  if backend == JaxCrfBackend.name:
    if capacity is None:
      return (jax_crf.dense_crf(images, probs, params),
              jnp.zeros((), bool))
    q, overflowed = jax_crf.dense_crf_and_overflow(images, probs, params,
                                                   tuple(capacity))
    q = jax.lax.cond(overflowed,
                     lambda: jax_crf.dense_crf(images, probs, params),
                     lambda: q)
    return q, overflowed
  out = jax.ShapeDtypeStruct(probs.shape, jnp.float32)
  q = jax.pure_callback(
      functools.partial(_host_marginals, backend, params, int(workers)), out,
      images, probs.astype(jnp.float32), vmap_method='sequential')
  return q, jnp.zeros((), bool)
