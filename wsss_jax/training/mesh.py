"""Data parallelism with jit + Mesh/NamedSharding (no pmap).

The batch is split over the 'data' axis, parameters and optimiser state are
replicated; XLA inserts the gradient all-reduce.  Multi-host runs call
`maybe_initialize_distributed()` first and feed process-local batches.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from wsss_jax.data import schema

log = logging.getLogger(__name__)

DATA_AXIS = 'data'


def maybe_initialize_distributed() -> bool:
  """Calls `jax.distributed.initialize()` when the environment asks for it.

  Set WSSS_JAX_DISTRIBUTED=1 (with the usual JAX coordinator variables, or on
  TPU pods / SLURM where JAX discovers them).  Returns True if initialised.
  """
  if os.environ.get('WSSS_JAX_DISTRIBUTED', '0') not in ('1', 'true', 'True'):
    return False
  jax.distributed.initialize()
  log.info('jax.distributed: process %d of %d', jax.process_index(),
               jax.process_count())
  return True


def is_primary() -> bool:
  """True on the process that writes shared files (process 0)."""
  return jax.process_index() == 0


def barrier(name: str) -> None:
  """Waits until every process reaches `name` (no-op with one process)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(name)


def make_mesh(num_devices: int = 0) -> jax.sharding.Mesh:
  """A 1-D ('data',) mesh over the first `num_devices` devices (0 = all)."""
  devices = jax.devices()
  if num_devices:
    if num_devices > len(devices):
      raise ValueError(f'mesh.num_devices={num_devices} but only '
                       f'{len(devices)} devices are available.')
    devices = devices[:num_devices]
  return jax.sharding.Mesh(np.asarray(devices), (DATA_AXIS,),
                           axis_types=(jax.sharding.AxisType.Auto,))


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def data_sharded(mesh) -> NamedSharding:
  return NamedSharding(mesh, P(DATA_AXIS))


def per_device(function, mesh):
  """`function` of batch arrays (leading axis = batch) run on each device's
  shard of the batch separately (`jax.shard_map` over 'data'), returning
  arrays sharded the same way.

  For batch functions whose work is global over their batch, like the
  lattice table of `wsss_jax.crf` (one sort over every image's keys): under
  plain jit on a sharded batch XLA would gather the whole batch onto every
  device to sort it; per device each sorts only its own images.
  """
  spec = P(DATA_AXIS)
  return jax.shard_map(function, mesh=mesh, in_specs=spec, out_specs=spec)


def check_batch_size(batch_size: int, mesh, field: str) -> None:
  """The global batch must split evenly over devices and processes."""
  n = mesh.devices.size
  if batch_size % n or batch_size % jax.process_count():
    raise ValueError(f'{field}={batch_size} must be divisible by the number '
                     f'of devices ({n}) and processes ({jax.process_count()}).')


def device_batch(batch: dict[str, Any], mesh) -> dict[str, jax.Array]:
  """Process-local numpy batch -> global arrays sharded over 'data'.

  Host-only keys (image ids) are dropped; they stay with the caller.
  """
  sharding = data_sharded(mesh)
  return {
      key: jax.make_array_from_process_local_data(sharding, np.asarray(value))
      for key, value in batch.items() if key not in schema.HOST_ONLY_KEYS
  }
