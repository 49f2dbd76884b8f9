"""LPG's HourglassNet (wsss_jax.models.hourglass): the structure checked by
exact parameter counts (no 12 M-parameter init: shapes via jax.eval_shape),
output shapes, input-size validation, and a small network's forward,
gradient and BN statistics.  The numpy twin of the PyTorch network is in
tests/test_convert_weights.py (the `lpg_hourglass` layout round trip)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from wsss_jax.models import hourglass
from wsss_jax.models import weights


def _module_counts(variables):
  return {name: sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree))
          for name, tree in variables['params'].items()}


@pytest.mark.parametrize('channels, total, pre', [
    (5, 12_120_370, 141_456),
    (4, 12_118_018, 139_104),
])
def test_parameter_counts_match_lpg(channels, total, pre):
  variables = hourglass.abstract_variables(hourglass.HourglassNet(), channels)
  assert hourglass.parameter_count(variables) == total
  assert _module_counts(variables) == {
      'pre': pre, 'hourglass': 11_535_744, 'cnv': 221_696, 'fm': 221_474}
  # Running statistics are not parameters: one mean/var pair per BN.
  stats = weights.flatten_variables({'batch_stats': variables['batch_stats']})
  assert stats and all(key.endswith(('/mean', '/var')) for key in stats)


def test_structure_names_and_skips():
  flat = weights.flatten_variables(hourglass.abstract_variables(
      hourglass.HourglassNet(), 5))
  kernels = {key[len('params/'):-len('/kernel')]: value.shape
             for key, value in flat.items()
             if key.startswith('params/') and key.endswith('/kernel')}
  assert kernels['pre/layers_0/conv'] == (7, 7, 5, 48)
  assert kernels['pre/layers_1/skip_conv'] == (1, 1, 48, 96)
  assert kernels['cnv/conv'] == (3, 3, 96, 256)
  assert kernels['fm/layers_0/conv'] == (3, 3, 256, 96)
  assert kernels['fm/layers_1'] == (1, 1, 96, 2)
  assert 'params/fm/layers_0/conv/bias' in flat
  assert 'params/cnv/conv/bias' not in flat
  bottom = 'hourglass/' + 'low2/' * 4
  assert kernels[bottom + 'low2_3/conv1'] == (3, 3, 192, 192)
  assert kernels[bottom + 'low1_0/conv1'] == (3, 3, 128, 192)
  assert kernels[bottom + 'low3_1/conv2'] == (3, 3, 128, 128)
  assert f'{bottom}low2_4/conv1' not in kernels
  # A skip conv exactly where the stride is 2 or the channels change:
  # every low1_0, and low3_1 of the 96<-128 and 128<-192 levels.
  skips = sorted(name[:-len('/skip_conv')] for name in kernels
                 if name.endswith('/skip_conv'))
  levels = ['hourglass/' + 'low2/' * depth for depth in range(5)]
  assert skips == sorted(
      ['pre/layers_1'] + [level + 'low1_0' for level in levels]
      + [levels[1] + 'low3_1', levels[4] + 'low3_1'])


@pytest.mark.parametrize('height, width', [(128, 128), (128, 256), (512, 640)])
def test_output_shapes(height, width):
  model = hourglass.HourglassNet()
  variables = hourglass.abstract_variables(model, 5)
  x = jax.ShapeDtypeStruct((2, height, width, 5), jnp.float32)
  out = jax.eval_shape(model.apply, variables, x)
  assert out['logits'].shape == (2, height // 4, width // 4, 2)
  assert out['logits'].dtype == jnp.float32
  assert out['features'].shape == (2, height // 4, width // 4, 256)


def test_bfloat16_computation_keeps_float32_params_and_logits():
  model = hourglass.HourglassNet(width=0.25, dtype=jnp.bfloat16)
  variables = hourglass.abstract_variables(model, 4)
  assert {leaf.dtype for leaf in jax.tree.leaves(variables)} == {
      jnp.dtype(jnp.float32)}
  out = jax.eval_shape(model.apply, variables,
                       jax.ShapeDtypeStruct((1, 128, 128, 4), jnp.float32))
  assert out['logits'].dtype == jnp.float32
  assert out['features'].dtype == jnp.bfloat16


@pytest.mark.parametrize('shape', [(1, 321, 321, 5), (1, 128, 192, 5),
                                   (1, 64, 64, 5), (128, 128, 5)])
def test_sides_not_multiple_of_128_are_rejected(shape):
  model = hourglass.HourglassNet()
  with pytest.raises(ValueError, match=re_shape(shape)):
    jax.eval_shape(model.init, jax.random.key(0),
                   jax.ShapeDtypeStruct(shape, jnp.float32))


def re_shape(shape):
  return 'multiples of 128.*' + str(tuple(shape)).replace(
      '(', r'\(').replace(')', r'\)')


def test_width_scales_every_channel_count():
  flat = weights.flatten_variables(hourglass.abstract_variables(
      hourglass.HourglassNet(width=0.25, num_outputs=3), 4))
  assert flat['params/pre/layers_0/conv/kernel'].shape == (7, 7, 4, 12)
  assert flat['params/cnv/conv/kernel'].shape == (3, 3, 24, 64)
  assert flat['params/fm/layers_1/kernel'].shape == (1, 1, 24, 3)
  assert flat[f'params/hourglass/{"low2/" * 4}low2_0/conv1/kernel'].shape == (
      3, 3, 48, 48)


def test_frozen_bn_keeps_bn_vectors_out_of_params():
  variables = hourglass.abstract_variables(
      hourglass.HourglassNet(frozen_bn=True), 5)
  trainable = hourglass.parameter_count(variables)
  # Convs only: 12,120,370 minus two vectors per BN channel.
  bn_channels = sum(leaf.shape[0] for key, leaf in weights.flatten_variables(
      variables).items() if key.endswith('/scale'))
  assert trainable == 12_120_370 - 2 * bn_channels
  assert not any('/bn' in key or 'skip_bn' in key
                 for key in weights.flatten_variables(
                     {'params': variables['params']}))


def test_upsampling_repeats_each_cell():
  x = jnp.arange(6.0).reshape(1, 2, 3, 1)
  up = np.asarray(hourglass.upsample_nearest2(x))[0, :, :, 0]
  np.testing.assert_array_equal(up, np.kron(np.arange(6.0).reshape(2, 3),
                                            np.ones((2, 2))))


def _random_variables(model, channels, seed=0):
  """Variables of `model` drawn in numpy from their shapes: He-normal
  kernels, small biases, unit BN; no initialisation program to compile."""
  rng = np.random.default_rng(seed)
  def draw(path, leaf):
    name = jax.tree_util.keystr(path)
    if name.endswith("['kernel']"):
      fan_in = math.prod(leaf.shape[:-1])
      return rng.normal(0, math.sqrt(2 / fan_in), leaf.shape).astype(
          np.float32)
    if name.endswith(("['scale']", "['var']")):
      return np.ones(leaf.shape, np.float32)
    return rng.normal(0, 0.1, leaf.shape).astype(np.float32)
  return jax.tree_util.tree_map_with_path(
      draw, hourglass.abstract_variables(model, channels))


def test_small_network_forward_gradient_and_batch_stats():
  model = hourglass.HourglassNet(width=0.25)
  variables = _random_variables(model, 5)
  rng = np.random.default_rng(1)
  x = rng.normal(size=(2, 128, 128, 5)).astype(np.float32)
  labels = rng.integers(0, 2, (2, 32, 32))

  def loss_fn(params, batch_stats):
    out, updates = model.apply({'params': params, 'batch_stats': batch_stats},
                               x, train=True, mutable=['batch_stats'])
    log_probs = jax.nn.log_softmax(out['logits'])
    picked = jnp.take_along_axis(log_probs, labels[..., None], -1)
    return -jnp.mean(picked), (out['logits'], updates['batch_stats'])

  # One program, forward and backward; XLA's lowest backend optimisation
  # compiles it in about half the time (as `training.state` does for init).
  step = jax.jit(jax.value_and_grad(loss_fn, has_aux=True)).lower(
      variables['params'], variables['batch_stats']).compile(
          compiler_options={'xla_backend_optimization_level': 0})
  (loss, (logits, new_stats)), grads = step(variables['params'],
                                            variables['batch_stats'])
  assert logits.shape == (2, 32, 32, 2)
  assert np.isfinite(loss) and np.all(np.isfinite(logits))
  flat_grads = weights.flatten_variables({'params': grads})
  assert flat_grads.keys() == weights.flatten_variables(
      {'params': variables['params']}).keys()
  assert all(np.all(np.isfinite(g)) for g in flat_grads.values())
  # The gradient reaches both ends and the innermost level.
  for key in ('params/pre/layers_0/conv/kernel', 'params/fm/layers_1/bias',
              f'params/hourglass/{"low2/" * 4}low2_3/conv2/kernel'):
    assert np.any(flat_grads[key] != 0), key
  # train=True moves every running statistic (PyTorch momentum 0.1).
  assert (jax.tree.structure(new_stats)
          == jax.tree.structure(variables['batch_stats']))
  for key, new in weights.flatten_variables(new_stats).items():
    old = weights.flatten_variables(variables['batch_stats'])[key]
    assert not np.allclose(old, new), key


def test_torch_initialisers():
  kernel = hourglass.TORCH_KERNEL_INIT(jax.random.key(0), (3, 3, 16, 64))
  bias = hourglass.torch_bias_init(144)(jax.random.key(1), (4096,))
  bound = 1 / math.sqrt(144)
  for values in (kernel, bias):
    assert float(jnp.max(jnp.abs(values))) <= bound
    assert float(jnp.max(jnp.abs(values))) > 0.95 * bound
