"""Train-step throughput of the segmentation networks (images/s, compile time).

  python experiments/benchmark_step.py --out=experiments/out/benchmark.json
  python experiments/benchmark_step.py --models=largefov --steps=5

Measures the real jitted train step (forward, DeepLab cross-entropy, backward,
SGD with the four parameter groups) on random uint8 batches: the first call
(compilation + one step) is reported separately; throughput is the median
over the following steps.  Reference: the official PyTorch code on a 2-core
CPU takes 3.30 s/step (BANA's LargeFOV) and 7.30 s/step (ResNet-101 ASPP) at
batch 2, 321x321 (reference/bana.md §8).
"""

from __future__ import annotations

import functools
import json
import os
import time

from absl import app, flags
import jax
import numpy as np

from wsss_jax import defaults, segmentation
import timing  # experiments/timing.py (this script's folder is on sys.path)
from wsss_jax.models import build
from wsss_jax.training import mesh as mesh_lib, optim
from wsss_jax.training import state as state_lib, step as step_lib

_MODELS = flags.DEFINE_list('models', ['tiny', 'largefov', 'resnet101'],
                            'Which networks to measure.')
_STEPS = flags.DEFINE_integer('steps', 8, 'Timed steps after compilation.')
_DTYPE = flags.DEFINE_enum('dtype', 'float32', ['float32', 'bfloat16'],
                           'Computation dtype.')
_OUT = flags.DEFINE_string('out', 'experiments/out/benchmark_step.json',
                           'JSON output path.')
_CROP = flags.DEFINE_integer('crop', 0, "Input side (0: each network's own; "
                             'smaller for a dry run).')


def measure(name: str, steps: int, dtype) -> dict:
  make_config, crop, batch_size, num_classes = (
      timing.SEGMENTER_SETTINGS[name])
  crop = _CROP.value or crop
  model_config = make_config()
  mesh = mesh_lib.make_mesh()
  model = build.build_model(model_config, num_classes, dtype)
  make_tx = functools.partial(optim.make_optimizer, defaults.sgd_deeplab(),
                              num_steps=timing.SCHEDULE_STEPS)
  start = time.perf_counter()
  rng = jax.random.PRNGKey(0)
  variables = state_lib.random_variables(model, rng, (1, crop, crop, 3))
  state = state_lib.create_train_state(model, make_tx, rng, (1, crop, crop, 3),
                                       mesh, variables=variables)
  jax.block_until_ready(state)
  init_seconds = time.perf_counter() - start
  train_step = step_lib.make_train_step(
      model, segmentation.cross_entropy_on('mask'), 'caffe', mesh, dtype)
  rng = np.random.default_rng(0)
  batch = mesh_lib.device_batch({
      'image': rng.integers(0, 255, (batch_size, crop, crop, 3), np.uint8),
      'mask': rng.integers(0, num_classes, (batch_size, crop, crop),
                           dtype=np.uint8)}, mesh)
  state, first, median = timing.time_train_step(train_step, state, batch,
                                                steps)
  return {
      'model': name, 'backbone': model_config.backbone,
      'width': model_config.width, 'crop': crop, 'batch': batch_size,
      'dtype': str(np.dtype(dtype)) if dtype != 'bfloat16' else 'bfloat16',
      'params': build.param_count(state.params),
      'init_seconds': round(init_seconds, 2),
      'compile_and_first_step_seconds': round(first, 2),
      'median_step_seconds': round(median, 4),
      'images_per_second': round(batch_size / median, 2),
      'timed_steps': steps,
  }


def main(argv):
  del argv
  dtype = {'float32': np.float32, 'bfloat16': 'bfloat16'}[_DTYPE.value]
  report = {'devices': [str(d) for d in jax.devices()],
            'jax': jax.__version__, 'results': []}
  os.makedirs(os.path.dirname(os.path.abspath(_OUT.value)), exist_ok=True)
  for name in _MODELS.value:
    result = measure(name, _STEPS.value, dtype)
    print(json.dumps(result))
    report['results'].append(result)
    with open(_OUT.value, 'w') as f:       # after each network: a timeout
      json.dump(report, f, indent=2)       # keeps what was measured


if __name__ == '__main__':
  app.run(main)
