"""ScaleNet backbone: its rules by hand, the structure, and the
`scalenet101` converter layout round trip checked against a numpy
implementation of the PyTorch network (PMM's ScaleNet, output stride 8)."""

from __future__ import annotations

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from wsss_jax import defaults
from wsss_jax.models import build
from wsss_jax.models import scalenet
from wsss_jax.models import weights
from wsss_jax.tools import convert_weights as cw

from torch_reference import (_bn_params, _conv_params, _flat_torch, _run,
                             _template, np_bn, np_conv, np_max_pool, relu)

# A reduced structure for blocks (2, 1, 1, 1), at full scale: width 1/16
# gives branch widths (3, 1, 1, 1), (2, 0, 1, 1), (4, 2, 1, 0), (6, 3, 0, 2),
# (10, 6, 2, 1).  Absent branches (0), and a 1x1 branch conv (side 7,
# branch 3: 7 / 8 <= 1).
BLOCKS = (2, 1, 1, 1)
STRUCTURE = ((48, 16, 16, 16, 56), (32, 0, 16, 16, 56), (64, 32, 16, 0, 28),
             (96, 48, 0, 32, 14), (160, 96, 32, 16, 7))
WIDTH = 1 / 16


# --------------------------------------------------------------------------
# The rules, by hand
# --------------------------------------------------------------------------
def test_branch_kernel_size_rule():
  # 3 iff side / 2**i > 1: 7 / 8 = 0.875 -> 1; 14 / 8 = 1.75 -> 3;
  # 4 / 4 = 1 -> 1; 1 / 1 = 1 -> 1.
  assert [scalenet.branch_kernel_size(56, i) for i in range(4)] == [3] * 4
  assert [scalenet.branch_kernel_size(14, i) for i in range(4)] == [3] * 4
  assert [scalenet.branch_kernel_size(7, i) for i in range(4)] == [3, 3, 3, 1]
  assert [scalenet.branch_kernel_size(4, i) for i in range(4)] == [3, 3, 1, 1]
  assert [scalenet.branch_kernel_size(1, i) for i in range(4)] == [1] * 4


def test_scale_pool_and_restore_size_by_hand():
  x = jnp.arange(25, dtype=jnp.float32).reshape(1, 5, 5, 1)
  # 2x2/2 floor mode on 0..24 (row-major 5x5): windows end at 6, 8, 16, 18;
  # the last row and column are dropped.
  pooled = scalenet.scale_pool(x, 2)
  np.testing.assert_array_equal(pooled[0, :, :, 0], [[6, 8], [16, 18]])
  # 5 % 2 != 0 -> bilinear, align_corners=False: src = (i + 0.5) * 0.4 - 0.5
  # = -0.3 (-> 0), 0.1, 0.5, 0.9, 1.3 (-> 1).  Along a row 6 -> 8:
  # 6, 6.2, 7, 7.8, 8; down a column +10 times 0, 0.1, 0.5, 0.9, 1.
  up = np.asarray(scalenet.restore_size(pooled, (5, 5))[0, :, :, 0])
  row = np.array([6, 6.2, 7, 7.8, 8])
  expected = row[None, :] + 10 * np.array([0, 0.1, 0.5, 0.9, 1])[:, None]
  np.testing.assert_allclose(up, expected, rtol=1e-6)
  assert up[2, 2] == pytest.approx(12.0) and up[1, 3] == pytest.approx(8.8)
  # 4 % 2 == 0 -> nearest: each pooled cell repeated 2x2.
  x4 = jnp.arange(16, dtype=jnp.float32).reshape(1, 4, 4, 1)
  pooled4 = scalenet.scale_pool(x4, 2)
  np.testing.assert_array_equal(pooled4[0, :, :, 0], [[5, 7], [13, 15]])
  np.testing.assert_array_equal(
      scalenet.restore_size(pooled4, (4, 4))[0, :, :, 0],
      [[5, 5, 7, 7], [5, 5, 7, 7], [13, 13, 15, 15], [13, 13, 15, 15]])
  # A map smaller than the scale (5 < 7, or 3 x 9 with 3 < 7): one cell, the
  # maximum of the whole map; then broadcast back.
  assert scalenet.scale_pool(x, 7).shape == (1, 1, 1, 1)
  assert float(scalenet.scale_pool(x, 7)[0, 0, 0, 0]) == 24.0
  wide = jnp.arange(27, dtype=jnp.float32).reshape(1, 3, 9, 1)
  assert float(scalenet.scale_pool(wide, 7)[0, 0, 0, 0]) == 26.0
  np.testing.assert_array_equal(
      scalenet.restore_size(scalenet.scale_pool(x, 7), (5, 5)),
      np.full((1, 5, 5, 1), 24.0))
  assert scalenet.scale_pool(x, 1) is x
  # Gradients: finite, the global max routes to its single maximum.
  grad = jax.grad(lambda v: scalenet.restore_size(
      scalenet.scale_pool(v, 7), (5, 5)).sum())(x)
  assert float(grad[0, 4, 4, 0]) == 25.0 and float(jnp.abs(grad).sum()) == 25.0
  grad = jax.grad(lambda v: scalenet.restore_size(
      scalenet.scale_pool(v, 2), (5, 5)).sum())(x)
  assert np.all(np.isfinite(grad)) and float(grad.sum()) == pytest.approx(25.0)


# --------------------------------------------------------------------------
# Structure
# --------------------------------------------------------------------------
def test_shipped_structure_and_load_structure(tmp_path):
  structure = scalenet.SCALENET101_STRUCTURE
  # 3 + 4 + 23 + 3 = 33 blocks at ImageNet sides 56, 28, 14, 7.
  assert len(structure) == sum(scalenet.SCALENET101_BLOCKS) == 33
  assert [entry[-1] for entry in structure] == (
      [56] * 3 + [28] * 4 + [14] * 23 + [7] * 3)
  assert structure[0] == (61, 11, 7, 7, 56)
  assert structure[-1] == (84, 442, 155, 1, 7)
  assert scalenet.validate_structure(structure, (3, 4, 23, 3)) == structure
  path = tmp_path / 'scalenet101.json'
  path.write_text(json.dumps([list(e) for e in structure]))
  assert scalenet.load_structure(path) == structure
  assert scalenet.resolve_structure('') == structure
  assert scalenet.resolve_structure(str(path)) == structure
  assert scalenet.resolve_structure([[1, 0, 0, 0, 7]]) == ((1, 0, 0, 0, 7),)
  # Bad entries name the structure and the entry.
  for bad, match in (([], 'non-empty'), ('abc', 'non-empty'),
                     ([[1, 2, 3, 4]], r'structure\[0\]'),
                     ([[1, 2, 3, 4, 5], [1, 2, 3, 4.5, 5]], r'structure\[1\]'),
                     ([[0, 0, 0, 0, 7]], 'one > 0'),
                     ([[1, -1, 0, 0, 7]], '>= 0'),
                     ([[1, 0, 0, 0, 0]], 'side')):
    with pytest.raises(ValueError, match=match):
      scalenet.validate_structure(bad)
  with pytest.raises(ValueError, match='blocks'):
    scalenet.validate_structure(structure, (3, 4, 22, 3))
  with pytest.raises(ValueError, match='blocks'):
    scalenet.validate_structure(structure, (3, 4, 26))
  broken = tmp_path / 'broken.json'
  broken.write_text('[[1, 2, 3')
  with pytest.raises(ValueError, match='broken.json'):
    scalenet.load_structure(broken)
  broken.write_text('[[1, 2, 3, 4]]')
  with pytest.raises(ValueError, match=r'broken.json.*structure\[0\]'):
    scalenet.load_structure(broken)
  with pytest.raises(ValueError, match='absent.json'):
    scalenet.load_structure(tmp_path / 'absent.json')


def _config(structure_path='', blocks=BLOCKS, width=WIDTH, output_stride=8):
  config = defaults.scalenet101_model()
  config.scalenet_structure = str(structure_path)
  config.scalenet_blocks = blocks
  config.width = width
  config.output_stride = output_stride
  return config


def test_full_scalenet101_shapes_and_registration():
  config = defaults.scalenet101_model()
  assert config.backbone in build.BACKBONES
  backbone = build.build_backbone(config)
  assert isinstance(backbone, scalenet.ScaleNet)
  assert backbone.structure == scalenet.SCALENET101_STRUCTURE
  images = jax.ShapeDtypeStruct((1, 448, 448, 3), jnp.float32)
  variables = build.abstract_variables(backbone, 65)
  out = jax.eval_shape(backbone.apply, variables, images)
  # 448 -> 224 (conv1) -> 112 (pool) = C2 -> 56 (layer2), kept to C5.
  assert out['levels']['c2'].shape == (1, 112, 112, 256)
  assert out['levels']['c3'].shape == (1, 56, 56, 512)
  assert out['levels']['c4'].shape == (1, 56, 56, 1024)
  assert out['features'].shape == out['levels']['c5'].shape == (1, 56, 56,
                                                                 2048)
  assert build.feature_size(config, 448) == 56
  # 65 -> 33 -> 17 -> 8 (floor); output stride 32 (ImageNet): 17 -> 8 -> 4
  # -> 2.
  assert build.feature_size(config, 65) == 8
  assert build.feature_size(_config(blocks=(3, 4, 23, 3), width=1.0,
                                    output_stride=32), 65) == 2
  flat = weights.flatten_variables(variables)
  # Block 1 of layer1: (61, 11, 7, 7), side 56 -> all 3x3; the last block of
  # layer4: (84, 442, 155, 1), side 7 -> branch 3 is 1x1; block 3 of layer1
  # has no branch 3 (width 0).
  assert flat['params/layer1/block1/conv2_0/kernel'].shape == (3, 3, 64, 61)
  assert flat['params/layer1/block1/conv3/kernel'].shape == (1, 1, 86, 256)
  assert flat['params/layer4/block3/conv2_3/kernel'].shape == (1, 1, 512, 1)
  assert flat['params/layer4/block3/conv2_2/kernel'].shape == (3, 3, 512, 155)
  assert 'params/layer1/block3/conv2_3/kernel' not in flat
  assert 'batch_stats/layer1/block3/bn2_3/mean' not in flat
  projections = sorted(k for k in flat if 'shortcut_conv' in k)
  assert projections == [f'params/layer{i}/block1/shortcut_conv/kernel'
                         for i in range(1, 5)]
  # 1 stem conv + 4 projections + per block conv1, conv3 and one conv per
  # present branch; every conv has a BN with 4 vectors.
  branches = sum(sum(c > 0 for c in entry[:4])
                 for entry in scalenet.SCALENET101_STRUCTURE)
  convs = 1 + 4 + 2 * 33 + branches
  assert sum(k.startswith('params/') for k in flat) == convs
  assert sum(k.startswith('batch_stats/') for k in flat) == 4 * convs


def test_bad_arguments():
  images = jnp.zeros((1, 33, 33, 3))
  for kwargs, match in ((dict(output_stride=4), 'output_stride'),
                        (dict(blocks=(1, 1, 1)), 'blocks'),
                        (dict(blocks=(1, 1, 1, 1)), 'structure has 5'),
                        (dict(dilations=(1, 1, 0, 1)), 'dilations'),
                        (dict(width=0.0), 'width')):
    module = scalenet.ScaleNet(**{'structure': STRUCTURE, 'blocks': BLOCKS,
                                  **kwargs})
    with pytest.raises(ValueError, match=match):
      jax.eval_shape(module.init, jax.random.PRNGKey(0), images)
  with pytest.raises(ValueError, match='output_stride'):
    build.feature_size(_config(output_stride=4), 65)


# --------------------------------------------------------------------------
# Converter round trip against the numpy network
# --------------------------------------------------------------------------
def fake_scalenet(rng, structure=STRUCTURE, blocks=BLOCKS, width=WIDTH):
  """{PyTorch module name: params} of a ScaleNet at `width` (the official
  network's modules and shapes, `scale(c)` channels)."""
  scale = lambda c: max(1, round(c * width))
  net = {'conv1': _conv_params(rng, scale(64), 3, 7, bias=False),
         'bn1': _bn_params(rng, scale(64))}
  in_ch, entry = scale(64), 0
  for stage, count in enumerate(blocks):
    planes, out_ch = scale(64 * 2 ** stage), scale(256 * 2 ** stage)
    for index in range(count):
      *channels, side = structure[entry]
      entry += 1
      channels = [0 if c == 0 else scale(c) for c in channels]
      prefix = f'layer{stage + 1}.{index}'
      net[f'{prefix}.conv1'] = _conv_params(rng, planes, in_ch, 1, bias=False)
      net[f'{prefix}.bn1'] = _bn_params(rng, planes)
      for i, c in enumerate(channels):
        if c:
          k = 3 if side / 2 ** i > 1 else 1
          net[f'{prefix}.conv2.{i}'] = _conv_params(rng, c, planes, k,
                                                    bias=False)
          net[f'{prefix}.bn2.{i}'] = _bn_params(rng, c)
      net[f'{prefix}.conv3'] = _conv_params(rng, out_ch, sum(channels), 1,
                                            bias=False)
      net[f'{prefix}.bn3'] = _bn_params(rng, out_ch)
      if index == 0:
        net[f'{prefix}.downsample.0'] = _conv_params(rng, out_ch, in_ch, 1,
                                                     bias=False)
        net[f'{prefix}.downsample.1'] = _bn_params(rng, out_ch)
      in_ch = out_ch
  net['fc'] = {'weight': rng.normal(size=(10, in_ch)).astype(np.float32),
               'bias': np.zeros(10, np.float32)}
  return net


def _np_upsample(x, size):
  """PyTorch F.upsample(size) of (h, w, C): 'nearest' when both sides
  divide, else 'bilinear' with align_corners=False."""
  (h, w), (oh, ow) = x.shape[:2], size
  if oh % h == 0 and ow % w == 0:
    return x[np.arange(oh) * h // oh][:, np.arange(ow) * w // ow]
  def axis(n_in, n_out):
    src = np.maximum((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0)
    i0 = np.floor(src).astype(int)
    return i0, np.minimum(i0 + 1, n_in - 1), src - i0
  r0, r1, fr = axis(h, oh)
  c0, c1, fc = axis(w, ow)
  rows = x[r0] * (1 - fr)[:, None, None] + x[r1] * fr[:, None, None]
  return rows[:, c0] * (1 - fc)[None, :, None] + rows[:, c1] * fc[None, :,
                                                                     None]


def scalenet_forward(net, x, structure=STRUCTURE, blocks=BLOCKS,
                     strides=(1, 2, 1, 1)):
  """PMM's ScaleNet forward in numpy (official semantics), x (H, W, 3);
  returns the four stage outputs."""
  h = relu(np_bn(np_conv(x.astype(np.float64), net['conv1']['weight'],
                         stride=2, pad=3), net['bn1']))
  h = np_max_pool(h, 3, 2, 1)
  outs, entry = [], 0
  for stage, count in enumerate(blocks):
    for index in range(count):
      side = structure[entry][-1]
      entry += 1
      prefix = f'layer{stage + 1}.{index}'
      stride = strides[stage] if index == 0 else 1
      if stride > 1:
        h = np_max_pool(h, stride, stride, 0)
      residual = h
      if f'{prefix}.downsample.0' in net:
        residual = np_bn(np_conv(h, net[f'{prefix}.downsample.0']['weight']),
                         net[f'{prefix}.downsample.1'])
      y = relu(np_bn(np_conv(h, net[f'{prefix}.conv1']['weight']),
                     net[f'{prefix}.bn1']))
      parts = []
      for i, s in enumerate((None, 2, 4, 7)):
        if f'{prefix}.conv2.{i}' not in net:
          continue
        b = y
        if s is not None:
          if b.shape[0] < s or b.shape[1] < s:
            b = b.max(axis=(0, 1), keepdims=True)
          else:
            b = np_max_pool(b, s, s, 0)
        k = 3 if side / 2 ** i > 1 else 1
        b = np_conv(b, net[f'{prefix}.conv2.{i}']['weight'], pad=k // 2)
        if s is not None:
          b = _np_upsample(b, y.shape[:2])
        parts.append(np_bn(b, net[f'{prefix}.bn2.{i}']))
      y = relu(np.concatenate(parts, axis=-1))
      y = np_bn(np_conv(y, net[f'{prefix}.conv3']['weight']),
                net[f'{prefix}.bn3'])
      h = relu(y + residual)
    outs.append(h)
  return outs


def _ours(key):
  """Our converted key of an official ScaleNet key (written independently of
  the layout's rules), and how its array changes."""
  module, _, leaf = key.rpartition('.')
  module = re.sub(r'layer(\d)\.(\d+)',
                  lambda m: f'layer{m.group(1)}.block{int(m.group(2)) + 1}',
                  module)
  module = re.sub(r'(conv2|bn2)\.(\d)', r'\1_\2', module)
  module = module.replace('downsample.0', 'shortcut_conv').replace(
      'downsample.1', 'shortcut_bn')
  path = 'backbone/' + module.replace('.', '/')
  if leaf == 'weight' and 'conv' in module.rsplit('.', 1)[-1]:
    return f'params/{path}/kernel', lambda w: w.transpose(2, 3, 1, 0)
  name = {'weight': 'scale', 'running_mean': 'mean',
          'running_var': 'var'}[leaf] if leaf != 'bias' else 'bias'
  return f'batch_stats/{path}/{name}', lambda v: v


def test_scalenet101_layout_round_trip_matches_numpy_network(tmp_path):
  rng = np.random.default_rng(0)
  net = fake_scalenet(rng)
  state = {}
  for name, params in net.items():
    state.update(_flat_torch(name, params))
  counters = [f'{name}.num_batches_tracked' for name in net
              if 'bn' in name or name.endswith('downsample.1')]
  for key in counters:
    state[key] = np.array(7, np.int64)
  flat, report = cw.convert_state_dict(state, 'scalenet101')
  assert sorted(k for k, _ in report['unused']) == sorted(
      counters + ['fc.bias', 'fc.weight'])
  assert report['converted'] == len(state) - len(counters) - 2 == len(flat)
  # One hand-picked element: OIHW [o, i, y, x] -> HWIO [y, x, i, o].
  np.testing.assert_array_equal(
      flat['params/backbone/layer1/block2/conv2_2/kernel'][2, 0, 3, 0],
      net['layer1.1.conv2.2']['weight'][0, 3, 2, 0])
  path = str(tmp_path / 'scalenet.npz')
  weights.save_weights(path, flat)
  structure_path = tmp_path / 'structure.json'
  structure_path.write_text(json.dumps(STRUCTURE))
  model = build.build_model(_config(structure_path), 3)
  variables, loaded = weights.load_weights(_template(model, 50), path,
                                           allow_missing=('head/.*',))
  # Every converted array has a model leaf of its shape, every backbone leaf
  # is loaded; only the head is left.
  assert loaded['loaded'] == len(flat)
  assert loaded['missing'] == ['params/head/classifier/kernel']
  assert loaded['relocated'] == [] and loaded['unexpected'] == []
  ours = weights.flatten_variables(variables)
  assert {k for k in ours if '/backbone/' in k} == set(flat)
  for key in sorted(set(state) - set(counters) - {'fc.weight', 'fc.bias'}):
    target, convert = _ours(key)
    np.testing.assert_array_equal(ours[target], convert(state[key]),
                                  err_msg=key)
  # The network against numpy: 50 -> 25 -> 13 (C2: branches pooled to 6, 3,
  # 1, the first two upsampled bilinearly) -> 6 (C3..C5: branch 1 pooled to
  # 3 and repeated 2x2 (nearest), branch 2 to 1, and branch 3 on a 6x6 map
  # taken globally).
  images = rng.normal(size=(1, 50, 50, 3)).astype(np.float32)
  out = _run(model, variables, images)
  expected = scalenet_forward(net, images[0])
  assert out['features'].shape == (1, 6, 6, 128)
  assert [out['levels'][f'c{i}'].shape[1:] for i in range(2, 6)] == [
      e.shape for e in expected] == [(13, 13, 16), (6, 6, 32), (6, 6, 64),
                                     (6, 6, 128)]
  assert build.feature_size(_config(), 50) == 6
  for level, value in zip(('c2', 'c3', 'c4', 'c5'), expected):
    scale = np.max(np.abs(value))
    np.testing.assert_allclose(np.asarray(out['levels'][level][0]) / scale,
                               value / scale, atol=1e-5, err_msg=level)


def test_scalenet101_layout_rejects_foreign_keys_and_shapes(tmp_path):
  rng = np.random.default_rng(1)
  state = {}
  for name, params in fake_scalenet(rng).items():
    state.update(_flat_torch(name, params))
  with pytest.raises(cw.ConversionError, match='wrong --layout'):
    cw.convert_state_dict({**state, 'layer1.0.conv2.4.weight':
                           np.zeros((1, 1, 1, 1), np.float32)}, 'scalenet101')
  with pytest.raises(cw.ConversionError, match='wrong --layout'):
    cw.convert_state_dict(state, 'torchvision_resnet101')
  # A branch of another width does not load, naming the array.
  state['layer2.0.conv2.1.weight'] = np.zeros((5, 8, 3, 3), np.float32)
  flat, _ = cw.convert_state_dict(state, 'scalenet101')
  path = str(tmp_path / 'wrong.npz')
  weights.save_weights(path, flat)
  structure_path = tmp_path / 'structure.json'
  structure_path.write_text(json.dumps(STRUCTURE))
  model = build.build_model(_config(structure_path), 3)
  with pytest.raises(weights.WeightsError, match='layer2/block1/conv2_1'):
    weights.load_weights(_template(model, 42), path,
                         allow_missing=('head/.*',))


def test_block_gradients_finite_on_small_and_constant_maps():
  # A striding projecting block on 11x11 -> 5x5: branch 1 pools to 2x2
  # (bilinear back), branch 2 to 1x1 (nearest), branch 3 (5 < 7) globally;
  # side 7 makes branch 3 a 1x1 conv.  A constant input ties every max.
  block = scalenet.SABlock(planes=4, features=8, branches=(2, 1, 1, 1),
                           side=7, stride=2, projection=True)
  x = jnp.asarray(np.random.default_rng(2).normal(size=(1, 11, 11, 4)),
                  jnp.float32)
  rng = np.random.default_rng(3)
  shapes = weights.flatten_variables(jax.eval_shape(
      block.init, jax.random.PRNGKey(0), x))
  variables = weights.unflatten_variables({
      k: (rng.uniform(0.5, 1.5, v.shape) if k.endswith('/var')
          else rng.normal(size=v.shape)).astype(np.float32)
      for k, v in shapes.items()})
  assert shapes['params/conv2_3/kernel'].shape == (1, 1, 4, 1)
  assert shapes['params/conv2_1/kernel'].shape == (3, 3, 4, 1)
  grad_fn = jax.jit(jax.grad(lambda p, v: jnp.sum(block.apply(
      {**variables, 'params': p}, v)), argnums=(0, 1)))
  for images in (x, jnp.zeros_like(x)):
    grad = grad_fn(variables['params'], images)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grad))
  assert float(jnp.abs(grad_fn(variables['params'], x)[1]).sum()) > 0
