"""The weight converter: PyTorch layouts -> our .npz, checked against numpy
implementations of the PyTorch networks (names, transposes, BN folding,
channel order and topology at once)."""

from __future__ import annotations

import json
import re

import jax
import numpy as np
import pytest

from wsss_jax.models import build
from wsss_jax.models import hourglass
from wsss_jax.models import weights
from wsss_jax.tools import convert_weights as cw

from wsss_jax import defaults
from wsss_jax.methods.rrm import model as rrm_model

from torch_reference import (
    VGG_NAMES, VGG_INDICES, fake_vgg, vgg_forward, deeplab_vgg_names, lpg_vgg_names, fake_resnet, resnet_forward, deeplab_resnet_names, torchvision_resnet_names, fake_psa_resnet38, psa_resnet38_forward, _vgg_config, _resnet_config, _init, _template, _run, _write_source, _convert, _flat_torch)
from torch_reference import (  # LPG's hourglass, below
    np_conv, np_bn, relu, _conv_params, _bn_params)


# --------------------------------------------------------------------------
# Round trips against the numpy networks
# --------------------------------------------------------------------------
def test_deeplab_vgg16_round_trip_matches_numpy_network(tmp_path):
  rng = np.random.default_rng(0)
  net = fake_vgg(rng)
  path = _convert(tmp_path, deeplab_vgg_names(net), 'deeplab_vgg16')
  model = build.build_model(_vgg_config(fc6_dilation=2), 3)
  variables, report = weights.load_weights(_template(model, 19), path)
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
  # --flip_first_conv: the converted model takes RGB for the BGR-trained net.
  path = _convert(tmp_path, state, 'lpg_vgg16', '--flip_first_conv')
  model = build.build_model(_vgg_config(fc6_dilation=1), 5)
  variables, _ = weights.load_weights(_template(model, 17), path)
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
  init = _template(model, 17)
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
  path = _convert(tmp_path, state, 'deeplab_resnet101', '--caffe_bn')
  model = build.build_model(_resnet_config(blocks), 3)
  variables, report = weights.load_weights(_template(model, 32), path)
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
  variables, _ = weights.load_weights(_template(model, 32),
                                      str(tmp_path / 'tv.npz'),
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
  variables, report = weights.load_weights(_template(model, 17), path)
  assert ('batch_stats/backbone/bn1/scale',
          'params/backbone/bn1/scale') in report['relocated']
  np.testing.assert_array_equal(variables['params']['backbone']['bn1']['scale'],
                                net['stem/bn']['weight'])
  trainable = str(tmp_path / 'trainable.npz')
  assert cw.main([f'--input={_write_source(tmp_path, deeplab_resnet_names(net))}',
                  '--layout=deeplab_resnet101', f'--output={trainable}',
                  '--bn=trainable']) == 0
  assert 'params/backbone/bn1/scale' in weights.read_weights(trainable)
  _, report = weights.load_weights(_template(model, 17), trainable)
  assert report['relocated'] == []



def _psa_rrm_net(num_classes=21, seg_channels=8, seg_dilation=2):
  """RRM's network on a 1/16-width ResNet-38 (dilation 2: the 12 of RRM
  would read only padding on a 6x6 map)."""
  config = defaults.resnet38_model()
  config.width = 1 / 16
  return rrm_model.RRMNet(backbone=build.build_backbone(config),
                          num_classes=num_classes, seg_channels=seg_channels,
                          seg_dilation=seg_dilation, cam_scales=())


def _psa_target(key):
  """The converted key of a PSA/RRM PyTorch key and how its array changes."""
  module, _, leaf = key[len('module.'):].rpartition('.')
  module = {'fc8': 'classifier', 'fc8_seg_conv1': 'head.conv1',
            'fc8_seg_conv2': 'head.conv2'}.get(module, f'backbone.{module}')
  path = module.replace('.', '/')
  if leaf == 'weight' and '/bn' not in path:
    return f'params/{path}/kernel', lambda w: w.transpose(2, 3, 1, 0)
  name = {'weight': 'scale', 'running_mean': 'mean',
          'running_var': 'var'}.get(leaf, leaf)
  collection = 'params' if name == 'bias' and '/bn' not in path else (
      'batch_stats')
  return f'{collection}/{path}/{name}', lambda v: v


def test_psa_resnet38_round_trip_matches_numpy_network(tmp_path):
  rng = np.random.default_rng(12)
  state = fake_psa_resnet38(rng)
  report = cw.convert_file(_write_source(tmp_path, state), 'psa_resnet38',
                           str(tmp_path / 'rrm.npz'))
  assert report['stripped_prefix'] == 'module.'
  assert report['inferred_model']['width'] == 1 / 16
  assert report['inferred_model']['num_classes'] == 21
  assert report['not_produced'] == []
  counters = sorted(k for k in state if k.endswith('num_batches_tracked'))
  assert sorted('module.' + k for k, _ in report['unused']) == counters
  model = _psa_rrm_net()
  variables, loaded = weights.load_weights(_template(model, 41),
                                           str(tmp_path / 'rrm.npz'))
  # Every source array landed once, where it belongs, transposed; nothing
  # is left over on either side.
  assert loaded['missing'] == [] and loaded['relocated'] == []
  assert loaded['loaded'] == len(state) - len(counters) == report['converted']
  flat = weights.flatten_variables(variables)
  for key in sorted(set(state) - set(counters)):
    target, convert = _psa_target(key)
    np.testing.assert_array_equal(flat[target], convert(state[key]),
                                  err_msg=key)
  # The whole network against numpy: strides, dilations, pre-activation
  # order, the raw-input identity shortcut and RRM's two branches.
  images = rng.normal(size=(1, 41, 41, 3)).astype(np.float32)
  with jax.default_matmul_precision('highest'):
    ours, captured = jax.jit(lambda v, x: model.apply(
        v, x, capture_intermediates=lambda m, _: m.name == 'backbone',
        mutable=['intermediates']))(variables, images)
  backbone, = captured['intermediates']['backbone']['__call__']
  expected = psa_resnet38_forward(state, images[0], seg_dilation=2)
  assert backbone['features'].shape == (1, 6, 6, 256)
  for name, value in (('conv4', backbone['conv4']),
                      ('conv5', backbone['conv5']),
                      ('conv6', backbone['features']), ('cam', ours['cam']),
                      ('seg', ours['logits'])):
    scale = np.max(np.abs(expected[name]))
    np.testing.assert_allclose(value[0] / scale, expected[name] / scale,
                               atol=1e-5, err_msg=name)


def test_psa_resnet38_backbone_only_file_and_errors(tmp_path):
  rng = np.random.default_rng(13)
  state = fake_psa_resnet38(rng)
  imagenet = {k: v for k, v in state.items() if '.fc8' not in k}
  report = cw.convert_file(_write_source(tmp_path, imagenet), 'psa_resnet38',
                           str(tmp_path / 'imagenet.npz'))
  assert report['not_produced'] == [
      'params/classifier/kernel', 'params/head/conv1/bias',
      'params/head/conv1/kernel', 'params/head/conv2/bias',
      'params/head/conv2/kernel']
  model = _psa_rrm_net()
  with pytest.raises(weights.WeightsError, match='classifier/kernel'):
    weights.load_weights(_template(model, 17), str(tmp_path / 'imagenet.npz'))
  weights.load_weights(_template(model, 17), str(tmp_path / 'imagenet.npz'),
                       allow_missing=weights.NOT_BACKBONE)
  # A file of another width does not load, naming the arrays.
  with pytest.raises(weights.WeightsError, match='shape mismatches'):
    weights.load_weights(_template(_psa_rrm_net(), 17),
                         cw.convert_file(
                             _write_source(tmp_path, fake_psa_resnet38(
                                 rng, width=1 / 8)),
                             'psa_resnet38', str(tmp_path / 'wide.npz'))[
                                 'output'])
  # Shapes that fit no ResNet-38, or RRM branches that disagree.
  for key, shape, where in (
      ('module.b4_2.conv_branch2a.weight', (32, 16, 3, 3),
       'b4_2/conv_branch2a/kernel'),
      ('module.b6.conv_branch2b1.weight', (64, 32, 1, 1),
       'b6/conv_branch2b1/kernel'),
      ('module.fc8.weight', (20, 128, 1, 1), 'classifier/kernel'),
      ('module.fc8_seg_conv2.weight', (20, 8, 3, 3), 'head/conv2/kernel')):
    broken = dict(state)
    broken[key] = np.zeros(shape, np.float32)
    with pytest.raises(cw.ConversionError, match=where):
      cw.convert_file(_write_source(tmp_path, broken), 'psa_resnet38',
                      str(tmp_path / 'broken.npz'))
  for key in ('module.b8.conv_branch2a.weight', 'module.b2.conv_x.weight'):
    with pytest.raises(cw.ConversionError, match='wrong --layout'):
      cw.convert_state_dict({**state, key: np.zeros((1, 1, 1, 1))},
                            'psa_resnet38')
  with pytest.raises(cw.ConversionError, match='wrong --layout'):
    cw.convert_state_dict(state, 'deeplab_resnet101')


# --------------------------------------------------------------------------
# LPG's hourglass (CenterNet exkp, one stack), on PyTorch names directly
# --------------------------------------------------------------------------
# CenterNet's HourglassNet as LPG builds it: dims and residuals per list per
# level, the stem, cnv and head widths, at width 1.
LPG_DIMS, LPG_MODULES = (96, 96, 128, 128, 128, 192), (2, 2, 2, 2, 2, 4)


def fake_lpg_hourglass(rng, width=1 / 8, in_ch=5, outputs=2):
  """A state dict of `HourglassNet({'fm': outputs}, 1, input_channel=in_ch)`
  with every channel count times `width`, built the way CenterNet's
  constructors name it (make_layer, make_hg_layer, make_layer_revr)."""
  c = lambda n: max(1, round(n * width))
  state = {}
  def conv(name, out_ch, in_ch, k, bias=False):
    state.update(_flat_torch(name, _conv_params(rng, out_ch, in_ch, k, bias)))
  def bn(name, ch):
    state.update(_flat_torch(name, _bn_params(rng, ch)))
    state[f'{name}.num_batches_tracked'] = np.array(5, np.int64)
  def residual(name, in_ch, out_ch, stride=1):
    conv(f'{name}.conv1', out_ch, in_ch, 3)
    bn(f'{name}.bn1', out_ch)
    conv(f'{name}.conv2', out_ch, out_ch, 3)
    bn(f'{name}.bn2', out_ch)
    if stride != 1 or in_ch != out_ch:
      conv(f'{name}.skip.0', out_ch, in_ch, 1)
      bn(f'{name}.skip.1', out_ch)
  def kp_module(prefix, dims, modules):
    curr, nxt = dims[0], dims[1]
    for i in range(modules[0]):
      residual(f'{prefix}.up1.{i}', curr, curr)
    for i in range(modules[0]):
      residual(f'{prefix}.low1.{i}', curr if i == 0 else nxt, nxt,
               2 if i == 0 else 1)
    if len(dims) > 2:
      kp_module(f'{prefix}.low2', dims[1:], modules[1:])
    else:
      for i in range(modules[1]):
        residual(f'{prefix}.low2.{i}', nxt, nxt)
    for i in range(modules[0]):
      residual(f'{prefix}.low3.{i}', nxt,
               curr if i == modules[0] - 1 else nxt)
  conv('pre.0.conv', c(48), in_ch, 7)
  bn('pre.0.bn', c(48))
  residual('pre.1', c(48), c(96), stride=2)
  kp_module('kps.0', [c(d) for d in LPG_DIMS], LPG_MODULES)
  conv('cnvs.0.conv', c(256), c(96), 3)
  bn('cnvs.0.bn', c(256))
  conv('fm.0.0.conv', c(96), c(256), 3, bias=True)
  conv('fm.0.1', outputs, c(96), 1, bias=True)
  return state


def lpg_hourglass_forward(state, x):
  """CenterNet exkp's forward (one stack, head fm) in numpy on PyTorch
  names: x (H, W, C) -> fm (H / 4, W / 4, outputs)."""
  bn = lambda name: {leaf: state[f'{name}.{leaf}'] for leaf in
                     ('weight', 'bias', 'running_mean', 'running_var')}
  def convolution(name, h, k, stride=1, with_bn=True):
    h = np_conv(h, state[f'{name}.conv.weight'],
                None if with_bn else state[f'{name}.conv.bias'],
                stride=stride, pad=(k - 1) // 2)
    return relu(np_bn(h, bn(f'{name}.bn')) if with_bn else h)
  def residual(name, h, stride=1):
    y = relu(np_bn(np_conv(h, state[f'{name}.conv1.weight'], stride=stride,
                           pad=1), bn(f'{name}.bn1')))
    y = np_bn(np_conv(y, state[f'{name}.conv2.weight'], pad=1),
              bn(f'{name}.bn2'))
    if f'{name}.skip.0.weight' in state:
      h = np_bn(np_conv(h, state[f'{name}.skip.0.weight'], stride=stride),
                bn(f'{name}.skip.1'))
    return relu(y + h)
  def kp_module(prefix, h, level):
    count = LPG_MODULES[level]
    up1 = h
    for i in range(count):
      up1 = residual(f'{prefix}.up1.{i}', up1)
    low = h
    for i in range(count):
      low = residual(f'{prefix}.low1.{i}', low, 2 if i == 0 else 1)
    if level < len(LPG_DIMS) - 2:
      low = kp_module(f'{prefix}.low2', low, level + 1)
    else:
      for i in range(LPG_MODULES[-1]):
        low = residual(f'{prefix}.low2.{i}', low)
    for i in range(count):
      low = residual(f'{prefix}.low3.{i}', low)
    return up1 + low.repeat(2, axis=0).repeat(2, axis=1)   # nearest x2
  h = convolution('pre.0', x, 7, stride=2)
  h = residual('pre.1', h, stride=2)
  h = convolution('cnvs.0', kp_module('kps.0', h, 0), 3)
  h = convolution('fm.0.0', h, 3, with_bn=False)
  return np_conv(h, state['fm.0.1.weight'], state['fm.0.1.bias'])


def _lpg_target(key):
  """Our flattened key of an LPG PyTorch key (frozen-BN file), by plain
  renaming: the one stack's lists, nn.Sequential indices, the skip pair."""
  module, _, leaf = key.rpartition('.')
  for old, new in (('pre.0.', 'pre.layers_0.'), ('pre.1.', 'pre.layers_1.'),
                   ('kps.0.', 'hourglass.'), ('cnvs.0.', 'cnv.'),
                   ('fm.0.0.', 'fm.layers_0.'), ('skip.0', 'skip_conv'),
                   ('skip.1', 'skip_bn')):
    module = module.replace(old, new)
  module = 'fm.layers_1' if module == 'fm.0.1' else module
  module = re.sub(r'(up1|low1|low2|low3)\.(\d)', r'\1_\2', module)
  path = module.replace('.', '/')
  is_bn = path.rpartition('/')[2] in ('bn', 'bn1', 'bn2', 'skip_bn')
  if not is_bn:
    return f'params/{path}/' + ('kernel' if leaf == 'weight' else 'bias')
  name = {'weight': 'scale', 'running_mean': 'mean',
          'running_var': 'var'}.get(leaf, leaf)
  return f'batch_stats/{path}/{name}'


def _hourglass_template(model, channels, seed=0):
  rng = np.random.default_rng(seed)
  return jax.tree.map(
      lambda leaf: rng.normal(size=leaf.shape).astype(leaf.dtype),
      hourglass.abstract_variables(model, channels))


def test_lpg_hourglass_round_trip_matches_numpy_network(tmp_path):
  rng = np.random.default_rng(14)
  state = {f'module.{k}': v for k, v in fake_lpg_hourglass(rng).items()}
  report = cw.convert_file(_write_source(tmp_path, state), 'lpg_hourglass',
                           str(tmp_path / 'lpg.npz'))
  assert report['stripped_prefix'] == 'module.'
  inferred = report['inferred_model']
  assert (inferred['width'], inferred['input_channels'],
          inferred['num_classes']) == (1 / 8, 5, 2)
  assert report['not_produced'] == []
  counters = sorted(k for k in state if k.endswith('num_batches_tracked'))
  assert sorted('module.' + k for k, _ in report['unused']) == counters
  # Every source array landed once, where plain renaming puts it.
  flat = weights.read_weights(str(tmp_path / 'lpg.npz'))
  assert len(flat) == report['converted'] == len(state) - len(counters)
  for key in sorted(set(state) - set(counters)):
    target = _lpg_target(key[len('module.'):])
    value = state[key]
    expected = value.transpose(2, 3, 1, 0) if value.ndim == 4 else value
    np.testing.assert_array_equal(flat[target], expected, err_msg=key)
  # LPG trains its BN: the frozen-BN file loads into the default network
  # by relocating BN scale/bias to params; nothing is left over.
  model = hourglass.HourglassNet(width=1 / 8)
  variables, loaded = weights.load_weights(_hourglass_template(model, 5),
                                           str(tmp_path / 'lpg.npz'))
  assert loaded['missing'] == []
  assert loaded['loaded'] == report['converted']
  assert ('batch_stats/cnv/bn/scale', 'params/cnv/bn/scale') in loaded[
      'relocated']
  # The whole network against numpy: strides, skips, the recursion, the
  # nearest upsampling and the head's biases.
  images = rng.normal(size=(1, 128, 128, 5)).astype(np.float32)
  with jax.default_matmul_precision('highest'):
    ours = jax.jit(model.apply).lower(variables, images).compile(
        compiler_options={'xla_backend_optimization_level': 0})(
            variables, images)['logits'][0]
  expected = lpg_hourglass_forward(state_without_prefix(state), images[0])
  assert ours.shape == expected.shape == (32, 32, 2)
  scale = np.max(np.abs(expected))
  np.testing.assert_allclose(ours / scale, expected / scale, atol=1e-5)


def state_without_prefix(state):
  return {k[len('module.'):]: v for k, v in state.items()}


def test_lpg_hourglass_four_channels_and_errors(tmp_path):
  rng = np.random.default_rng(15)
  state = fake_lpg_hourglass(rng, width=1 / 4, in_ch=4)
  report = cw.convert_file(_write_source(tmp_path, state), 'lpg_hourglass',
                           str(tmp_path / 'round1.npz'), frozen_bn=False)
  inferred = report['inferred_model']
  assert (inferred['width'], inferred['input_channels']) == (1 / 4, 4)
  assert report['not_produced'] == [] and report['bn_collection'] == 'params'
  _, loaded = weights.load_weights(
      _hourglass_template(hourglass.HourglassNet(width=1 / 4), 4),
      str(tmp_path / 'round1.npz'))
  assert loaded['missing'] == [] and loaded['relocated'] == []
  # Keys of a 2-stack model, of other heads, and lists or indices the
  # one-stack hourglass does not have all fail loudly.
  for key in ('kps.1.up1.0.conv1.weight', 'cnvs.1.conv.weight',
              'inters.0.conv1.weight', 'inters_.0.0.weight',
              'cnvs_.0.1.running_mean', 'hm.0.1.weight', 'fm.1.0.conv.weight',
              'kps.0.up1.2.conv1.weight', 'kps.0.low2.0.conv1.weight',
              'kps.0.low2.low2.low2.low2.low2.up1.0.conv1.weight',
              'kps.0.low2.low2.low2.low2.low2.4.bn1.weight',
              'kps.0.low1.0.skip.2.weight', 'pre.2.conv.weight'):
    with pytest.raises(cw.ConversionError, match='wrong --layout'):
      cw.convert_state_dict({**state, key: np.zeros((1, 1, 1, 1))},
                            'lpg_hourglass')
  # A width that does not fit, named by the converted key.
  broken = dict(state)
  broken['kps.0.low2.low3.1.conv2.weight'] = np.zeros((8, 8, 3, 3),
                                                      np.float32)
  with pytest.raises(cw.ConversionError,
                     match='hourglass/low2/low3_1/conv2/kernel'):
    cw.convert_file(_write_source(tmp_path, broken), 'lpg_hourglass',
                    str(tmp_path / 'broken.npz'))
  # LPG's inputs are [probability,] box mask, RGB: no channel order to flip.
  with pytest.raises(cw.ConversionError, match='4 input channels'):
    cw.convert_state_dict(state, 'lpg_hourglass', flip_first_conv=True)
  with pytest.raises(cw.ConversionError, match='wrong --layout'):
    cw.convert_state_dict(state, 'scalenet101')


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
  with pytest.raises(cw.ConversionError, match='--caffe_bn'):
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

