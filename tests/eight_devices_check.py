"""Run by test_sharding.py in a subprocess with 8 fake CPU devices.

One training step of the real train step, on a mesh of 8 devices and on a
mesh of 1 device, from the same state and batch; prints a JSON line with the
largest differences.
"""

import functools
import json
import os
import sys

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=8')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import jax  # noqa: E402
import numpy as np  # noqa: E402

jax.config.update('jax_default_matmul_precision', 'highest')

from wsss_jax import defaults, segmentation  # noqa: E402
from wsss_jax.models import build  # noqa: E402
from wsss_jax.training import mesh as mesh_lib, optim  # noqa: E402
from wsss_jax.training import state as state_lib, step as step_lib  # noqa: E402


def model_configs():
  vgg = defaults.tiny_model()
  vgg.update(width=0.0625, fc_dim=16, dropout=0.5)   # dropout: rng sharding
  resnet = defaults.resnet101_model()
  resnet.update(width=0.0625, resnet_blocks=(1, 1, 1, 1), frozen_bn=False)
  return {'vgg_dropout': vgg, 'resnet_trained_bn': resnet}


def initial_variables(model):
  """The same starting variables for both meshes, initialised once per model.

  The counter-based RBG generator compiles several times faster than threefry
  on CPU (initialisation was most of this check's time); only the starting
  point comes from it, the step's dropout key stays threefry.
  """
  return jax.jit(lambda key: state_lib.init_variables(
      model, key, (1, 32, 32, 3)))(jax.random.key(0, impl='unsafe_rbg'))


def one_step(model, variables, mesh, batch, num_classes):
  make_tx = functools.partial(optim.make_optimizer, defaults.sgd_deeplab(0.01),
                              num_steps=10)
  state = state_lib.create_train_state(model, make_tx, jax.random.PRNGKey(0),
                                       (1, 32, 32, 3), mesh,
                                       variables=variables)
  step = step_lib.make_train_step(model, segmentation.cross_entropy_on('mask'),
                                  'imagenet', mesh)
  state, metrics = step(state, mesh_lib.device_batch(batch, mesh))
  return (jax.tree.map(np.asarray, jax.device_get(state.params)),
          jax.tree.map(np.asarray, jax.device_get(state.batch_stats)),
          float(metrics['loss']))


def main():
  assert jax.device_count() == 8, jax.devices()
  rng = np.random.default_rng(0)
  batch = {'image': rng.integers(0, 255, (8, 32, 32, 3), dtype=np.uint8),
           'mask': rng.integers(0, 4, (8, 32, 32)).astype(np.uint8)}
  report = {}
  for name, config in model_configs().items():
    model = build.build_model(config, num_classes=4)
    variables = initial_variables(model)
    p1, b1, l1 = one_step(model, variables, mesh_lib.make_mesh(1), batch, 4)
    p8, b8, l8 = one_step(model, variables, mesh_lib.make_mesh(8), batch, 4)
    diff = lambda a, b: max([float(np.max(np.abs(x - y))) for x, y in zip(
        jax.tree.leaves(a), jax.tree.leaves(b))] or [0.0])
    report[name] = {'loss_1': l1, 'loss_8': l8,
                    'max_param_diff': diff(p1, p8),
                    'max_batch_stats_diff': diff(b1, b8),
                    'num_batch_stats': len(jax.tree.leaves(b1))}
  print(json.dumps(report))


if __name__ == '__main__':
  sys.exit(main())
