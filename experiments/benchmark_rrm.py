"""RRM's train step, piece by piece: where its time goes on this machine.

  python experiments/benchmark_rrm.py [--steps=5] [--out=...]

Same network, batch and benchmark images (the first training batches of
`configs/rrm.py`), one jitted step per row:

  classify          L_class only (the classification stage)
  cam_labels        + the multi-scale CAM and I_cam, CE + energy (no CRF)
  rrm_ce_only       + the in-step DenseCRF (config.crf.backend), CE only
  rrm               + the dense energy loss: the full step
  rrm_<kernel>      the full step with another energy kernel

each with the CRF on the host ('pydensecrf', a callback the step waits for)
and on the device ('jax').  Differences between rows give the share of each
part (CAM passes, CRF, energy).  Median step time after compilation; the
supervised step of the same backbone and batch is the unit.  With the host
CRF, `host_crf_wait_share` is the share of the timed steps spent inside the
CRF callback: the device's idle share, since the step waits for the labels.  JSON to
experiments/out/benchmark_rrm.json.
"""

from __future__ import annotations

import functools
import json
import os
import statistics
import time

from absl import app, flags
import jax

from wsss_jax import pretraining, run, runtime, segmentation
from wsss_jax.crf import traced
from wsss_jax.methods.rrm import model as rrm_model
from wsss_jax.methods.rrm import objective
from wsss_jax.methods.rrm import pipeline as rrm_pipeline
from wsss_jax.training import mesh as mesh_lib, optim
from wsss_jax.training import state as state_lib, step as step_lib

_STEPS = flags.DEFINE_integer('steps', 5, 'Timed steps per row.')
_BATCHES = flags.DEFINE_integer('batches', 3, 'Distinct benchmark batches '
                                'cycled through (real crops, not noise).')
_OUT = flags.DEFINE_string('out', 'experiments/out/benchmark_rrm.json',
                           'JSON output.')
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(arg=''):
  return run.load_config_file(os.path.join(REPO, 'configs', 'rrm.py'), arg)


def _time(step_fn, state, batches, steps):
  """(state, first step's seconds, median step seconds, share of the timed
  steps spent waiting for host CRF callbacks)."""
  start = time.perf_counter()
  state, metrics = step_fn(state, batches[0])
  jax.block_until_ready(metrics)
  first = time.perf_counter() - start
  times = []
  host_before = traced.host_callback_seconds()
  for k in range(steps):
    start = time.perf_counter()
    state, metrics = step_fn(state, batches[(k + 1) % len(batches)])
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - start)
  host_share = (traced.host_callback_seconds() - host_before) / sum(times)
  return state, first, statistics.median(times), host_share


def main(argv):
  del argv
  config = _config()
  rt = runtime.make_runtime(config,
                            builtin_weights=pretraining.builtin_weights)
  model = rrm_model.build_rrm_model(config, rt.num_classes)
  crop = config.input.crop_size
  make_tx = functools.partial(optim.make_optimizer, config.optim,
                              num_steps=1000)
  rng = jax.random.PRNGKey(0)
  variables, _ = segmentation.initial_variables(rt, model, rng)
  loader = segmentation.training_batches(rt)
  host_batches = [next(loader) for _ in range(_BATCHES.value)]
  batches = [mesh_lib.device_batch(b, rt.mesh) for b in host_batches]

  def fresh_state():
    return state_lib.create_train_state(model, make_tx, rng,
                                        (1, crop, crop, 3), rt.mesh,
                                        variables=variables)

  def row(name, loss_fn):
    step_fn = step_lib.make_train_step(model, loss_fn, rt.normalization,
                                       rt.mesh)
    _, first, median, host_share = _time(step_fn, fresh_state(), batches,
                                         _STEPS.value)
    print(f'{name}: {median:.3f} s/step (first {first:.1f} s; '
          f'{100 * host_share:.0f} % waiting for the host CRF)', flush=True)
    return {'row': name, 'median_step_seconds': round(median, 4),
            'compile_and_first_step_seconds': round(first, 2),
            'host_crf_wait_share': round(host_share, 3)}

  rows = []
  supervised_net = segmentation.build_segmenter(rt)
  sup_vars, _ = segmentation.initial_variables(rt, supervised_net, rng)
  sup_step = step_lib.make_train_step(
      supervised_net, segmentation.cross_entropy_on('mask'),
      rt.normalization, rt.mesh)
  sup_state = state_lib.create_train_state(
      supervised_net, make_tx, rng, (1, crop, crop, 3), rt.mesh,
      variables=sup_vars)
  _, first, unit, _ = _time(sup_step, sup_state, batches, _STEPS.value)
  rows.append({'row': 'supervised', 'median_step_seconds': round(unit, 4),
               'compile_and_first_step_seconds': round(first, 2)})
  print(f'supervised: {unit:.3f} s/step', flush=True)
  rows.append(row('classify', objective.classification_loss()))
  for backend in ('pydensecrf', 'jax'):
    config.crf.backend = backend
    variants = [('cam_labels', dict(label_source='cam')),
                ('rrm_ce_only', dict(energy_weight=0.0)),
                ('rrm', {}),
                ('rrm_lattice_scaled', dict(energy_kernel='lattice_scaled')),
                ('rrm_permutohedral', dict(energy_kernel='permutohedral'))]
    for name, change in variants:
      if backend == 'jax' and name == 'cam_labels':
        continue                      # no CRF: the same as on the host
      cfg = _config()
      cfg.crf.backend = backend
      cfg.rrm.update(**change)
      options = objective.RRMOptions.from_config(cfg.rrm)
      rt_row = rt.with_config(cfg)
      capacity = (rrm_pipeline.crf_capacity(rt_row, options.label_crf)
                  if options.label_source == 'rrm' else None)
      result = row(f'{name} [{backend}]', objective.rrm_loss(
          options, rt.num_classes, backend, capacity,
          int(cfg.eval.crf_workers)))
      result.update(backend=backend, capacity=capacity)
      rows.append(result)
  for result in rows:
    result['x_supervised_step'] = round(result['median_step_seconds'] / unit,
                                        2)
  report = {'devices': [str(d) for d in jax.devices()],
            'batch': int(config.input.batch_size), 'crop': crop,
            'rows': rows}
  print(json.dumps(report, indent=2))
  out = os.path.join(REPO, _OUT.value) if not os.path.isabs(
      _OUT.value) else _OUT.value
  os.makedirs(os.path.dirname(out), exist_ok=True)
  with open(out, 'w') as f:
    json.dump(report, f, indent=2)


if __name__ == '__main__':
  app.run(main)
