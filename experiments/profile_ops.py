"""Where XLA:CPU loses to PyTorch: every layer of a network, timed alone.

  python experiments/profile_ops.py                      # tiny net, 96², batch 16
  python experiments/profile_ops.py --model=largefov --batch=2 --crop=321
  python experiments/profile_ops.py --xla_pool=true      # XLA's own pool VJP

For each distinct layer of the VGG16-LargeFOV topology (3×3 convolutions at
each stage's shape, the max pools, BatchNorm when the model has it) this
times, in one process and alternating, the jitted JAX forward, the jitted
forward + backward (input and weight gradients), and the same two with
PyTorch autograd on the same shapes and thread count.  The table says per
op which framework is faster and by how much; the layer totals (weighted by
how often each shape occurs in the network) say where a train step's time
goes.  Only ratios from one run are comparable (machines differ ~2.5×).
Needs the `[torch]` extra.
"""

from __future__ import annotations

import json
import os
import statistics
import time

from absl import app, flags
import jax
import jax.numpy as jnp
from jax import lax
import numpy as np

from wsss_jax import defaults
from wsss_jax.models import layers, vgg

_MODEL = flags.DEFINE_enum('model', 'tiny', ['tiny', 'largefov'],
                           'Network whose layers are timed.')
_BATCH = flags.DEFINE_integer('batch', 16, 'Batch size.')
_CROP = flags.DEFINE_integer('crop', 96, 'Input side.')
_REPEATS = flags.DEFINE_integer('repeats', 7, 'Timed calls per op (median).')
_XLA_POOL = flags.DEFINE_bool(
    'xla_pool', False, "Time the pool with XLA's reduce_window VJP "
    '(select_and_scatter) instead of ours.')
_OUT = flags.DEFINE_string('out', 'experiments/out/profile_ops.json',
                           'JSON output.')


def layer_shapes(model: str, crop: int):
  """[(name, kind, in (H, W, C), out C, stride/dilation, count)] of the
  VGG16-LargeFOV backbone at `crop` (identical layers merged, counted)."""
  config = defaults.tiny_model() if model == 'tiny' else defaults.largefov_model()
  width, size, channels = config.width, crop, 3
  ops = {}
  def add(key, entry):
    if key in ops:
      ops[key][-1] += 1
    else:
      ops[key] = list(entry) + [1]
  for block, (base, repeats) in enumerate(vgg.VGG16_BLOCKS, start=1):
    dilation = 2 if block == 5 else 1
    out_channels = layers.scaled_channels(base, width)
    for _ in range(repeats):
      add(('conv', size, channels, out_channels, dilation),
          (f'conv{block} {size}² {channels}->{out_channels}', 'conv',
           (size, size, channels), out_channels, dilation))
      if config.batch_norm:
        add(('bn', size, out_channels),
            (f'bn{block} {size}² {out_channels}', 'bn',
             (size, size, out_channels), out_channels, 1))
      channels = out_channels
    stride = 2 if block <= 3 else 1
    add(('pool', size, channels, stride),
        (f'pool{block} {size}² {channels} s{stride}', 'pool',
         (size, size, channels), channels, stride))
    size = layers.pool_output_size(size, 3, stride, 1)
  add(('conv', size, channels, config.fc_dim, config.fc6_dilation),
      (f'fc6 {size}² {channels}->{config.fc_dim}', 'conv',
       (size, size, channels), config.fc_dim, config.fc6_dilation))
  return list(ops.values())


def _jax_op(kind, in_shape, out_channels, param, xla_pool):
  """(forward, forward+backward) jitted functions and their arguments."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=in_shape), jnp.float32)
  if kind == 'conv':
    w = jnp.asarray(rng.normal(size=(3, 3, in_shape[-1], out_channels)) * 0.1,
                    jnp.float32)
    def f(x, w):
      return lax.conv_general_dilated(
          x, w, (1, 1), ((param, param), (param, param)),
          rhs_dilation=(param, param),
          dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    args = (x, w)
  elif kind == 'bn':
    scale = jnp.ones((in_shape[-1],), jnp.float32)
    def f(x, scale):
      mean = jnp.mean(x, axis=(0, 1, 2))
      var = jnp.var(x, axis=(0, 1, 2))
      return (x - mean) * lax.rsqrt(var + 1e-5) * scale
    args = (x, scale)
  else:
    def f(x):
      if xla_pool:
        return lax.reduce_window(x, -jnp.inf, lax.max, (1, 3, 3, 1),
                                 (1, param, param, 1),
                                 ((0, 0), (1, 1), (1, 1), (0, 0)))
      return layers.max_pool2d(x, 3, param, 1)
    args = (x,)
  def loss(*a):
    return jnp.sum(f(*a) ** 2) * 0.5
  grad = jax.grad(loss, argnums=tuple(range(len(args))))
  return jax.jit(f), jax.jit(grad), args


def _torch_op(torch, kind, in_shape, out_channels, param):
  rng = np.random.default_rng(0)
  x = torch.tensor(rng.normal(size=in_shape).transpose(0, 3, 1, 2),
                   dtype=torch.float32).contiguous()
  x.requires_grad_(True)
  if kind == 'conv':
    module = torch.nn.Conv2d(in_shape[-1], out_channels, 3, padding=param,
                             dilation=param, bias=False)
  elif kind == 'bn':
    module = torch.nn.BatchNorm2d(in_shape[-1])
  else:
    module = torch.nn.MaxPool2d(3, param, 1)
  def forward():
    with torch.no_grad():
      return module(x)
  def backward():
    out = module(x)
    (0.5 * (out ** 2).sum()).backward()
    return x.grad
  return forward, backward


def _median_seconds(fn, repeats, block):
  fn_out = fn()
  block(fn_out)
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    block(fn())
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def main(argv):
  del argv
  import torch  # the optional [torch] extra
  threads = os.cpu_count()
  torch.set_num_threads(threads)
  rows = []
  for name, kind, hwc, out_channels, param, count in layer_shapes(
      _MODEL.value, _CROP.value):
    in_shape = (_BATCH.value,) + tuple(hwc)
    forward, both, args = _jax_op(kind, in_shape, out_channels, param,
                                  _XLA_POOL.value)
    t_forward, t_both = _torch_op(torch, kind, in_shape, out_channels, param)
    timings = {}
    for label, fn, block in (
        ('jax_forward', lambda: forward(*args), jax.block_until_ready),
        ('torch_forward', t_forward, lambda _: None),
        ('jax_backward', lambda: both(*args), jax.block_until_ready),
        ('torch_backward', t_both, lambda _: None)):
      timings[label] = _median_seconds(fn, _REPEATS.value, block)
    row = dict(name=name, kind=kind, count=count,
               **{k: round(v * 1e3, 3) for k, v in timings.items()})
    row['backward_ratio'] = round(timings['torch_backward']
                                  / timings['jax_backward'], 3)
    rows.append(row)
    print(f"{name:32s} x{count}  fwd jax {row['jax_forward']:8.2f} ms "
          f"torch {row['torch_forward']:8.2f}  |  fwd+bwd jax "
          f"{row['jax_backward']:8.2f} torch {row['torch_backward']:8.2f}  "
          f"torch/jax {row['backward_ratio']:.2f}", flush=True)
  totals = {}
  for row in rows:
    for key in ('jax_backward', 'torch_backward'):
      totals.setdefault(row['kind'], {}).setdefault(key, 0.0)
      totals[row['kind']][key] += row[key] * row['count']
  print('\nper kind, fwd+bwd ms summed over the network:')
  for kind, total in totals.items():
    print(f"  {kind:5s} jax {total['jax_backward']:9.1f}  torch "
          f"{total['torch_backward']:9.1f}")
  report = dict(model=_MODEL.value, batch=_BATCH.value, crop=_CROP.value,
                threads=threads, xla_pool=_XLA_POOL.value, jax=jax.__version__,
                torch=torch.__version__, rows=rows, totals_ms=totals)
  os.makedirs(os.path.dirname(os.path.abspath(_OUT.value)), exist_ok=True)
  with open(_OUT.value, 'w') as f:
    json.dump(report, f, indent=2)


if __name__ == '__main__':
  app.run(main)
