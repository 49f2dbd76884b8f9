"""Box2Seg's overhead: the full train step vs the `grabcut` variant's step.

  python experiments/benchmark_box2seg.py [--preset=''|voc] [--steps=10]

Same network (encoder + UPerNet decoder + three branches) and batch; the
`grabcut` variant computes L_GC only (the α/β branches are dead code under
jit), the full model adds L_AW, L_α^fr and the sampled affinity loss
(Eqs. 3–11).  Target: full step <= 1.5x the grabcut step.  Random inputs with
boxes; median step time after compilation; JSON to experiments/out/.
"""

from __future__ import annotations

import functools
import json
import os

from absl import app, flags
import jax
import numpy as np

from wsss_jax import run
import timing  # experiments/timing.py (this script's folder is on sys.path)
from wsss_jax.methods.box2seg import model as box2seg_model
from wsss_jax.methods.box2seg import objective as box2seg
from wsss_jax.training import mesh as mesh_lib, optim
from wsss_jax.training import state as state_lib, step as step_lib

_PRESET = flags.DEFINE_string('preset', '', "'' (benchmark) or 'voc'.")
_STEPS = flags.DEFINE_integer('steps', 10, 'Timed steps.')
_BATCH = flags.DEFINE_integer('batch', 0, 'Batch size (0: the config).')
_OUT = flags.DEFINE_string('out', 'experiments/out/benchmark_box2seg.json',
                           'JSON output.')
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(arg):
  return run.load_config_file(
      os.path.join(REPO, 'configs', 'box2seg.py'), arg)


def time_variant(variant, num_classes, steps, batch_override):
  tokens = ','.join(t for t in (variant, _PRESET.value) if t)
  config = load_config(tokens)
  batch_size = batch_override or config.input.batch_size
  crop = config.input.crop_size
  mesh = mesh_lib.make_mesh()
  model = box2seg_model.build_box2seg_model(config, num_classes)
  make_tx = functools.partial(optim.make_optimizer, config.optim,
                              num_steps=1000)
  state = state_lib.create_train_state(model, make_tx, jax.random.PRNGKey(0),
                                       (1, crop, crop, 3), mesh)
  train_step = step_lib.make_train_step(
      model, box2seg.train_loss(
          box2seg.Box2SegLossOptions.from_config(config.box2seg), num_classes),
      'imagenet' if config.model.weights_source == 'torchvision' else 'caffe',
      mesh)
  batch = mesh_lib.device_batch(timing.random_box_batch(
      np.random.default_rng(0), batch_size, crop, num_classes,
      config.input.max_boxes), mesh)
  state, first, median = timing.time_train_step(train_step, state, batch,
                                                steps)
  return {'variant': variant, 'preset': _PRESET.value or 'benchmark',
          'crop': crop, 'batch': batch_size,
          'compile_and_first_step_seconds': round(first, 2),
          'median_step_seconds': round(median, 4)}


def main(argv):
  del argv
  num_classes = 7 if not _PRESET.value else 21
  rows = [time_variant(v, num_classes, _STEPS.value, _BATCH.value)
          for v in ('grabcut', 'box2seg')]
  ratio = rows[1]['median_step_seconds'] / rows[0]['median_step_seconds']
  report = {'devices': [str(d) for d in jax.devices()], 'rows': rows,
            'box2seg_over_grabcut': round(ratio, 3)}
  print(json.dumps(report, indent=2))
  os.makedirs(os.path.dirname(os.path.abspath(_OUT.value)), exist_ok=True)
  with open(_OUT.value, 'w') as f:
    json.dump(report, f, indent=2)


if __name__ == '__main__':
  app.run(main)
