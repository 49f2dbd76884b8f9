"""Tests for wsss_jax.models: shapes, parameter counts, layer semantics."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax
import numpy as np
import pytest

from wsss_jax import defaults
from wsss_jax.models import build
from wsss_jax.models import convolution
from wsss_jax.models import layers
from wsss_jax.models import weights


def _key(seed):
  # The counter-based RBG generator compiles several times faster than
  # threefry on CPU, and initialisation is most of these tests' cost.
  return jax.random.key(seed, impl='unsafe_rbg')


def _init(model, images):
  return jax.jit(model.init)(_key(0), images)


def _apply(model, variables, images, **kwargs):
  return jax.jit(functools.partial(model.apply, **kwargs))(variables, images)


def _tiny_vgg(**overrides):
  config = defaults.largefov_model()
  config.width, config.fc_dim = 0.125, 64
  for key, value in overrides.items():
    config[key] = value
  return config


def _tiny_resnet(**overrides):
  config = defaults.resnet101_model()
  config.resnet_blocks, config.width = (1, 1, 1, 1), 0.125
  for key, value in overrides.items():
    config[key] = value
  return config


def _abstract_apply(model, size):
  variables = build.abstract_variables(model, size)
  images = jax.ShapeDtypeStruct((2, size, size, 3), jnp.float32)
  return variables, jax.eval_shape(
      lambda v, x: model.apply(v, x, train=False), variables, images)


def _shapes(tree):
  return jax.tree.map(lambda leaf: tuple(leaf.shape), tree)


def _conv_geometry(model, variables, images):
  """{conv path: (strides, dilation, padding)} recorded during a forward."""
  record = {}
  def interceptor(next_fun, args, kwargs, context):
    module = context.module
    if isinstance(module, nn.Conv) and context.method_name == '__call__':
      record['/'.join(module.path)] = (module.strides, module.kernel_dilation,
                                       module.padding)
    elif (isinstance(module, convolution.Conv)
          and context.method_name == '__call__'):
      record['/'.join(module.path)] = (
          (module.stride,) * 2, (module.dilation,) * 2,
          ((module.padding,) * 2,) * 2)
    elif (isinstance(module, layers.PointwiseConv)
          and context.method_name == '__call__'):
      record['/'.join(module.path)] = ((module.stride,) * 2, (1, 1),
                                       ((0, 0), (0, 0)))
    return next_fun(*args, **kwargs)
  with nn.intercept_methods(interceptor):
    jax.eval_shape(model.apply, variables, images)   # tracing suffices
  return record


def _bn_affine_count(variables):
  flat = weights.flatten_variables(variables)
  return sum(int(np.prod(v.shape)) for k, v in flat.items()
             if k.startswith('params/') or k.endswith(('/scale', '/bias')))


# --------------------------------------------------------------------------
# Output strides, shapes, parameter counts (full width, shapes only)
# --------------------------------------------------------------------------
@pytest.mark.parametrize('size, expected', [(321, 41), (375, 47), (500, 63)])
def test_vgg_largefov_output_stride_8(size, expected):
  config = defaults.largefov_model()
  _, out = _abstract_apply(build.build_model(config, 21), size)
  assert out['logits'].shape == (2, expected, expected, 21)
  assert out['features'].shape == (2, expected, expected, 1024)
  assert out['logits'].dtype == jnp.float32
  # Pyramid levels for decoders: conv3_3 at stride 4, conv4_3 and fc7 at 8.
  quarter = -(-(-(-size // 2)) // 2)
  assert out['levels']['c3'].shape == (2, quarter, quarter, 256)
  assert out['levels']['c4'].shape == (2, expected, expected, 512)
  assert out['levels']['c5'].shape == (2, expected, expected, 1024)
  assert build.feature_size(config, size) == expected


def test_resnet101_output_stride_8_and_levels():
  config = defaults.resnet101_model()
  _, out = _abstract_apply(build.build_model(config, 21), 321)
  assert out['logits'].shape == (2, 41, 41, 21)
  assert out['features'].shape == (2, 41, 41, 2048)
  assert _shapes(out['levels']) == {
      'c2': (2, 81, 81, 256), 'c3': (2, 41, 41, 512),
      'c4': (2, 41, 41, 1024), 'c5': (2, 41, 41, 2048)}


@pytest.mark.parametrize('output_stride, sides', [
    (16, (33, 17, 9, 9)), (32, (33, 17, 9, 5))])
def test_resnet_other_output_strides(output_stride, sides):
  config = _tiny_resnet(output_stride=output_stride)
  _, out = _abstract_apply(build.build_model(config, 3), 129)
  got = tuple(out['levels'][f'c{i}'].shape[1] for i in range(2, 6))
  assert got == sides
  assert build.feature_size(config, 129) == sides[-1]


@pytest.mark.parametrize('size', [321, 320, 512, 513, 97])
@pytest.mark.parametrize('layout_msra', [True, False])
def test_feature_size_matches_network(size, layout_msra):
  config = _tiny_resnet(resnet_stride_in_1x1=layout_msra,
                        resnet_stem_ceil_mode=layout_msra)
  _, out = _abstract_apply(build.build_model(config, 3), size)
  assert out['logits'].shape[1] == build.feature_size(config, size)
  _, out = _abstract_apply(build.build_model(_tiny_vgg(), 3), size)
  assert out['logits'].shape[1] == build.feature_size(_tiny_vgg(), size)


def test_resnet_stem_pool_ceil_vs_floor_differ_on_even_sizes():
  # 512 -> 256 after the stem conv; ceil-mode pool gives 129, floor 128.
  ceil = build.feature_size(_tiny_resnet(), 512)
  floor = build.feature_size(_tiny_resnet(resnet_stem_ceil_mode=False), 512)
  assert (ceil, floor) == (65, 64)


@pytest.mark.parametrize('head_bias, num_classes, expected', [
    (False, 21, 20_505_408),   # BANA Labeler / DeepLab_LargeFOV (bana.md 5.3)
    (True, 21, 20_505_429),    # LPG Deeplab_LargeFOV (lpg.md 4.5)
    (True, 61, 20_546_429),    # LPG COCO-60 model
])
def test_largefov_parameter_counts(head_bias, num_classes, expected):
  config = defaults.largefov_model()
  config.head_bias = head_bias
  variables = build.abstract_variables(build.build_model(config, num_classes))
  assert set(variables) == {'params'}
  assert set(variables['params']) == {'backbone', 'head'}
  assert build.param_count(variables['params']) == expected


def test_resnet_parameter_counts():
  # LPG's DeepLabV2_ResNet101 (V2 ASPP with bias, lpg.md 4.6) and BANA's
  # variant (256-channel ASPP + biasless classifier, bana.md 5.7); PyTorch
  # counts BN affine parameters, which frozen BN keeps in batch_stats.
  config = defaults.resnet101_model()
  variables = build.abstract_variables(build.build_model(config, 21))
  assert set(variables['params']) == {'backbone', 'head'}
  assert _bn_affine_count(variables) == 44_048_532
  config.aspp_dim, config.head_bias = 256, False
  variables = build.abstract_variables(build.build_model(config, 21))
  assert _bn_affine_count(variables) == 61_379_904
  assert _shapes(variables['params']['head']['classifier']) == {
      'kernel': (1, 1, 256, 21)}


# --------------------------------------------------------------------------
# Layer semantics against hand-computed arrays
# --------------------------------------------------------------------------
def _grid(values):
  return jnp.asarray(values, jnp.float32)[None, :, :, None]


def test_max_pool_floor_and_ceil_mode_hand_computed():
  x = _grid(np.arange(16).reshape(4, 4))
  floor = layers.max_pool2d(x, 3, 2, 1, ceil_mode=False)[0, :, :, 0]
  np.testing.assert_array_equal(floor, [[5, 7], [13, 15]])
  # Ceil mode adds a window starting at row/col 3 (covering 3 and padding).
  ceil = layers.max_pool2d(x, 3, 2, 1, ceil_mode=True)[0, :, :, 0]
  np.testing.assert_array_equal(ceil, [[5, 7, 7], [13, 15, 15], [13, 15, 15]])


def test_max_pool_ceil_mode_drops_window_starting_in_padding():
  # size 5, k 2, s 2, p 1: ceil gives 4 windows, but the 4th starts at 5 =
  # size + padding - 1 + 1 (inside the right padding) and PyTorch drops it.
  assert layers.pool_output_size(5, 2, 2, 1, ceil_mode=True) == 3
  assert layers.pool_output_size(6, 2, 2, 1, ceil_mode=True) == 4
  assert layers.pool_output_size(6, 2, 2, 1, ceil_mode=False) == 4
  x = _grid(-np.arange(25).reshape(5, 5))       # max = top-left of window
  out = layers.max_pool2d(x, 2, 2, 1, ceil_mode=True)[0, :, :, 0]
  np.testing.assert_array_equal(out, [[0, -1, -3], [-5, -6, -8],
                                      [-15, -16, -18]])


def test_max_pool_padding_is_minus_infinity():
  x = _grid(-np.ones((3, 3)))
  out = layers.max_pool2d(x, 3, 1, 1)[0, :, :, 0]
  np.testing.assert_array_equal(out, -np.ones((3, 3)))


def _np_max_pool_grad(x, g, k, s, p, ceil):
  """Gradient of a square max pool by loops: each window's gradient goes to
  its first maximal member in row-major order (PyTorch's rule)."""
  _, height, width, _ = x.shape
  out_h = layers.pool_output_size(height, k, s, p, ceil)
  out_w = layers.pool_output_size(width, k, s, p, ceil)
  grad = np.zeros_like(x)
  for b in range(x.shape[0]):
    for c in range(x.shape[3]):
      for i in range(out_h):
        for j in range(out_w):
          best, where = -np.inf, None
          for di in range(k):
            for dj in range(k):
              r, q = i * s + di - p, j * s + dj - p
              if 0 <= r < height and 0 <= q < width and x[b, r, q, c] > best:
                best, where = x[b, r, q, c], (r, q)
          grad[b, where[0], where[1], c] += g[b, i, j, c]
  return grad


@pytest.mark.parametrize('k,s,p,ceil,size', [
    (3, 2, 1, False, 9), (3, 2, 1, False, 8), (3, 2, 1, True, 8),
    (3, 1, 1, False, 7), (2, 2, 1, True, 5), (3, 3, 0, False, 10)])
def test_max_pool_gradient_goes_to_first_maximum(k, s, p, ceil, size):
  rng = np.random.default_rng(k + 10 * s + size)
  # Small integers make ties common: the row-major rule decides them.
  x = rng.integers(0, 3, (2, size, size + 1, 3)).astype(np.float32)
  out = layers.max_pool2d(jnp.asarray(x), k, s, p, ceil_mode=ceil)
  g = rng.normal(size=out.shape).astype(np.float32)
  _, vjp = jax.vjp(lambda v: layers.max_pool2d(v, k, s, p, ceil_mode=ceil),
                   jnp.asarray(x))
  np.testing.assert_allclose(vjp(jnp.asarray(g))[0],
                             _np_max_pool_grad(x, g, k, s, p, ceil),
                             rtol=1e-6, atol=1e-6)


def test_max_pool_gradient_equals_xla_rule_without_ties():
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 13, 11, 4))
  def reference(v):
    return lax.reduce_window(v, -jnp.inf, lax.max, (1, 3, 3, 1),
                             (1, 2, 2, 1), ((0, 0), (1, 1), (1, 1), (0, 0)))
  def ours(v):
    return layers.max_pool2d(v, 3, 2, 1)
  weights = jax.random.normal(jax.random.PRNGKey(1), ours(x).shape)
  np.testing.assert_array_equal(ours(x), reference(x))
  np.testing.assert_allclose(
      jax.grad(lambda v: jnp.sum(ours(v) * weights))(x),
      jax.grad(lambda v: jnp.sum(reference(v) * weights))(x), atol=1e-6)
  jitted = jax.jit(jax.grad(lambda v: jnp.sum(ours(v) ** 2)))
  assert np.isfinite(np.asarray(jitted(x))).all()


@pytest.mark.parametrize('kernel,stride,padding,dilation,module', [
    (1, 1, 0, 1, layers.PointwiseConv),
    (1, 2, 0, 1, layers.PointwiseConv),
    (3, 1, 12, 12, convolution.Conv),    # dead taps pruned on a 9×8 map
    (3, 2, 1, 1, convolution.Conv),
])
def test_conv2d_modules_are_nn_conv(kernel, stride, padding, dilation, module):
  """`layers.conv2d`'s modules have nn.Conv's parameters, outputs and
  gradients."""
  x = jax.random.normal(_key(0), (2, 9, 8, 5))
  reference = nn.Conv(7, (kernel, kernel), strides=(stride, stride),
                      padding=((padding, padding),) * 2,
                      kernel_dilation=(dilation, dilation),
                      kernel_init=layers.HE_NORMAL_FAN_IN,
                      bias_init=nn.initializers.constant(0.3))
  ours = layers.conv2d(7, kernel, stride=stride, padding=padding,
                       dilation=dilation,
                       bias_init=nn.initializers.constant(0.3))
  assert isinstance(ours, module)
  variables = reference.init(_key(1), x)
  # Same parameter names, shapes and initial values (same keys).
  jax.tree.map(np.testing.assert_array_equal, ours.init(_key(1), x),
               variables)
  np.testing.assert_allclose(ours.apply(variables, x),
                             reference.apply(variables, x), atol=1e-5)
  assert ours.apply(variables, x).shape == reference.apply(variables,
                                                           x).shape
  def loss(module):
    return lambda v, x: jnp.sum(jnp.sin(module.apply(v, x)))
  grads = jax.grad(loss(ours), argnums=(0, 1))(variables, x)
  expected = jax.grad(loss(reference), argnums=(0, 1))(variables, x)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5),
               grads, expected)
  bf16 = layers.conv2d(7, kernel, padding=padding, dilation=dilation,
                       dtype=jnp.bfloat16)
  assert bf16.apply(variables, x).dtype == jnp.bfloat16


def test_avg_pool_count_include_pad_hand_computed():
  x = _grid(np.ones((3, 3)))
  out = layers.avg_pool2d(x, 3, 1, 1, count_include_pad=True)[0, :, :, 0]
  np.testing.assert_allclose(out, np.array([[4, 6, 4], [6, 9, 6], [4, 6, 4]])
                             / 9, rtol=1e-6)
  excluded = layers.avg_pool2d(x, 3, 1, 1, count_include_pad=False)
  np.testing.assert_allclose(excluded, np.ones((1, 3, 3, 1)), rtol=1e-6)


def test_pool_input_smaller_than_window_raises():
  with pytest.raises(ValueError, match='smaller than the window'):
    layers.pool_output_size(1, 5, 1, 1)
  with pytest.raises(ValueError, match='half the window'):
    layers.pool_output_size(9, 3, 1, 2)


def test_vgg_dilations_and_strides():
  model = build.build_model(_tiny_vgg(), 3)
  images = jax.ShapeDtypeStruct((1, 17, 17, 3), jnp.float32)
  variables = build.abstract_variables(model, 17)
  geometry = _conv_geometry(model, variables, images)
  assert geometry['backbone/conv4_3'] == ((1, 1), (1, 1), ((1, 1), (1, 1)))
  for name in ('conv5_1', 'conv5_2', 'conv5_3'):
    assert geometry[f'backbone/{name}'] == ((1, 1), (2, 2), ((2, 2), (2, 2)))
  assert geometry['backbone/fc6'] == ((1, 1), (12, 12), ((12, 12), (12, 12)))
  assert geometry['backbone/fc7'][1] == (1, 1)
  assert len(geometry) == 16       # 13 convs, fc6, fc7, classifier
  bana_stage1 = build.build_model(_tiny_vgg(fc6_dilation=1), 3)
  assert _conv_geometry(bana_stage1, variables, images)['backbone/fc6'][1] == (
      1, 1)


@pytest.mark.parametrize('msra', [True, False])
def test_resnet_dilations_and_stride_placement(msra):
  model = build.build_model(_tiny_resnet(resnet_stride_in_1x1=msra), 3)
  images = jax.ShapeDtypeStruct((1, 33, 33, 3), jnp.float32)
  variables = build.abstract_variables(model, 33)
  geometry = _conv_geometry(model, variables, images)
  strided = sorted(k for k, v in geometry.items() if v[0] != (1, 1))
  first = 'conv1' if msra else 'conv2'
  assert strided == ['backbone/conv1', f'backbone/layer2/block1/{first}',
                     'backbone/layer2/block1/shortcut_conv']
  assert geometry['backbone/layer3/block1/conv2'][1:] == ((2, 2), ((2, 2),) * 2)
  assert geometry['backbone/layer4/block1/conv2'][1:] == ((4, 4), ((4, 4),) * 2)
  for index, rate in enumerate((6, 12, 18, 24)):
    assert geometry[f'head/c{index}'][1] == (rate, rate)


# --------------------------------------------------------------------------
# Batch norm
# --------------------------------------------------------------------------
def test_frozen_batch_norm_hand_computed():
  module = layers.FrozenBatchNorm()
  x = jnp.array([[1.0, 2.0], [3.0, -1.0]])
  stats = {'scale': jnp.array([2.0, 1.0]), 'bias': jnp.array([0.5, -1.0]),
           'mean': jnp.array([1.0, 0.0]), 'var': jnp.array([4.0, 1.0])}
  out = module.apply({'batch_stats': stats}, x)
  eps = 1e-5
  expected = [[0.5, 2 / np.sqrt(1 + eps) - 1],
              [(3 - 1) * 2 / np.sqrt(4 + eps) + 0.5, -1 / np.sqrt(1 + eps) - 1]]
  np.testing.assert_allclose(out, expected, rtol=1e-6)


def test_frozen_bn_resnet_has_no_bn_params_and_stays_fixed():
  model = build.build_model(_tiny_resnet(), 3)
  images = jax.random.normal(_key(1), (2, 33, 33, 3))
  variables = _init(model, images)
  flat_params = weights.flatten_variables(variables['params'])
  assert not [k for k in flat_params if '/bn' in k or 'shortcut_bn' in k]
  stats = weights.flatten_variables(variables['batch_stats'])
  assert {k.rsplit('/', 1)[1] for k in stats} == {'scale', 'bias', 'mean', 'var'}
  _, updated = _apply(model, variables, images, train=True,
                           mutable=['batch_stats'])
  for key, value in weights.flatten_variables(updated['batch_stats']).items():
    np.testing.assert_array_equal(value, stats[key])


def test_trained_bn_uses_pytorch_momentum():
  model = build.build_model(_tiny_resnet(frozen_bn=False), 3)
  images = jax.random.normal(_key(1), (2, 33, 33, 3))
  variables = _init(model, images)
  assert 'scale' in variables['params']['backbone']['bn1']
  _, updated = _apply(model, variables, images, train=True,
                           mutable=['batch_stats'])
  # Stem BN input = the stem conv output; running mean = 0.9 * 0 + 0.1 * mean.
  conv = variables['params']['backbone']['conv1']['kernel']
  stem = jax.lax.conv_general_dilated(
      images, conv, (2, 2), ((3, 3), (3, 3)),
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  np.testing.assert_allclose(updated['batch_stats']['backbone']['bn1']['mean'],
                             0.1 * stem.mean(axis=(0, 1, 2)), rtol=1e-4,
                             atol=1e-6)


# --------------------------------------------------------------------------
# Dropout, dtype, heads, forward + grad
# --------------------------------------------------------------------------
def test_channel_dropout_drops_whole_channels():
  x = jnp.ones((4, 5, 6, 32))
  out = layers.channel_dropout(0.5, train=True).apply(
      {}, x, rngs={'dropout': _key(3)})
  per_channel = np.asarray(out)
  assert np.all(per_channel == per_channel[:, :1, :1, :])   # constant over h, w
  assert set(np.unique(per_channel)) == {0.0, 2.0}
  evaluated = layers.channel_dropout(0.5, train=False).apply({}, x)
  np.testing.assert_array_equal(evaluated, x)


def test_vgg_dropout_only_in_training():
  model = build.build_model(_tiny_vgg(dropout=0.5), 3)
  images = jax.random.normal(_key(1), (1, 17, 17, 3))
  variables = _init(model, images)
  first = _apply(model, variables, images, train=True,
                      rngs={'dropout': _key(1)})['features']
  second = _apply(model, variables, images, train=True,
                       rngs={'dropout': _key(2)})['features']
  assert not np.allclose(first, second)
  evaluated = _apply(model, variables, images, train=False)['features']
  np.testing.assert_array_equal(
      evaluated, _apply(model, variables, images, train=False)['features'])
  zero_maps = lambda f: np.all(np.asarray(f) == 0, axis=(1, 2))
  # fc7's Dropout2d zeroes about half of the 64 channels as whole maps,
  # including channels that are active without dropout.
  assert np.sum(zero_maps(first) & ~zero_maps(evaluated)) >= 8


@pytest.mark.parametrize('make_config', [_tiny_vgg, _tiny_resnet])
def test_bfloat16_compute_float32_params_and_logits(make_config):
  images = jax.random.normal(_key(1), (1, 33, 33, 3))
  model32 = build.build_model(make_config(), 3)
  model16 = build.build_model(make_config(), 3, dtype='bfloat16')
  variables = _init(model32, images)
  init16 = build.abstract_variables(model16, 33)
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(init16))
  out16 = _apply(model16, variables, images)
  out32 = _apply(model32, variables, images)
  assert out16['logits'].dtype == jnp.float32
  assert out16['features'].dtype == jnp.float32
  assert np.all(np.isfinite(out16['logits']))
  scale = float(jnp.abs(out32['logits']).max())
  np.testing.assert_allclose(out16['logits'], out32['logits'],
                             atol=0.05 * scale + 1e-6)
  if 'levels' in out16:
    assert out16['levels']['c5'].dtype == jnp.bfloat16


def test_aspp_variants():
  standard = build.build_model(_tiny_resnet(), 5)
  _, out = _abstract_apply(standard, 33)
  assert out['features'].shape[-1] == 256          # C5 at width 1/8
  variables = build.abstract_variables(standard, 33)
  assert _shapes(variables['params']['head']['c0']) == {
      'kernel': (3, 3, 256, 5), 'bias': (5,)}
  bana = build.build_model(_tiny_resnet(aspp_dim=16, head_bias=False), 5)
  variables, out = _abstract_apply(bana, 33)
  assert out['features'].shape == (2, 5, 5, 16)
  assert out['logits'].shape == (2, 5, 5, 5)
  assert _shapes(variables['params']['head']['c3']) == {
      'kernel': (3, 3, 256, 16)}
  linear = build.build_model(_tiny_resnet(head='linear'), 5)
  variables = build.abstract_variables(linear, 33)
  assert _shapes(variables['params']['head']) == {
      'classifier': {'kernel': (1, 1, 256, 5), 'bias': (5,)}}


def test_head_initialisation_is_deeplab_normal():
  config = defaults.largefov_model()
  config.width, config.fc_dim = 0.125, 512
  model = build.build_model(config, 40)
  variables = _init(model, jnp.zeros((1, 9, 9, 3)))
  head = variables['params']['head']['classifier']
  assert abs(float(head['kernel'].std()) - 0.01) < 0.001
  np.testing.assert_array_equal(head['bias'], 0)


@pytest.mark.parametrize('make_config', [_tiny_vgg, _tiny_resnet])
def test_tiny_forward_and_grad_are_finite(make_config):
  model = build.build_model(make_config(dropout=0.5), 4)
  images = jax.random.normal(_key(1), (2, 25, 25, 3))
  variables = _init(model, images)

  @jax.jit
  def loss_fn(params):
    out, _ = model.apply({**variables, 'params': params}, images, train=True,
                         rngs={'dropout': _key(5)},
                         mutable=['batch_stats'])
    return jnp.mean(jax.nn.log_softmax(out['logits'])[..., 1])

  loss, grads = jax.jit(jax.value_and_grad(loss_fn))(variables['params'])
  assert np.isfinite(float(loss))
  # One compiled program for all the norms, not one per parameter shape.
  norms = jax.tree.map(float, jax.jit(lambda tree: jax.tree.map(
      lambda g: jnp.abs(g).sum(), tree))(grads))
  assert all(np.isfinite(n) for n in jax.tree.leaves(norms))
  assert norms['head'] and sum(jax.tree.leaves(norms['head'])) > 0
  assert sum(jax.tree.leaves(norms['backbone'])) > 0


# --------------------------------------------------------------------------
# PSA's ResNet-38
# --------------------------------------------------------------------------
def _tiny_resnet38(**overrides):
  config = defaults.resnet38_model()
  config.width = 1 / 16
  for key, value in overrides.items():
    config[key] = value
  return config


def _random_variables(model, size, seed=0):
  """`model`'s variables without compiling its init: He-scaled kernels,
  BN vectors in their ranges (positive variances)."""
  rng = np.random.default_rng(seed)
  def fill(path, leaf):
    name = path[-1].key
    if name == 'kernel':
      std = np.sqrt(2 / np.prod(leaf.shape[:-1]))
      return rng.normal(0, std, leaf.shape).astype(np.float32)
    if name in ('scale', 'var'):
      return rng.uniform(0.5, 1.5, leaf.shape).astype(np.float32)
    return rng.normal(0, 0.1, leaf.shape).astype(np.float32)
  return jax.tree_util.tree_map_with_path(
      fill, build.abstract_variables(model, size))


def test_resnet38_output_stride_8_channels_and_parameter_count():
  config = defaults.resnet38_model()
  backbone = build.build_backbone(config)
  variables, out = _abstract_apply(backbone, 321)
  assert _shapes(out) == {
      'features': (2, 41, 41, 4096), 'conv4': (2, 41, 41, 512),
      'conv5': (2, 41, 41, 1024),
      'levels': {'c2': (2, 81, 81, 256), 'c3': (2, 41, 41, 512),
                 'c4': (2, 41, 41, 1024), 'c5': (2, 41, 41, 4096)}}
  # Hand count from the layer list (convs only, all bias-free; PyTorch
  # would add the 2 x 23,872 BN affine values, which frozen BN keeps in
  # batch_stats with the running statistics).
  assert build.param_count(variables['params']) == 105_023_168
  assert build.param_count(variables['batch_stats']) == 4 * 23_872
  _, out = _abstract_apply(build.build_model(config, 21), 321)
  assert out['logits'].shape == (2, 41, 41, 21)
  tiny = _tiny_resnet38()
  _, out = _abstract_apply(build.build_backbone(tiny), 33)
  assert out['features'].shape == (2, 5, 5, 256)
  assert (out['conv4'].shape[-1], out['conv5'].shape[-1]) == (32, 64)
  for size in (33, 97, 320, 513):
    _, out = _abstract_apply(build.build_backbone(tiny), size)
    assert out['features'].shape[1] == build.feature_size(tiny, size)


def test_resnet38_dilations_and_strides():
  model = build.build_backbone(_tiny_resnet38())
  images = jax.ShapeDtypeStruct((1, 33, 33, 3), jnp.float32)
  geometry = _conv_geometry(model, build.abstract_variables(model, 33),
                            images)
  # conv1a, 15 two-conv blocks, 2 bottlenecks of 3, 4 + 2 projections.
  assert len(geometry) == 1 + 15 * 2 + 2 * 3 + 6
  strided = sorted(k for k, v in geometry.items() if v[0] != (1, 1))
  assert strided == [f'b{i}/conv_branch{j}' for i in (2, 3, 4)
                     for j in ('1', '2a')]
  assert sorted(k for k in geometry if 'branch1' in k) == [
      f'b{i}/conv_branch1' for i in range(2, 8)]
  def dilation_and_padding(name):
    _, dilation, padding = geometry[name]
    return dilation[0], padding[0][0]
  assert dilation_and_padding('b4_5/conv_branch2b1') == (1, 1)
  assert dilation_and_padding('b5/conv_branch2a') == (1, 1)
  for name in ('b5/conv_branch2b1', 'b5_1/conv_branch2a',
               'b5_2/conv_branch2b1'):
    assert dilation_and_padding(name) == (2, 2)
  for block in ('b6', 'b7'):
    assert dilation_and_padding(f'{block}/conv_branch2b1') == (4, 4)
    assert geometry[f'{block}/conv_branch2a'][2] == ((0, 0), (0, 0))
    assert geometry[f'{block}/conv_branch2b2'][2] == ((0, 0), (0, 0))


def test_resnet38_dropout_only_in_training_frozen_bn_and_gradient():
  model = build.build_backbone(_tiny_resnet38())
  images = jax.random.normal(_key(1), (2, 33, 33, 3))
  variables = _random_variables(model, 33)
  # Frozen BN: nothing of a BN layer among the parameters.
  assert all(k.split('/')[-2].startswith('conv') and k.endswith('/kernel')
             for k in weights.flatten_variables(variables['params']))

  def loss_fn(params, key):
    out, updated = model.apply({**variables, 'params': params}, images,
                               train=True, rngs={'dropout': key},
                               mutable=['batch_stats'])
    return jnp.mean(out['features'] ** 2), (out, updated)

  # One compiled training pass serves the dropout, BN and gradient checks.
  train = jax.jit(jax.grad(loss_fn, has_aux=True))
  grads, (first, updated) = train(variables['params'], _key(2))
  _, (second, _) = train(variables['params'], _key(3))
  evaluated = _apply(model, variables, images, train=False)
  for key, value in weights.flatten_variables(updated['batch_stats']).items():
    np.testing.assert_array_equal(
        value, weights.flatten_variables(variables['batch_stats'])[key])
  norms = weights.flatten_variables(jax.device_get(jax.jit(
      lambda tree: jax.tree.map(lambda g: jnp.abs(g).sum(), tree))(grads)))
  assert all(np.isfinite(n) and n > 0 for n in norms.values()), norms
  # Dropout2d sits inside b6 and b7 only: conv4 (b5's input) and conv5
  # (b6's input) are those of inference, the features are not.  (The
  # gradient program orders float32 sums differently: 1e-4 of the scale.)
  for name in ('conv4', 'conv5'):
    scale = float(jnp.abs(evaluated[name]).max())
    np.testing.assert_allclose(first[name], evaluated[name],
                               atol=1e-3 * scale)
  assert not np.allclose(first['features'], second['features'])
  assert not np.allclose(first['features'], evaluated['features'])
  np.testing.assert_array_equal(
      evaluated['features'],
      _apply(model, variables, images, train=False)['features'])
  # Trained BN, the option: scale/bias become parameters.
  trained = build.abstract_variables(
      build.build_backbone(_tiny_resnet38(frozen_bn=False)), 33)
  assert _shapes(trained['params']['b6']['bn_branch2b2']) == {
      'scale': (64,), 'bias': (64,)}
  with pytest.raises(ValueError, match='output stride 8 only'):
    build.build_backbone(_tiny_resnet38(output_stride=16))

# --------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------
def test_bad_inputs_raise_clear_errors():
  model = build.build_model(_tiny_vgg(), 3)
  with pytest.raises(ValueError, match='already normalised'):
    model.init(_key(0), jnp.zeros((1, 9, 9, 3), jnp.uint8))
  with pytest.raises(ValueError, match=r'\(B, H, W, 3\)'):
    model.init(_key(0), jnp.zeros((1, 3, 9, 9)))
  with pytest.raises(ValueError, match='model.backbone'):
    build.build_model(_tiny_vgg(backbone='vgg19'), 3)
  with pytest.raises(ValueError, match='model.head'):
    build.build_model(_tiny_vgg(head='aspp_v3'), 3)
  with pytest.raises(ValueError, match='num_classes'):
    build.build_model(_tiny_vgg(), 0)
  with pytest.raises(ValueError, match='width'):
    build.build_model(_tiny_vgg(width=0.0), 3)
  with pytest.raises(ValueError, match='floating'):
    build.build_model(_tiny_vgg(), 3, dtype=jnp.int32)
  with pytest.raises(ValueError, match='output_stride'):
    build.abstract_variables(build.build_model(_tiny_resnet(output_stride=4),
                                               3), 33)


def test_vgg_batch_norm_option_normalises_every_conv():
  config = defaults.tiny_model()           # the benchmark backbone: BN on
  assert config.batch_norm
  config.update(width=0.0625, fc_dim=8)
  model = build.build_model(config, 3)
  variables = _init(model, jnp.zeros((2, 24, 24, 3)))
  bn_names = sorted(k for k in variables['params']['backbone']
                    if k.endswith('_bn'))
  assert len(bn_names) == 13 and bn_names[0] == 'conv1_1_bn'
  assert set(variables['batch_stats']['backbone']['conv1_1_bn']) == {'mean',
                                                                     'var'}
  images = jax.random.normal(jax.random.PRNGKey(1), (2, 24, 24, 3)) * 5 + 3
  _, updates = _apply(model, variables, images, train=True,
                      mutable=['batch_stats'])
  new_mean = updates['batch_stats']['backbone']['conv1_1_bn']['mean']
  # PyTorch momentum 0.1: running = 0.9 * 0 + 0.1 * batch mean (non-zero).
  assert float(jnp.abs(new_mean).max()) > 0
  # Without the option the network is the papers' LargeFOV: no BN at all.
  plain = defaults.largefov_model()
  plain.update(width=0.0625, fc_dim=8)
  plain_vars = build.abstract_variables(build.build_model(plain, 3), 24)
  assert not plain_vars.get('batch_stats')


def test_cosine_head_outputs_scaled_cosines_and_dot_head_products():
  from wsss_jax.models import heads  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  features = jnp.asarray(rng.normal(size=(1, 2, 3, 5)), jnp.float32)
  cosine = heads.CosineHead(num_classes=4, kind='cosine', temperature=20.0)
  variables = cosine.init(jax.random.PRNGKey(0), features)
  kernel = np.asarray(variables['params']['classifier']['kernel'])[0, 0]
  out = cosine.apply(variables, features)
  f = np.asarray(features)
  expected = (f / np.linalg.norm(f, axis=-1, keepdims=True)) @ (
      kernel / np.linalg.norm(kernel, axis=0, keepdims=True))
  np.testing.assert_allclose(out['cosines'], expected, atol=1e-5)
  np.testing.assert_allclose(out['logits'], 20.0 * expected, atol=1e-4)
  dot = heads.CosineHead(num_classes=4, kind='dot')
  out = dot.apply(variables, features)
  np.testing.assert_allclose(out['logits'], f @ kernel, atol=1e-5)
  np.testing.assert_allclose(out['cosines'], expected, atol=1e-5)
  with pytest.raises(ValueError, match='kind'):
    heads.CosineHead(num_classes=4, kind='other').init(
        jax.random.PRNGKey(0), features)
