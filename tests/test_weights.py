"""Tests for weight files (wsss_jax.models.weights) and the converter.

Fake PyTorch-named state dicts of numpy arrays (tiny widths) are converted,
loaded into freshly initialised models and run against a direct numpy
implementation of the PyTorch networks, so names, transposes, BN folding,
channel order and the model topology are all checked at once.
"""

from __future__ import annotations

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from wsss_jax import defaults
from wsss_jax.models import build
from wsss_jax.models import weights
from wsss_jax.tools import convert_weights as cw

EPS = 1e-5
VGG_NAMES = ('conv1_1', 'conv1_2', 'conv2_1', 'conv2_2', 'conv3_1', 'conv3_2',
             'conv3_3', 'conv4_1', 'conv4_2', 'conv4_3', 'conv5_1', 'conv5_2',
             'conv5_3')
VGG_INDICES = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)


# --------------------------------------------------------------------------
# A direct numpy implementation of the PyTorch layers (single image, HWC)
# --------------------------------------------------------------------------
def np_conv(x, weight, bias=None, stride=1, pad=0, dil=1):
  """PyTorch Conv2d: x (H, W, C), weight OIHW -> (H', W', O) (correlation)."""
  out_ch, _, kh, kw = weight.shape
  xp = np.pad(x, ((pad, pad), (pad, pad), (0, 0)))
  ho = (xp.shape[0] - dil * (kh - 1) - 1) // stride + 1
  wo = (xp.shape[1] - dil * (kw - 1) - 1) // stride + 1
  out = np.zeros((ho, wo, out_ch))
  for i in range(kh):
    for j in range(kw):
      patch = xp[i * dil:i * dil + stride * (ho - 1) + 1:stride,
                 j * dil:j * dil + stride * (wo - 1) + 1:stride]
      out += patch @ weight[:, :, i, j].T.astype(np.float64)
  return out if bias is None else out + bias


def np_max_pool(x, k, s, p, ceil=False):
  """PyTorch MaxPool2d (square), -inf padding, PyTorch's ceil-mode rule."""
  n = x.shape[0]
  span = n + 2 * p - k
  out = (-(-span // s) if ceil else span // s) + 1
  if ceil and (out - 1) * s >= n + p:
    out -= 1
  right = max((out - 1) * s + k - n - p, 0)
  xp = np.pad(x, ((p, right), (p, right), (0, 0)), constant_values=-np.inf)
  windows = [xp[i:i + s * (out - 1) + 1:s, j:j + s * (out - 1) + 1:s]
             for i in range(k) for j in range(k)]
  return np.max(windows, axis=0)


def np_avg_pool(x, k, s, p):
  """PyTorch AvgPool2d with count_include_pad=True."""
  xp = np.pad(x, ((p, p), (p, p), (0, 0)))
  out = (xp.shape[0] - k) // s + 1
  return sum(xp[i:i + s * (out - 1) + 1:s, j:j + s * (out - 1) + 1:s]
             for i in range(k) for j in range(k)) / (k * k)


def np_bn(x, bn):
  return ((x - bn['running_mean']) / np.sqrt(bn['running_var'] + EPS)
          * bn['weight'] + bn['bias'])


relu = functools.partial(np.maximum, 0.0)


# --------------------------------------------------------------------------
# Fake networks: neutral parameter dicts, PyTorch names, numpy forward passes
# --------------------------------------------------------------------------
def _conv_params(rng, out_ch, in_ch, k, bias=True):
  params = {'weight': rng.normal(0, np.sqrt(2 / (in_ch * k * k)),
                                 (out_ch, in_ch, k, k)).astype(np.float32)}
  if bias:
    params['bias'] = rng.normal(0, 0.1, out_ch).astype(np.float32)
  return params


def _bn_params(rng, ch):
  return {'weight': rng.uniform(0.5, 1.5, ch).astype(np.float32),
          'bias': rng.normal(0, 0.1, ch).astype(np.float32),
          'running_mean': rng.normal(0, 0.1, ch).astype(np.float32),
          'running_var': rng.uniform(0.5, 1.5, ch).astype(np.float32)}


def fake_vgg(rng, width_div=8, fc_dim=16, classes=3):
  channels = [64 // width_div] * 2 + [128 // width_div] * 2 + [
      256 // width_div] * 3 + [512 // width_div] * 6
  net, in_ch = {}, 3
  for name, out_ch in zip(VGG_NAMES, channels):
    net[name], in_ch = _conv_params(rng, out_ch, in_ch, 3), out_ch
  net['fc6'] = _conv_params(rng, fc_dim, in_ch, 3)
  net['fc7'] = _conv_params(rng, fc_dim, fc_dim, 1)
  net['fc8'] = _conv_params(rng, classes, fc_dim, 1)
  net['fc8']['weight'] *= 0.3
  return net


def vgg_forward(net, x, fc6_dilation):
  """DeepLab-LargeFOV in numpy (bana.md 5.3 / lpg.md 4.5), x BGR (H, W, 3)."""
  h = x.astype(np.float64)
  for block in range(1, 6):
    dil = 2 if block == 5 else 1
    for name in [n for n in VGG_NAMES if n.startswith(f'conv{block}_')]:
      h = relu(np_conv(h, net[name]['weight'], net[name]['bias'], pad=dil,
                       dil=dil))
    h = np_max_pool(h, 3, 2 if block <= 3 else 1, 1)
  h = np_avg_pool(h, 3, 1, 1)
  h = relu(np_conv(h, net['fc6']['weight'], net['fc6']['bias'],
                   pad=fc6_dilation, dil=fc6_dilation))
  h = relu(np_conv(h, net['fc7']['weight'], net['fc7']['bias']))
  return np_conv(h, net['fc8']['weight'], net['fc8']['bias'])


def _flat_torch(prefix, params):
  return {f'{prefix}.{leaf}': value for leaf, value in params.items()}


def deeplab_vgg_names(net):
  state = {}
  for name, params in net.items():
    state.update(_flat_torch('fc8_voc12' if name == 'fc8' else name, params))
  return state


def lpg_vgg_names(net):
  index = dict(zip(VGG_NAMES, VGG_INDICES), fc6=32, fc7=35, fc8=38)
  state = {}
  for name, params in net.items():
    state.update(_flat_torch(f'module.features.{index[name]}', params))
  return state


def fake_resnet(rng, blocks=(1, 2, 1, 1), width_div=8, classes=3):
  stem, stages = 64 // width_div, [c // width_div for c in (256, 512, 1024,
                                                             2048)]
  net = {'stem/conv': _conv_params(rng, stem, 3, 7, bias=False),
         'stem/bn': _bn_params(rng, stem)}
  in_ch = stem
  for layer, (count, out_ch) in enumerate(zip(blocks, stages)):
    mid = out_ch // 4
    for block in range(count):
      prefix = f'{layer}/{block}'
      net[f'{prefix}/conv1'] = _conv_params(rng, mid, in_ch, 1, bias=False)
      net[f'{prefix}/conv2'] = _conv_params(rng, mid, mid, 3, bias=False)
      net[f'{prefix}/conv3'] = _conv_params(rng, out_ch, mid, 1, bias=False)
      for k in (1, 2, 3):
        net[f'{prefix}/bn{k}'] = _bn_params(rng, (mid, mid, out_ch)[k - 1])
      if block == 0:
        net[f'{prefix}/shortcut_conv'] = _conv_params(rng, out_ch, in_ch, 1,
                                                      bias=False)
        net[f'{prefix}/shortcut_bn'] = _bn_params(rng, out_ch)
      in_ch = out_ch
  for branch in range(4):
    net[f'aspp/{branch}'] = _conv_params(rng, classes, in_ch, 3)
  return net


def resnet_forward(net, x, blocks, msra):
  """Dilated ResNet (OS 8) + summed V2 ASPP in numpy; returns (C5, logits)."""
  def unit(h, prefix, stride=1, pad=0, dil=1):
    conv, bn = prefix.replace('bn', 'conv'), prefix
    return np_bn(np_conv(h, net[conv]['weight'], stride=stride, pad=pad,
                         dil=dil), net[bn])
  h = relu(np_bn(np_conv(x.astype(np.float64), net['stem/conv']['weight'],
                         stride=2, pad=3), net['stem/bn']))
  h = np_max_pool(h, 3, 2, 1, ceil=msra)
  for layer, count in enumerate(blocks):
    stride, dil = (1, 2, 1, 1)[layer], (1, 1, 2, 4)[layer]
    for block in range(count):
      p, s = f'{layer}/{block}', stride if block == 0 else 1
      s1, s3 = (s, 1) if msra else (1, s)
      y = relu(unit(h, f'{p}/bn1', stride=s1))
      y = relu(unit(y, f'{p}/bn2', stride=s3, pad=dil, dil=dil))
      y = unit(y, f'{p}/bn3')
      shortcut = unit(h, f'{p}/shortcut_bn', stride=s) if block == 0 else h
      h = relu(y + shortcut)
  logits = sum(np_conv(h, net[f'aspp/{i}']['weight'], net[f'aspp/{i}']['bias'],
                       pad=r, dil=r) for i, r in enumerate((6, 12, 18, 24)))
  return h, logits


_MSRA = {'conv1': 'reduce', 'conv2': 'conv3x3', 'conv3': 'increase',
         'shortcut_conv': 'shortcut'}


def deeplab_resnet_names(net, caffe_factor=None):
  state = {}
  for name, params in net.items():
    parts = name.split('/')
    if parts[0] == 'stem':
      prefix = f'layer1.conv1.{parts[1]}'
    elif parts[0] == 'aspp':
      prefix = f'aspp.c{parts[1]}'
    else:
      layer, block, op = int(parts[0]), int(parts[1]), parts[2]
      branch = _MSRA[op.replace('bn', 'conv')]
      kind = 'bn' if 'bn' in op else 'conv'
      prefix = f'layer{layer + 2}.block{block + 1}.{branch}.{kind}'
    params = dict(params)
    if caffe_factor is not None and 'running_mean' in params:
      params['running_mean'] = params['running_mean'] * caffe_factor
      params['running_var'] = params['running_var'] * caffe_factor
      params['scale_factor'] = np.array([caffe_factor], np.float32)
    elif 'running_mean' in params:
      params['num_batches_tracked'] = np.array(11, np.int64)
    state.update(_flat_torch(f'base.{prefix}', params))
  return state


def torchvision_resnet_names(net, rng):
  state = {'fc.weight': rng.normal(size=(10, 2048 // 8)).astype(np.float32),
           'fc.bias': np.zeros(10, np.float32)}
  for name, params in net.items():
    parts = name.split('/')
    if parts[0] == 'stem':
      prefix = 'conv1' if parts[1] == 'conv' else 'bn1'
    elif parts[0] == 'aspp':
      continue
    else:
      layer, block, op = int(parts[0]), int(parts[1]), parts[2]
      op = {'shortcut_conv': 'downsample.0', 'shortcut_bn': 'downsample.1'}.get(
          op, op)
      prefix = f'layer{layer + 1}.{block}.{op}'
    state.update(_flat_torch(prefix, params))
  return state


# --------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------
def _key(seed):
  return jax.random.key(seed, impl='unsafe_rbg')   # fast to compile on CPU


def _vgg_config(fc6_dilation=2):
  config = defaults.largefov_model(fc6_dilation)
  config.width, config.fc_dim, config.dropout = 0.125, 16, 0.0
  return config


def _resnet_config(blocks=(1, 2, 1, 1), msra=True, frozen_bn=True):
  config = defaults.resnet101_model()
  config.width, config.resnet_blocks, config.frozen_bn = 0.125, blocks, frozen_bn
  config.resnet_stride_in_1x1 = config.resnet_stem_ceil_mode = msra
  return config


def _init(model, size):
  return jax.jit(model.init)(_key(0), jnp.zeros((1, size, size, 3)))


def _run(model, variables, images):
  with jax.default_matmul_precision('highest'):
    return jax.jit(model.apply)(variables, images)


def _write_source(tmp_path, state, name='source.npz'):
  path = tmp_path / name
  np.savez(path, **state)
  return str(path)


def _convert(tmp_path, state, layout, *extra):
  out = str(tmp_path / f'{layout}.npz')
  assert cw.main([f'--input={_write_source(tmp_path, state)}',
                  f'--layout={layout}', f'--output={out}', *extra]) == 0
  return out


# --------------------------------------------------------------------------
# Round trips against the numpy networks
# --------------------------------------------------------------------------
def test_deeplab_vgg16_round_trip_matches_numpy_network(tmp_path):
  rng = np.random.default_rng(0)
  net = fake_vgg(rng)
  path = _convert(tmp_path, deeplab_vgg_names(net), 'deeplab_vgg16')
  model = build.build_model(_vgg_config(fc6_dilation=2), 3)
  variables, report = weights.load_weights(_init(model, 19), path)
  assert report['loaded'] == 32 and report['missing'] == []
  # OIHW -> HWIO; the input-channel order is kept (caffe BGR in, BGR fed).
  kernel = variables['params']['backbone']['conv1_2']['kernel']
  np.testing.assert_array_equal(kernel[1, 2, 5, 7],
                                net['conv1_2']['weight'][7, 5, 1, 2])
  np.testing.assert_array_equal(
      variables['params']['backbone']['conv1_1']['kernel'][0, 1, 0, 3],
      net['conv1_1']['weight'][3, 0, 0, 1])
  bgr = rng.normal(size=(1, 19, 19, 3)).astype(np.float32)
  logits = _run(model, variables, bgr)['logits'][0]
  expected = vgg_forward(net, bgr[0], fc6_dilation=2)
  assert logits.shape == expected.shape == (3, 3, 3)
  np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4)


def test_single_conv_matches_direct_correlation(tmp_path):
  rng = np.random.default_rng(1)
  net = fake_vgg(rng)
  path = _convert(tmp_path, deeplab_vgg_names(net), 'deeplab_vgg16')
  kernel = weights.read_weights(path)['params/backbone/conv2_1/kernel']
  bias = weights.read_weights(path)['params/backbone/conv2_1/bias']
  x = rng.normal(size=(1, 6, 5, 8)).astype(np.float32)
  with jax.default_matmul_precision('highest'):
    out = jax.lax.conv_general_dilated(
        x, kernel, (1, 1), ((1, 1), (1, 1)),
        dimension_numbers=('NHWC', 'HWIO', 'NHWC')) + bias
  w = net['conv2_1']['weight']
  xp = np.pad(x[0], ((1, 1), (1, 1), (0, 0)))
  for y, xx, o in [(0, 0, 0), (3, 2, 5), (5, 4, 15)]:
    direct = np.sum(xp[y:y + 3, xx:xx + 3, :].transpose(2, 0, 1) * w[o]) + (
        net['conv2_1']['bias'][o])
    np.testing.assert_allclose(out[0, y, xx, o], direct, rtol=1e-5, atol=1e-5)


def test_lpg_vgg16_sequential_indices(tmp_path):
  rng = np.random.default_rng(2)
  net = fake_vgg(rng, classes=5)
  state = lpg_vgg_names(net)
  flat, report = cw.convert_state_dict(state, 'lpg_vgg16')
  assert report['stripped_prefix'] == 'module.'
  assert not report['first_conv_flipped'] and report['unused'] == []
  np.testing.assert_array_equal(flat['params/head/classifier/kernel'][0, 0],
                                net['fc8']['weight'][:, :, 0, 0].T)
  np.testing.assert_array_equal(flat['params/backbone/fc6/bias'],
                                net['fc6']['bias'])
  np.testing.assert_array_equal(flat['params/backbone/conv4_3/kernel'],
                                net['conv4_3']['weight'].transpose(2, 3, 1, 0))
  # --flip-first-conv: the converted model takes RGB for the BGR-trained net.
  path = _convert(tmp_path, state, 'lpg_vgg16', '--flip-first-conv')
  model = build.build_model(_vgg_config(fc6_dilation=1), 5)
  variables, _ = weights.load_weights(_init(model, 17), path)
  rgb = rng.normal(size=(1, 17, 17, 3)).astype(np.float32)
  np.testing.assert_allclose(_run(model, variables, rgb)['logits'][0],
                             vgg_forward(net, rgb[0, :, :, ::-1], 1),
                             rtol=1e-4, atol=1e-4)


def test_torchvision_vgg16_reports_unused_classifier_and_missing_fc(tmp_path):
  rng = np.random.default_rng(3)
  net = fake_vgg(rng)
  state = {}
  for name, index in zip(VGG_NAMES, VGG_INDICES):
    state.update(_flat_torch(f'features.{index}', net[name]))
  state['classifier.0.weight'] = rng.normal(size=(32, 64 * 49)).astype(
      np.float32)
  state['classifier.6.bias'] = np.zeros(10, np.float32)
  report = cw.convert_file(_write_source(tmp_path, state), 'torchvision_vgg16',
                           str(tmp_path / 'tv.npz'))
  assert sorted(k for k, _ in report['unused']) == ['classifier.0.weight',
                                                    'classifier.6.bias']
  assert not report['first_conv_flipped']
  assert 'params/backbone/fc6/kernel' in report['not_produced']
  assert report['inferred_model']['width'] == 0.125
  model = build.build_model(_vgg_config(), 3)
  init = _init(model, 17)
  with pytest.raises(weights.WeightsError, match='fc6'):
    weights.load_weights(init, str(tmp_path / 'tv.npz'))
  variables, loaded = weights.load_weights(
      init, str(tmp_path / 'tv.npz'),
      allow_missing=('backbone/fc[67]/.*', 'head/.*'))
  assert loaded['loaded'] == 26
  np.testing.assert_array_equal(variables['params']['backbone']['conv1_1'][
      'kernel'][0, 1, 0, 3], net['conv1_1']['weight'][3, 0, 0, 1])
  np.testing.assert_array_equal(variables['params']['backbone']['fc6']['kernel'],
                                init['params']['backbone']['fc6']['kernel'])


def test_deeplab_resnet101_caffe_bn_round_trip(tmp_path):
  rng = np.random.default_rng(4)
  blocks = (1, 2, 1, 1)
  net = fake_resnet(rng, blocks)
  state = deeplab_resnet_names(net, caffe_factor=7.0)
  path = _convert(tmp_path, state, 'deeplab_resnet101', '--caffe-bn')
  model = build.build_model(_resnet_config(blocks), 3)
  variables, report = weights.load_weights(_init(model, 32), path)
  assert report['missing'] == [] and report['relocated'] == []
  stats = variables['batch_stats']['backbone']['layer2']['block2']['bn2']
  np.testing.assert_allclose(stats['var'], net['1/1/bn2']['running_var'],
                             rtol=1e-6)
  np.testing.assert_array_equal(stats['scale'], net['1/1/bn2']['weight'])
  # 32 -> 16 after the stem conv: the ceil-mode pool gives 9, floor would 8.
  images = rng.normal(size=(1, 32, 32, 3)).astype(np.float32)
  out = _run(model, variables, images)
  assert out['logits'].shape == (1, 5, 5, 3)
  c5, logits = resnet_forward(net, images[0], blocks, msra=True)
  np.testing.assert_allclose(out['features'][0], c5, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(out['logits'][0], logits, rtol=1e-4, atol=1e-4)


def test_torchvision_resnet101_round_trip_and_layout_inference(tmp_path):
  rng = np.random.default_rng(5)
  blocks = (2, 1, 1, 1)
  net = fake_resnet(rng, blocks)
  state = torchvision_resnet_names(net, rng)
  report = cw.convert_file(_write_source(tmp_path, state),
                           'torchvision_resnet101', str(tmp_path / 'tv.npz'))
  inferred = report['inferred_model']
  assert inferred['resnet_blocks'] == [2, 1, 1, 1]
  assert not inferred['resnet_stride_in_1x1']
  assert not inferred['resnet_stem_ceil_mode']
  assert sorted(k for k, _ in report['unused']) == ['fc.bias', 'fc.weight']
  assert report['not_produced'] == [f'params/head/c{i}/{leaf}'
                                    for i in range(4)
                                    for leaf in ('bias', 'kernel')]
  model = build.build_model(_resnet_config(blocks, msra=False), 3)
  variables, _ = weights.load_weights(_init(model, 32), str(tmp_path / 'tv.npz'),
                                      allow_missing=('head/.*',))
  images = rng.normal(size=(1, 32, 32, 3)).astype(np.float32)
  c5, _ = resnet_forward(net, images[0], blocks, msra=False)
  features = _run(model, variables, images)['features'][0]
  assert features.shape == c5.shape == (4, 4, 256)
  np.testing.assert_allclose(features, c5, rtol=1e-4, atol=1e-4)


def test_frozen_file_loads_into_trained_bn_by_relocation(tmp_path):
  net = fake_resnet(np.random.default_rng(6), (1, 1, 1, 1))
  path = _convert(tmp_path, deeplab_resnet_names(net), 'deeplab_resnet101')
  model = build.build_model(_resnet_config((1, 1, 1, 1), frozen_bn=False), 3)
  variables, report = weights.load_weights(_init(model, 17), path)
  assert ('batch_stats/backbone/bn1/scale',
          'params/backbone/bn1/scale') in report['relocated']
  np.testing.assert_array_equal(variables['params']['backbone']['bn1']['scale'],
                                net['stem/bn']['weight'])
  trainable = str(tmp_path / 'trainable.npz')
  assert cw.main([f'--input={_write_source(tmp_path, deeplab_resnet_names(net))}',
                  '--layout=deeplab_resnet101', f'--output={trainable}',
                  '--bn=trainable']) == 0
  assert 'params/backbone/bn1/scale' in weights.read_weights(trainable)
  _, report = weights.load_weights(_init(model, 17), trainable)
  assert report['relocated'] == []


# --------------------------------------------------------------------------
# Strictness of load_weights
# --------------------------------------------------------------------------
@pytest.fixture(name='tiny_vgg')
def _tiny_vgg_fixture(tmp_path):
  model = build.build_model(_vgg_config(), 3)
  variables = _init(model, 9)
  path = str(tmp_path / 'good.npz')
  weights.save_weights(path, weights.flatten_variables(variables))
  return model, variables, path


def _edited(tmp_path, path, **changes):
  flat = dict(weights.read_weights(path))
  for key, value in changes.items():
    key = key.replace('__', '/')
    if value is None:
      del flat[key]
    else:
      flat[key] = value
  out = str(tmp_path / 'edited.npz')
  weights.save_weights(out, flat)
  return out


def test_load_weights_round_trip_and_sha256(tiny_vgg):
  _, variables, path = tiny_vgg
  loaded, report = weights.load_weights(variables, path)
  assert report['loaded'] == len(weights.flatten_variables(variables))
  assert report['sha256'] == weights.file_sha256(path) and len(
      report['sha256']) == 64
  for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(variables)):
    np.testing.assert_array_equal(a, b)


def test_load_weights_rejects_shape_mismatch(tiny_vgg, tmp_path):
  _, variables, path = tiny_vgg
  bad = _edited(tmp_path, path, params__head__classifier__kernel=np.zeros(
      (1, 1, 16, 5), np.float32))
  with pytest.raises(weights.WeightsError,
                     match=r'shape mismatches[\s\S]*head/classifier/kernel'):
    weights.load_weights(variables, bad)
  # dont_load keeps the initial head (the class-count-change case).
  kept, report = weights.load_weights(variables, bad, dont_load=('head/.*',))
  assert 'params/head/classifier/kernel' in report['skipped']
  np.testing.assert_array_equal(kept['params']['head']['classifier']['kernel'],
                                variables['params']['head']['classifier'][
                                    'kernel'])


def test_load_weights_rejects_unexpected_missing_and_nan(tiny_vgg, tmp_path):
  _, variables, path = tiny_vgg
  extra = _edited(tmp_path, path, params__backbone__fc8__kernel=np.zeros(3))
  with pytest.raises(weights.WeightsError, match='no model leaf[\\s\\S]*fc8'):
    weights.load_weights(variables, extra)
  missing = _edited(tmp_path, path, params__backbone__conv3_2__bias=None)
  with pytest.raises(weights.WeightsError, match='missing[\\s\\S]*conv3_2/bias'):
    weights.load_weights(variables, missing)
  _, report = weights.load_weights(variables, missing,
                                   allow_missing=(r'backbone/conv3_2/bias',))
  assert report['missing'] == ['params/backbone/conv3_2/bias']
  nan = np.full((16,), np.nan, np.float32)
  bad = _edited(tmp_path, path, params__backbone__fc7__bias=nan)
  with pytest.raises(weights.WeightsError, match='NaN'):
    weights.load_weights(variables, bad)


def test_load_weights_bad_files(tiny_vgg, tmp_path):
  _, variables, _ = tiny_vgg
  with pytest.raises(weights.WeightsError, match='does not exist'):
    weights.load_weights(variables, str(tmp_path / 'absent.npz'))
  junk = tmp_path / 'junk.npz'
  junk.write_bytes(b'not a zip')
  with pytest.raises(weights.WeightsError, match='convert_weights'):
    weights.load_weights(variables, str(junk))
  with pytest.raises(weights.WeightsError, match='bad weight-key pattern'):
    weights.load_weights(variables, str(junk), dont_load=('head/(',))


def test_flatten_unflatten_inverse():
  tree = {'params': {'a': {'b': np.ones(2)}, 'c': np.zeros(1)},
          'batch_stats': {'a': {'mean': np.ones(3)}}}
  flat = weights.flatten_variables(tree)
  assert list(flat) == ['batch_stats/a/mean', 'params/a/b', 'params/c']
  assert jax.tree.structure(weights.unflatten_variables(flat)) == (
      jax.tree.structure(tree))


# --------------------------------------------------------------------------
# Converter errors and CLI
# --------------------------------------------------------------------------
def test_converter_rejects_keys_outside_the_layout():
  state = deeplab_vgg_names(fake_vgg(np.random.default_rng(7)))
  with pytest.raises(cw.ConversionError, match='wrong --layout'):
    cw.convert_state_dict(state, 'torchvision_vgg16')
  state['conv6_1.weight'] = np.zeros((1, 1, 1, 1), np.float32)
  with pytest.raises(cw.ConversionError, match='conv6_1.weight'):
    cw.convert_state_dict(state, 'deeplab_vgg16')
  _, report = cw.convert_state_dict(state, 'deeplab_vgg16',
                                    allow_unrecognised=True)
  assert ('conv6_1.weight', 'unrecognised') in report['unused']
  state['fc8.weight'] = state['fc8_voc12.weight']    # two fc8 variants
  with pytest.raises(cw.ConversionError, match='both map to'):
    cw.convert_state_dict(state, 'deeplab_vgg16', allow_unrecognised=True)


def test_converter_caffe_bn_errors():
  net = fake_resnet(np.random.default_rng(8), (1, 1, 1, 1))
  with pytest.raises(cw.ConversionError, match='--caffe-bn'):
    cw.convert_state_dict(deeplab_resnet_names(net, caffe_factor=3.0),
                          'deeplab_resnet101')
  with pytest.raises(cw.ConversionError, match='no scale_factor'):
    cw.convert_state_dict(deeplab_resnet_names(net), 'deeplab_resnet101',
                          caffe_bn=True)


def test_converter_shape_check_against_model(tmp_path):
  state = deeplab_vgg_names(fake_vgg(np.random.default_rng(9)))
  state['conv3_2.weight'] = state['conv3_2.weight'][:, :8]   # wrong in-channels
  with pytest.raises(cw.ConversionError, match='conv3_2/kernel'):
    cw.convert_file(_write_source(tmp_path, state), 'deeplab_vgg16',
                    str(tmp_path / 'out.npz'))
  state['conv3_2.weight'] = np.zeros((32, 32, 3), np.float32)
  with pytest.raises(cw.ConversionError, match='4-D'):
    cw.convert_state_dict(state, 'deeplab_vgg16')


def test_cli_report_and_failure(tmp_path, capsys):
  state = deeplab_vgg_names(fake_vgg(np.random.default_rng(10)))
  source = _write_source(tmp_path, state)
  out = str(tmp_path / 'out.npz')
  assert cw.main([f'--input={source}', '--layout=deeplab_vgg16',
                  f'--output={out}', '--report']) == 0
  printed = capsys.readouterr().out
  report = json.loads(printed[printed.index('{'):])
  assert report['sha256'] == weights.file_sha256(out)
  assert report['converted'] == 32 and not report['first_conv_flipped']
  assert report['inferred_model']['fc_dim'] == 16
  assert cw.main([f'--input={tmp_path / "absent.pth"}',
                  '--layout=deeplab_vgg16', f'--output={out}']) == 1
  assert 'does not exist' in capsys.readouterr().err


def test_torch_state_dict_round_trip(tmp_path):
  torch = pytest.importorskip('torch')
  rng = np.random.default_rng(11)
  net = fake_vgg(rng)
  state = {k: torch.from_numpy(v) for k, v in lpg_vgg_names(net).items()}
  path = str(tmp_path / 'lpg.pth')
  torch.save(state, path)
  converted = str(tmp_path / 'lpg.npz')
  assert cw.main([f'--input={path}', '--layout=lpg_vgg16',
                  f'--output={converted}']) == 0
  layers_ = []
  in_ch = 3
  for block in range(1, 6):
    dil = 2 if block == 5 else 1
    for name in [n for n in VGG_NAMES if n.startswith(f'conv{block}_')]:
      out_ch = net[name]['weight'].shape[0]
      layers_ += [torch.nn.Conv2d(in_ch, out_ch, 3, padding=dil, dilation=dil),
                  torch.nn.ReLU()]
      in_ch = out_ch
    layers_.append(torch.nn.MaxPool2d(3, 2 if block <= 3 else 1, 1))
  layers_ += [torch.nn.AvgPool2d(3, 1, 1),
              torch.nn.Conv2d(in_ch, 16, 3, padding=12, dilation=12),
              torch.nn.ReLU(), torch.nn.Dropout2d(0.5),
              torch.nn.Conv2d(16, 16, 1), torch.nn.ReLU(),
              torch.nn.Dropout2d(0.5), torch.nn.Conv2d(16, 3, 1)]
  reference = torch.nn.Sequential(*layers_)
  reference.load_state_dict({k[len('module.features.'):]: v
                             for k, v in state.items()})
  reference.eval()
  images = rng.normal(size=(1, 21, 21, 3)).astype(np.float32)
  with torch.no_grad():
    expected = reference(torch.from_numpy(np.ascontiguousarray(
        images.transpose(0, 3, 1, 2)))).numpy().transpose(0, 2, 3, 1)
  model = build.build_model(_vgg_config(fc6_dilation=12), 3)
  variables, _ = weights.load_weights(_init(model, 21), converted)
  np.testing.assert_allclose(_run(model, variables, images)['logits'], expected,
                             rtol=1e-4, atol=1e-4)
