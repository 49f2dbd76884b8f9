"""Our jitted train steps against PyTorch twins, alternated in one process.

  python experiments/benchmark_vs_torch.py --quick      # <= 10 min, 2 cores
  python experiments/benchmark_vs_torch.py              # 6 timed steps each
  python experiments/benchmark_vs_torch.py --models=tiny,box2seg --steps=10
  python experiments/benchmark_vs_torch.py --smoke      # 64-px crops, 1 step

Needs the `[torch]` extra.  Writes experiments/out/benchmark_vs_torch.json
(`--out`) and prints a table; per network `jax_step_seconds` and
`torch_step_seconds` (medians) and `speed_ratio` = torch / jax (>= 1: our
step is faster), the warm-up times, our init time and the parameter counts.

Method.  For each network both frameworks get the same random uint8 batch
(one seed) and the same parameters (our initial variables copied into the
twin, `torch_twins.load_flax_params`); both normalise the uint8 images inside
the timed step.  Each warms up (JAX: compilation + one step; torch: one
step; then one more step each), then the timed steps alternate jax, torch, jax, torch, ... so that a
drift of the machine (other load, clock) hits both alike.  torch runs on
`--threads` threads (default os.cpu_count()); XLA:CPU's own pool uses every
core whatever the flag says.  The first step's loss of each is reported: the
deterministic networks give the same value in both.

"Same network, loss and optimiser" (experiments/torch_twins.py), per network:
  tiny          defaults.tiny_model(): VGG16-LargeFOV at width 0.125, a
                trained BatchNorm after each conv, fc6 dilation 4, fc_dim
                128, no dropout, 1x1 classifier with bias; 96², batch 16, 7
                classes, 'imagenet' normalisation.  Loss: cross-entropy on
                the logit grid (labels by centre-sampling nearest, 255
                ignored).  Optimiser: SGD momentum 0.9, weight decay 5e-4 on
                kernels only, groups backbone weight/bias and head
                weight/bias at 1x/2x/10x/20x the lr, poly 0.9 over 1000
                steps (defaults.sgd_deeplab; a LambdaLR in torch).
  largefov      defaults.largefov_model(): VGG16-LargeFOV, fc6 dilation 12,
                channel dropout 0.5 (nn.Dropout2d), 321², batch 2, 21
                classes, 'caffe' normalisation; loss and optimiser as tiny.
  resnet101     defaults.resnet101_model(): DeepLab-v2 ResNet-101, MSRA
                layout (stride in the 1x1, ceil-mode stem pool), frozen BN,
                output stride 8 (dilations 2, 4), ASPP-v2 (4 summed dilated
                3x3 convs with bias); 321², batch 2, 21 classes, 'caffe';
                loss and optimiser as tiny.
  box2seg       configs/box2seg.py (default variant): the tiny encoder, UPerNet
                decoder and y / α / β branches; the full phase-2 loss (Eq.
                11: L_GC, λ_AW-ramped L_AW, L_α^fr, the affinity loss on
                class-balanced samples; torch samples with its own
                generator); Adam with L2 5e-4 on kernels, the decoder and
                branches in the head groups, poly (the config's optim);
                crop, batch and box slots of the config.
  bana_labeler  bana.objective.classifier_config(configs/bana.py, 'bap'):
                the tiny VGG with fc6 dilation 1 and a 1x1 classifier
                without bias; background-aware pooling + cross-entropy
                (bap_forward, bap_loss; default options); Adam with the
                config's groups; crop, batch and box slots of the config.

Only ratios measured in one run are comparable: the same step runs ~2.5x
faster on one 2-core machine than on another (issue 11).
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import json
import os
import statistics
import time
from typing import Any, Callable

from absl import app, flags
import jax
import jaxlib
import numpy as np
import torch

from wsss_jax import defaults, run, segmentation
import timing  # experiments/ (this script's folder is on sys.path)
import torch_twins as tt  # experiments/
from wsss_jax.methods.bana import objective as bana_objective
from wsss_jax.methods.box2seg import model as box2seg_model
from wsss_jax.methods.box2seg import objective as box2seg
from wsss_jax.models import build
from wsss_jax.ops import image as image_ops
from wsss_jax.training import mesh as mesh_lib, optim
from wsss_jax.training import state as state_lib, step as step_lib

NETWORKS = ('tiny', 'box2seg', 'bana_labeler', 'largefov', 'resnet101')
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# name -> (model config, crop, batch, classes): experiments/benchmark_step.py's
SEGMENTERS = timing.SEGMENTER_SETTINGS
SCHEDULE_STEPS = timing.SCHEDULE_STEPS
QUICK_STEPS = {'largefov': 2, 'resnet101': 2}
QUICK_STEPS_DEFAULT = 4
SMOKE_CROP, SMOKE_BATCH = 64, 2

_MODELS = flags.DEFINE_list('models', list(NETWORKS),
                            f'Networks to measure, of {NETWORKS}.')
_STEPS = flags.DEFINE_integer('steps', 6, 'Timed steps per framework.')
_QUICK = flags.DEFINE_bool('quick', False,
                           'Fewer timed steps (2 for the 321-px networks, '
                           f'{QUICK_STEPS_DEFAULT} for the others): <= 10 '
                           'min on 2 cores.')
_SMOKE = flags.DEFINE_bool('smoke', False,
                           '64-px crops, batch 2, one timed step (tests).')
_THREADS = flags.DEFINE_integer('threads', 0,
                                'torch threads (0: os.cpu_count()).')
_SEED = flags.DEFINE_integer('seed', 0, 'Batch, init and dropout seed.')
_TORCH_DEVICE = flags.DEFINE_string(
    'torch_device', 'cpu', "torch's device ('cuda' on a GPU machine): the "
    'twins and batches are created there (torch.set_default_device).')
_OUT = flags.DEFINE_string('out', 'experiments/out/benchmark_vs_torch.json',
                           'JSON output path.')



@dataclasses.dataclass
class Network:
  """One network's two steps: what both frameworks need to build them."""
  name: str
  model: Any                     # our Flax module
  loss_fn: Callable              # ours: (outputs, batch, context) -> ...
  optim_config: Any
  normalization: str
  batch: dict[str, np.ndarray]   # the one random batch
  make_torch_step: Callable[[], tt.TrainStep]
  notes: str


def segmenter_network(name: str, rng, smoke: bool) -> Network:
  make_config, crop, batch_size, num_classes = SEGMENTERS[name]
  if smoke:
    crop, batch_size = min(crop, SMOKE_CROP), SMOKE_BATCH
  model_config = make_config()
  normalization = image_ops.normalization_for(model_config,
                                              defaults.input_pipeline())
  optim_config = defaults.sgd_deeplab()
  batch = {'image': timing.random_images(rng, batch_size, crop),
           'mask': rng.integers(0, num_classes, (batch_size, crop, crop),
                                dtype=np.uint8)}
  return Network(
      name=name, model=build.build_model(model_config, num_classes),
      loss_fn=segmentation.cross_entropy_on('mask'),
      optim_config=optim_config, normalization=normalization, batch=batch,
      make_torch_step=lambda: tt.segmenter_step(
          tt.build_segmenter_twin(model_config, num_classes), optim_config,
          SCHEDULE_STEPS, normalization),
      notes=f'{model_config.backbone} + {model_config.head}, CE, SGD')


def box2seg_network(rng, smoke: bool) -> Network:
  config = run.load_config_file(os.path.join(REPO, 'configs', 'box2seg.py'),
                                '')
  num_classes = config.data.shapes.num_classes + 1
  crop, batch_size = config.input.crop_size, config.input.batch_size
  if smoke:
    crop, batch_size = min(crop, SMOKE_CROP), SMOKE_BATCH
  normalization = image_ops.normalization_for(config.model, config.input)
  options = box2seg.Box2SegLossOptions.from_config(config.box2seg)
  return Network(
      name='box2seg',
      model=box2seg_model.build_box2seg_model(config, num_classes),
      loss_fn=box2seg.train_loss(options, num_classes),
      optim_config=config.optim, normalization=normalization,
      batch=timing.random_box_batch(rng, batch_size, crop, num_classes,
                                   config.input.max_boxes),
      make_torch_step=lambda: tt.box2seg_step(
          tt.build_box2seg_twin(config, num_classes), config, num_classes,
          SCHEDULE_STEPS, normalization),
      notes=f'UPerNet + 3 branches, Eq. 11, {config.optim.name}')


def labeler_network(rng, smoke: bool) -> Network:
  config = bana_objective.classifier_config(
      run.load_config_file(os.path.join(REPO, 'configs', 'bana.py'), ''),
      'bap')
  num_classes = config.data.shapes.num_classes + 1
  crop, batch_size = config.input.crop_size, config.input.batch_size
  if smoke:
    crop, batch_size = min(crop, SMOKE_CROP), SMOKE_BATCH
  max_boxes = int(config.input.max_boxes)
  normalization = image_ops.normalization_for(config.model, config.input)
  options = bana_objective.BapOptions.from_config(config.bana)
  return Network(
      name='bana_labeler', model=build.build_model(config.model, num_classes),
      loss_fn=bana_objective.classifier_loss(options),
      optim_config=config.optim, normalization=normalization,
      batch=timing.random_box_batch(
          rng, batch_size, crop, num_classes, max_boxes,
          lambda: int(rng.integers(1, max_boxes + 1))),
      make_torch_step=lambda: tt.labeler_step(
          tt.build_segmenter_twin(config.model, num_classes), config,
          SCHEDULE_STEPS, normalization),
      notes=f'VGG fc6 dilation 1, BAP + CE, {config.optim.name}')


def make_network(name: str, rng, smoke: bool) -> Network:
  if name in SEGMENTERS:
    return segmenter_network(name, rng, smoke)
  if name == 'box2seg':
    return box2seg_network(rng, smoke)
  if name == 'bana_labeler':
    return labeler_network(rng, smoke)
  raise ValueError(f'unknown network {name!r}; choose from {NETWORKS}')


def _timed(fn: Callable[[], Any]) -> tuple[Any, float]:
  start = time.perf_counter()
  result = fn()
  return result, time.perf_counter() - start


def measure(name: str, steps: int, smoke: bool, seed: int) -> dict:
  """Builds both steps on one batch, warms both up, alternates timed steps."""
  net = make_network(name, np.random.default_rng(seed), smoke)
  crop = net.batch['image'].shape[1]
  batch_size = net.batch['image'].shape[0]
  mesh = mesh_lib.make_mesh()
  make_tx = functools.partial(optim.make_optimizer, net.optim_config,
                              num_steps=SCHEDULE_STEPS)
  def init_state():
    # What training pays: the compiled random init, then the state.
    rng = jax.random.PRNGKey(seed)
    variables = state_lib.random_variables(net.model, rng, (1, crop, crop, 3))
    return jax.block_until_ready(state_lib.create_train_state(
        net.model, make_tx, rng, (1, crop, crop, 3), mesh,
        variables=variables))
  state, jax_init = _timed(init_state)
  jax_step = step_lib.make_train_step(net.model, net.loss_fn,
                                      net.normalization, mesh)
  device_batch = mesh_lib.device_batch(net.batch, mesh)
  torch.manual_seed(seed)

  def build_twin():
    torch_step = net.make_torch_step()
    tt.load_flax_params(torch_step.model, jax.device_get(state.variables))
    return torch_step
  torch_step, torch_build = _timed(build_twin)
  params = build.param_count(state.params)
  torch_params = tt.param_count(torch_step.model)
  if params != torch_params:
    raise AssertionError(f'{name}: {params} parameters in ours, '
                         f'{torch_params} in the torch twin')
  torch_batch = tt.to_torch_batch(net.batch)

  def run_jax():
    nonlocal state
    state, metrics = jax_step(state, device_batch)
    return jax.block_until_ready(metrics)

  jax_metrics, jax_first = _timed(run_jax)
  torch_metrics, torch_first = _timed(lambda: torch_step(torch_batch))
  # One more untimed step each: torch's second step was still slow at times.
  run_jax()
  torch_step(torch_batch)
  jax_times, torch_times = [], []
  for _ in range(steps):
    jax_times.append(_timed(run_jax)[1])
    torch_times.append(_timed(lambda: torch_step(torch_batch))[1])
  jax_median = statistics.median(jax_times)
  torch_median = statistics.median(torch_times)
  return {
      'network': name, 'description': net.notes, 'crop': crop,
      'batch': batch_size, 'normalization': net.normalization,
      'optimizer': net.optim_config.name,
      'params': params, 'torch_params': torch_params,
      'torch_threads': torch.get_num_threads(),
      'jax_init_seconds': round(jax_init, 3),
      'jax_compile_and_first_step_seconds': round(jax_first, 3),
      'torch_build_seconds': round(torch_build, 3),
      'torch_first_step_seconds': round(torch_first, 3),
      'timed_steps': steps,
      'jax_step_seconds': round(jax_median, 4),
      'torch_step_seconds': round(torch_median, 4),
      'speed_ratio': round(torch_median / jax_median, 3),
      'jax_step_times': [round(t, 4) for t in jax_times],
      'torch_step_times': [round(t, 4) for t in torch_times],
      'first_step_loss': {'jax': float(jax_metrics['loss']),
                          'torch': float(torch_metrics['loss'])},
  }


def cpu_info() -> dict:
  """Model name and the vector extensions that matter to both libraries."""
  model, cpu_flags = '', set()
  try:
    with open('/proc/cpuinfo', encoding='utf-8') as f:
      for line in f:
        key, _, value = line.partition(':')
        if key.strip() == 'model name' and not model:
          model = value.strip()
        elif key.strip() == 'flags' and not cpu_flags:
          cpu_flags = set(value.split())
  except OSError:
    pass
  return {'model': model, 'avx2': 'avx2' in cpu_flags,
          'avx512f': 'avx512f' in cpu_flags, 'logical_cpus': os.cpu_count()}


def steps_for(name: str) -> int:
  if _SMOKE.value:
    return 1
  if _QUICK.value:
    return QUICK_STEPS.get(name, QUICK_STEPS_DEFAULT)
  return _STEPS.value


def print_table(report: dict) -> None:
  columns = ('network', 'crop', 'batch', 'params', 'jax s/step',
             'torch s/step', 'torch/jax', 'jax compile', 'torch 1st',
             'jax init')
  print(f"jax {report['jax']}, torch {report['torch']}, "
        f"{report['cpu']['model']} (avx2 {report['cpu']['avx2']}, avx512f "
        f"{report['cpu']['avx512f']}), torch threads {report['threads']}")
  print(''.join(f'{c:>14}' for c in columns))
  for row in report['networks'].values():
    values = (row['network'], row['crop'], row['batch'],
              f"{row['params']:,}", row['jax_step_seconds'],
              row['torch_step_seconds'], row['speed_ratio'],
              row['jax_compile_and_first_step_seconds'],
              row['torch_first_step_seconds'], row['jax_init_seconds'])
    print(''.join(f'{v:>14}' for v in values))
  print('torch/jax >= 1: our step is faster.  Ratios from one run only.')


def main(argv):
  del argv
  unknown = [m for m in _MODELS.value if m not in NETWORKS]
  if unknown:
    raise app.UsageError(f'unknown --models {unknown}; choose from {NETWORKS}')
  threads = _THREADS.value or os.cpu_count()
  torch.set_num_threads(threads)
  torch.set_default_device(_TORCH_DEVICE.value)
  report = {'jax': jax.__version__, 'jaxlib': jaxlib.__version__,
            'torch': torch.__version__, 'cpu': cpu_info(), 'threads': threads,
            'torch_device': _TORCH_DEVICE.value,
            'devices': [str(d) for d in jax.devices()],
            'mode': ('smoke' if _SMOKE.value else
                     'quick' if _QUICK.value else 'full'),
            'networks': {}}
  out_dir = os.path.dirname(os.path.abspath(_OUT.value))
  os.makedirs(out_dir, exist_ok=True)
  for name in _MODELS.value:
    result = measure(name, steps_for(name), _SMOKE.value, _SEED.value)
    print(json.dumps(result), flush=True)
    report['networks'][name] = result
    with open(_OUT.value, 'w', encoding='utf-8') as f:   # after each network
      json.dump(report, f, indent=2)
    gc.collect()
  print_table(report)


if __name__ == '__main__':
  app.run(main)
