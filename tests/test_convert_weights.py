"""The weight converter: PyTorch layouts -> our .npz, checked against numpy
implementations of the PyTorch networks (names, transposes, BN folding,
channel order and topology at once)."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from wsss_jax.models import build
from wsss_jax.models import weights
from wsss_jax.tools import convert_weights as cw

from wsss_jax import defaults
from wsss_jax.methods.rrm import model as rrm_model

from torch_reference import (
    VGG_NAMES, VGG_INDICES, fake_vgg, vgg_forward, deeplab_vgg_names, lpg_vgg_names, fake_resnet, resnet_forward, deeplab_resnet_names, torchvision_resnet_names, fake_psa_resnet38, psa_resnet38_forward, _vgg_config, _resnet_config, _init, _template, _run, _write_source, _convert, _flat_torch)


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

