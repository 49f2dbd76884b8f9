"""Run by test_lattice.py in a subprocess with 4 fake CPU devices.

The JAX DenseCRF of a batch of 4 images and the lattice filter's gradient,
sharded over the devices with `mesh.per_device` (each device builds the
table of its own image) and on one device; prints a JSON line with the
largest differences.
"""

import json
import os

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=4')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from wsss_jax.crf import dense_crf, lattice  # noqa: E402
from wsss_jax.host import crf as host_crf  # noqa: E402
from wsss_jax.training import mesh as mesh_lib  # noqa: E402


def main():
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.integers(0, 256, (4, 24, 32, 3)), jnp.float32)
  probs = jax.nn.softmax(jnp.asarray(rng.normal(size=(4, 24, 32, 5)) * 2,
                                     jnp.float32), -1)
  params = host_crf.CrfParams(iterations=3)
  mesh = mesh_lib.make_mesh(4)
  sharding = mesh_lib.data_sharded(mesh)

  def crf(i, p):
    return dense_crf.dense_crf(i, p, params)

  def energy(i, p):
    features = dense_crf.bilateral_features(i, 10.0, 20.0)
    flat = p.reshape(p.shape[0], -1, p.shape[-1])
    return jnp.sum(flat * lattice.gaussian_filter(features, flat), (1, 2))

  def energy_grad(i, p):
    return jax.grad(lambda q: jnp.sum(energy(i, q)))(p)

  report = {}
  for name, function in [('crf', crf), ('energy_grad', energy_grad)]:
    single = jax.jit(function)(images, probs)
    sharded = jax.jit(mesh_lib.per_device(function, mesh))(
        jax.device_put(images, sharding), jax.device_put(probs, sharding))
    report[name] = {
        'max_diff': float(jnp.max(jnp.abs(sharded - single))),
        'devices': len(sharded.sharding.device_set)}
  print(json.dumps(report))


if __name__ == '__main__':
  main()
