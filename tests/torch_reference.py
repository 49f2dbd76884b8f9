"""Reference PyTorch networks written in numpy, and fake PyTorch state dicts.

Shared by the weight tests: a converted file loaded into our Flax model must
compute what these direct implementations of the PyTorch layers compute.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from wsss_jax import defaults
from wsss_jax.models import build
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
# PSA's ResNet-38 (pre-activation), on PyTorch names directly
# --------------------------------------------------------------------------
# (name, in, mid, out, stride, first dilation, dilation) of the two-conv
# blocks and (name, in, out, dilation) of the bottlenecks, width 1: PSA's
# layer list (the table in wsss_jax/models/resnet38.py's docstring).
PSA_RES_BLOCKS = (
    (('b2', 64, 128, 128, 2, 1, 1),)
    + tuple((f'b2_{i}', 128, 128, 128, 1, 1, 1) for i in (1, 2))
    + (('b3', 128, 256, 256, 2, 1, 1),)
    + tuple((f'b3_{i}', 256, 256, 256, 1, 1, 1) for i in (1, 2))
    + (('b4', 256, 512, 512, 2, 1, 1),)
    + tuple((f'b4_{i}', 512, 512, 512, 1, 1, 1) for i in range(1, 6))
    + (('b5', 512, 512, 1024, 1, 1, 2),)
    + tuple((f'b5_{i}', 1024, 512, 1024, 1, 2, 2) for i in (1, 2)))
PSA_BOTTLENECKS = (('b6', 1024, 2048, 4), ('b7', 2048, 4096, 4))


def fake_psa_resnet38(rng, width=1 / 16, classes=20, seg_hidden=8):
  """A PSA/RRM ResNet-38 state dict of random numpy arrays, PyTorch names
  (`conv1a.weight`, `b4_2.bn_branch2a.running_var`, ..., RRM's `fc8` and
  `fc8_seg_conv1/2`), BN counters included, every key under `module.`."""
  c = lambda n: max(1, int(round(n * width)))
  state = {}
  def conv(name, out_ch, in_ch, k, bias=False):
    state.update(_flat_torch(name, _conv_params(rng, out_ch, in_ch, k, bias)))
  def bn(name, ch):
    state.update(_flat_torch(name, _bn_params(rng, ch)))
    state[f'{name}.num_batches_tracked'] = np.array(7, np.int64)
  conv('conv1a', c(64), 3, 3)
  for name, c_in, mid, c_out, stride, _, _ in PSA_RES_BLOCKS:
    bn(f'{name}.bn_branch2a', c(c_in))
    if c_in != c_out or stride != 1:
      conv(f'{name}.conv_branch1', c(c_out), c(c_in), 1)
    conv(f'{name}.conv_branch2a', c(mid), c(c_in), 3)
    bn(f'{name}.bn_branch2b1', c(mid))
    conv(f'{name}.conv_branch2b1', c(c_out), c(mid), 3)
  for name, c_in, c_out, _ in PSA_BOTTLENECKS:
    bn(f'{name}.bn_branch2a', c(c_in))
    conv(f'{name}.conv_branch1', c(c_out), c(c_in), 1)
    conv(f'{name}.conv_branch2a', c(c_out // 4), c(c_in), 1)
    bn(f'{name}.bn_branch2b1', c(c_out // 4))
    conv(f'{name}.conv_branch2b1', c(c_out // 2), c(c_out // 4), 3)
    bn(f'{name}.bn_branch2b2', c(c_out // 2))
    conv(f'{name}.conv_branch2b2', c(c_out), c(c_out // 2), 1)
  bn('bn7', c(4096))
  conv('fc8', classes, c(4096), 1)
  conv('fc8_seg_conv1', seg_hidden, c(4096), 3, bias=True)
  conv('fc8_seg_conv2', classes + 1, seg_hidden, 3, bias=True)
  return {f'module.{k}': v for k, v in state.items()}


def psa_resnet38_forward(state, x, seg_dilation):
  """PSA's ResNet-38 and RRM's two branches in numpy on a state dict of
  `fake_psa_resnet38`; x (H, W, 3).  Returns {'conv4', 'conv5', 'conv6',
  'cam' (ReLU of fc8), 'seg' (the segmentation logits)}."""
  state = {k[len('module.'):]: v for k, v in state.items()}
  def bn_relu(h, name):
    return relu(np_bn(h, {leaf: state[f'{name}.{leaf}'] for leaf in (
        'weight', 'bias', 'running_mean', 'running_var')}))
  def conv(h, name, stride=1, dil=1):
    weight = state[f'{name}.weight']
    return np_conv(h, weight, state.get(f'{name}.bias'), stride=stride,
                   pad=dil * (weight.shape[-1] // 2), dil=dil)
  normalised = {}
  h = conv(x.astype(np.float64), 'conv1a')
  for name, c_in, _, c_out, stride, first_dil, dil in PSA_RES_BLOCKS:
    a = normalised[name] = bn_relu(h, f'{name}.bn_branch2a')
    branch1 = (conv(a, f'{name}.conv_branch1', stride)
               if c_in != c_out or stride != 1 else h)
    y = conv(a, f'{name}.conv_branch2a', stride, first_dil)
    y = conv(bn_relu(y, f'{name}.bn_branch2b1'), f'{name}.conv_branch2b1',
             dil=dil)
    h = branch1 + y
  for name, _, _, dil in PSA_BOTTLENECKS:
    a = normalised[name] = bn_relu(h, f'{name}.bn_branch2a')
    y = bn_relu(conv(a, f'{name}.conv_branch2a'), f'{name}.bn_branch2b1')
    y = bn_relu(conv(y, f'{name}.conv_branch2b1', dil=dil),
                f'{name}.bn_branch2b2')
    h = conv(a, f'{name}.conv_branch1') + conv(y, f'{name}.conv_branch2b2')
  conv6 = bn_relu(h, 'bn7')
  seg = relu(conv(conv6, 'fc8_seg_conv1', dil=seg_dilation))
  return {'conv4': normalised['b5'], 'conv5': normalised['b6'],
          'conv6': conv6, 'cam': relu(conv(conv6, 'fc8')),
          'seg': conv(seg, 'fc8_seg_conv2', dil=seg_dilation)}


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


def _template(model, size, seed=0):
  """A load target for `weights.load_weights`: the model's variable shapes
  filled with seeded random values, with nothing compiled (a jitted
  `model.init` took most of the converter tests' time).  Every value a test
  reads is either overwritten by the file or checked to be kept."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(
      lambda leaf: rng.normal(size=leaf.shape).astype(leaf.dtype),
      build.abstract_variables(model, size))


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


