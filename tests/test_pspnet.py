"""Tests for wsss_jax.models.pspnet (PMM's PSPNet + auxiliary FCN head)."""

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
from wsss_jax.models import layers
from wsss_jax.models import pspnet

NUM_CLASSES = 3


def _key(seed):
  # Counter-based generator: compiles faster than threefry on CPU.
  return jax.random.key(seed, impl='unsafe_rbg')


def _tiny_psp(**overrides):
  """tiny_model (VGG-BN) at width 1/16 as a PSPNet with narrow heads."""
  base = defaults.tiny_model()
  base.width = 0.0625
  config = defaults.psp_model(base)
  config.psp_channels = 8
  config.psp_aux_channels = 4
  for key, value in overrides.items():
    config[key] = value
  return config


def _images(batch=2, size=40, seed=0):
  return jax.random.normal(jax.random.key(seed), (batch, size, size, 3))


def _init_with_output(model, images):
  """(eval-mode outputs, variables) from one compiled init."""
  return jax.jit(functools.partial(model.init_with_output, train=False))(
      _key(0), images)


def _variables(model, images):
  """Random variables of the right layout without compiling `model.init`
  (its random initialisers cost most of a tiny network's compile time on
  CPU): weights N(0, 1 / fan_in) from numpy, BN statistics and affine at
  identity (mean 0, var 1, scale 1, bias 0)."""
  shapes = jax.eval_shape(functools.partial(model.init, train=False),
                          _key(0), images)
  rng = np.random.default_rng(0)

  def fill(path, leaf):
    name = path[-1].key
    if name in ('var', 'scale'):
      return np.ones(leaf.shape, leaf.dtype)
    if name in ('mean', 'bias'):
      return np.zeros(leaf.shape, leaf.dtype)
    fan_in = max(1, int(np.prod(leaf.shape[:-1])))
    return (rng.standard_normal(leaf.shape) / np.sqrt(fan_in)).astype(
        leaf.dtype)

  return jax.tree_util.tree_map_with_path(fill, shapes)


@functools.lru_cache(maxsize=None)
def _tiny_model_and_variables():
  """(model, variables, eval outputs on `_images()`), compiled once."""
  model = build.build_model(_tiny_psp(), NUM_CLASSES)
  variables = _variables(model, _images())
  out = jax.jit(functools.partial(model.apply, train=False))(variables,
                                                             _images())
  return model, variables, out


class _StubBackbone(nn.Module):
  """A two-grid stand-in backbone: 'features' at stride 2 (a 2x2 average of
  a 1x1 conv of the image), 'levels' {'c3': the image itself at stride 1,
  'c4': the features}."""

  @nn.compact
  def __call__(self, images, train=False):
    del train
    x = nn.Dense(5, name='proj')(images)
    features = layers.avg_pool2d(x, 2, 2)
    return {'features': features, 'levels': {'c3': images, 'c4': features}}


# ----------------------------------------------------------------------------
# Adaptive average pooling
# ----------------------------------------------------------------------------
def test_adaptive_pool_matrix_hand_computed():
  # n = 5, s = 3: bin i = [floor(5i/3), ceil(5(i+1)/3)):
  #   i=0: [0, 2)   i=1: [1, 4)   i=2: [3, 5)  (bins overlap at 1 and 3).
  expected = np.array([[1 / 2, 1 / 2, 0, 0, 0],
                       [0, 1 / 3, 1 / 3, 1 / 3, 0],
                       [0, 0, 0, 1 / 2, 1 / 2]], np.float32)
  got = pspnet.adaptive_pool_matrix(5, 3)
  assert got.shape == (3, 5) and got.dtype == np.float32
  np.testing.assert_allclose(got, expected, rtol=1e-6)


def test_adaptive_pool_matrix_more_bins_than_inputs():
  # n = 2, s = 3: [0, ceil(2/3)=1), [floor(2/3)=0, ceil(4/3)=2),
  # [floor(4/3)=1, 2): every bin non-empty, rows sum to 1.
  np.testing.assert_allclose(pspnet.adaptive_pool_matrix(2, 3),
                             [[1, 0], [0.5, 0.5], [0, 1]])
  # s = 1 is the global mean; s = n the identity.
  np.testing.assert_allclose(pspnet.adaptive_pool_matrix(4, 1),
                             [[0.25] * 4])
  np.testing.assert_allclose(pspnet.adaptive_pool_matrix(6, 6), np.eye(6))
  # 5 -> 6 (the tiny model's 5x5 grid at PSP scale 6).
  matrix = pspnet.adaptive_pool_matrix(5, 6)
  assert np.all(matrix.sum(axis=1) > 0.999) and np.all(np.isfinite(matrix))


@pytest.mark.parametrize('n, s', [(0, 2), (3, 0), (3, -1)])
def test_adaptive_pool_matrix_rejects_bad_sizes(n, s):
  with pytest.raises(ValueError, match='in_size|out_size'):
    pspnet.adaptive_pool_matrix(n, s)


def test_adaptive_avg_pool2d_hand_computed():
  # x[i, j] = 5i + j on a 5x5 grid, pooled to 3x3 (bins as above).  The map
  # is linear, so a bin mean is 5·(mean row) + (mean col):
  #   cell (1, 1): rows 1..3, cols 1..3 -> 5·2 + 2 = 12
  #   cell (0, 2): rows 0..1, cols 3..4 -> 5·0.5 + 3.5 = 6
  #   cell (2, 0): rows 3..4, cols 0..1 -> 5·3.5 + 0.5 = 18
  #   cell (0, 0): rows 0..1, cols 0..1 -> 5·0.5 + 0.5 = 3
  x = jnp.arange(25, dtype=jnp.float32).reshape(1, 5, 5, 1)
  x = jnp.concatenate([x, -x], axis=-1)          # a second channel, negated
  pooled = pspnet.adaptive_avg_pool2d(x, 3)
  assert pooled.shape == (1, 3, 3, 2) and pooled.dtype == jnp.float32
  np.testing.assert_allclose(pooled[0, 1, 1], [12, -12], rtol=1e-6)
  np.testing.assert_allclose(pooled[0, 0, 2], [6, -6], rtol=1e-6)
  np.testing.assert_allclose(pooled[0, 2, 0], [18, -18], rtol=1e-6)
  np.testing.assert_allclose(pooled[0, 0, 0], [3, -3], rtol=1e-6)
  # Scale 1: the global mean 12.
  np.testing.assert_allclose(pspnet.adaptive_avg_pool2d(x, 1)[0, 0, 0],
                             [12, -12], rtol=1e-6)


def test_adaptive_avg_pool2d_non_square_and_dtype():
  # 2x4 input to 1x1 -> global mean; to 2x2 -> (rows identity, column pairs).
  x = jnp.array([[1., 2., 3., 4.], [5., 6., 7., 8.]]).reshape(1, 2, 4, 1)
  np.testing.assert_allclose(pspnet.adaptive_avg_pool2d(x, 2)[0, :, :, 0],
                             [[1.5, 3.5], [5.5, 7.5]])
  low = pspnet.adaptive_avg_pool2d(x.astype(jnp.bfloat16), 1)
  assert low.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.float32(low[0, 0, 0, 0]), 4.5)


# ----------------------------------------------------------------------------
# The network
# ----------------------------------------------------------------------------
def test_forward_shapes_and_parameter_layout():
  model, variables, out = _tiny_model_and_variables()
  assert isinstance(model, pspnet.PSPNet)
  assert set(variables['params']) == {'backbone', 'head', 'aux_head'}
  assert {'head', 'aux_head'} <= set(variables['batch_stats'])
  head = variables['params']['head']
  assert set(head) == {'ppm_1', 'ppm_2', 'ppm_3', 'ppm_6', 'bottleneck',
                       'classifier'}
  # tiny VGG: fc7 has fc_dim = 128 channels (not width-scaled); the
  # bottleneck reads 128 + 4·8 = 160.
  assert head['ppm_6']['conv']['kernel'].shape == (1, 1, 128, 8)
  assert 'bias' not in head['ppm_6']['conv']
  assert head['bottleneck']['conv']['kernel'].shape == (3, 3, 160, 8)
  assert head['classifier']['kernel'].shape == (1, 1, 8, NUM_CLASSES)
  assert head['classifier']['bias'].shape == (NUM_CLASSES,)
  aux = variables['params']['aux_head']
  # c4 = conv4_3: 512 / 16 = 32 channels.
  assert aux['conv']['conv']['kernel'].shape == (3, 3, 32, 4)
  assert aux['classifier']['kernel'].shape == (1, 1, 4, NUM_CLASSES)

  assert out['logits'].shape == (2, 5, 5, NUM_CLASSES)     # 40 / 8
  assert out['aux_logits'].shape == out['logits'].shape
  assert out['features'].shape == (2, 5, 5, 8)
  assert out['levels']['c5'].shape == (2, 5, 5, 128)
  for key in ('logits', 'aux_logits', 'features'):
    assert out[key].dtype == jnp.float32
    assert np.all(np.isfinite(out[key]))
  assert set(out['levels']) == {'c3', 'c4', 'c5'}
  assert build.feature_size(_tiny_psp(), 40) == 5


def test_train_mode_dropout_and_batch_stats():
  model, variables, eval_out = _tiny_model_and_variables()
  apply = jax.jit(functools.partial(model.apply, train=True,
                                    mutable=['batch_stats']))
  images = _images()
  out_a, state = apply(variables, images, rngs={'dropout': _key(1)})
  # With 8 + 4 channels at rate 0.1 some keys drop nothing (key 2 vs 1 in
  # the PSP head); keys 1 and 3 draw different masks in both heads.
  out_b, _ = apply(variables, images, rngs={'dropout': _key(3)})
  assert out_a['logits'].shape == (2, 5, 5, NUM_CLASSES)
  assert np.all(np.isfinite(out_a['logits']))
  # The heads' BN running statistics moved (momentum 0.1 towards the batch).
  for head in ('head', 'aux_head'):
    before = jax.tree.leaves(variables['batch_stats'][head])
    after = jax.tree.leaves(state['batch_stats'][head])
    assert any(not np.allclose(x, y) for x, y in zip(before, after)), head
  # Dropout2d is active: another key, other logits (both heads) ...
  assert not np.allclose(out_a['logits'], out_b['logits'])
  assert not np.allclose(out_a['aux_logits'], out_b['aux_logits'])
  # ... and the bottleneck 'features' are taken before dropout.
  np.testing.assert_allclose(out_a['features'], out_b['features'], rtol=1e-6)
  # Evaluation (running statistics, no dropout) differs from training.
  assert not np.allclose(eval_out['logits'], out_a['logits'])


def test_channel_dropout_drops_whole_channels():
  # A Dropout2d(0.5) head: each (image, channel) of the bottleneck is either
  # zeroed everywhere or scaled by 2 everywhere, so the classifier input is
  # features · mask with a spatially constant mask.  Check on the head alone.
  head = pspnet.PSPHead(num_classes=2, channels=16, pool_scales=(1,),
                        dropout=0.5)
  features = jax.random.normal(jax.random.key(3), (2, 4, 4, 6))
  variables = jax.jit(functools.partial(head.init, train=False))(_key(0),
                                                                 features)
  out, _ = jax.jit(functools.partial(head.apply, train=True,
                                     mutable=['batch_stats']))(
                                         variables, features,
                                         rngs={'dropout': _key(4)})
  bottleneck = out['features']
  kernel = variables['params']['classifier']['kernel'][0, 0]
  bias = variables['params']['classifier']['bias']
  # Linearity: logits - bias = (bottleneck · m) @ kernel with one m per
  # (image, channel); least squares over all pixels and classes (32
  # equations, 16 unknowns) recovers m, which must be 0 or 1 / (1 - 0.5) = 2
  # for every channel that is not zero everywhere (those are unidentifiable).
  for b in range(2):
    design = (np.asarray(bottleneck[b]).reshape(-1, 16)[:, :, None]
              * np.asarray(kernel)[None]).transpose(0, 2, 1).reshape(-1, 16)
    target = np.asarray(out['logits'][b] - bias).reshape(-1)
    mask, *_ = np.linalg.lstsq(design, target, rcond=None)
    active = np.abs(bottleneck[b]).reshape(-1, 16).max(axis=0) > 1e-6
    assert np.allclose(mask[active], np.round(mask[active] / 2) * 2,
                       atol=1e-3), mask
    assert set(np.round(mask[active]).astype(int)) <= {0, 2}


def test_psp_head_matches_a_hand_written_forward():
  # Wiring check: the head equals conv/BN/ReLU/pool/resize written out with
  # its own parameters (eval mode, initial BN statistics: x / sqrt(1 + eps)).
  head = pspnet.PSPHead(num_classes=2, channels=4, pool_scales=(1, 3),
                        dropout=0.1)
  features = jax.random.normal(jax.random.key(5), (1, 5, 5, 3))
  out, variables = jax.jit(functools.partial(head.init_with_output,
                                             train=False))(_key(0), features)
  params = variables['params']
  bn = lambda x: x / np.sqrt(1.0 + layers.BN_EPSILON)
  branches = [features]
  for scale in (1, 3):
    rows = pspnet.adaptive_pool_matrix(5, scale)
    pooled = np.einsum('sh,bhwc,tw->bstc', rows, features, rows)
    kernel = params[f'ppm_{scale}']['conv']['kernel'][0, 0]
    y = np.maximum(bn(pooled @ kernel), 0)
    branches.append(jax.image.resize(y, (1, 5, 5, 4), 'bilinear',
                                     antialias=False))
  concat = jnp.concatenate(branches, axis=-1)      # 3 + 2·4 = 11 channels
  y = lax.conv_general_dilated(
      concat, params['bottleneck']['conv']['kernel'], (1, 1),
      ((1, 1), (1, 1)), dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  y = np.maximum(bn(y), 0)
  logits = (y @ params['classifier']['kernel'][0, 0]
            + params['classifier']['bias'])
  np.testing.assert_allclose(out['features'], y, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(out['logits'], logits, rtol=1e-4, atol=1e-5)
  # The scale-1 branch upsampled from 1x1 is spatially constant.
  assert np.allclose(branches[1], branches[1][:, :1, :1])


def test_aux_head_on_a_finer_level_is_resized():
  # Stub backbone: features 4x4 (stride 2 of 8x8 images), aux level 'c3' the
  # 8x8 image.  aux_logits = the FCN head on c3, resized bilinearly
  # (align_corners=False) to 4x4 — for a 2x downsampling that is the mean of
  # each 2x2 block (source (i + 0.5)·2 − 0.5 = 2i + 0.5, weights 1/2, 1/2).
  model = pspnet.PSPNet(backbone=_StubBackbone(), num_classes=2, channels=4,
                        pool_scales=(1, 2), aux_level='c3', aux_channels=3)
  images = jax.random.normal(jax.random.key(6), (2, 8, 8, 3))
  out, variables = _init_with_output(model, images)
  assert out['logits'].shape == out['aux_logits'].shape == (2, 4, 4, 2)
  aux = pspnet.FCNHead(num_classes=2, channels=3)
  fine = aux.apply({'params': variables['params']['aux_head'],
                    'batch_stats': variables['batch_stats']['aux_head']},
                   images, train=False)['logits']
  assert fine.shape == (2, 8, 8, 2)
  block_means = np.asarray(fine).reshape(2, 4, 2, 4, 2, 2).mean(axis=(2, 4))
  np.testing.assert_allclose(out['aux_logits'], block_means, rtol=1e-5,
                             atol=1e-6)
  # The tiny VGG's c3 (conv3_3, stride 4: 10x10 at 40 px) is resized to 5x5
  # likewise (abstract evaluation: shapes only, nothing compiled).
  vgg = build.build_model(_tiny_psp(psp_aux_level='c3'), NUM_CLASSES)
  shapes = jax.eval_shape(
      lambda x: vgg.init_with_output(_key(0), x, train=False), _images())[0]
  assert shapes['levels']['c3'].shape[1:3] == (10, 10)
  assert shapes['aux_logits'].shape == shapes['logits'].shape == (
      2, 5, 5, NUM_CLASSES)


def test_gradients_finite():
  model, variables, _ = _tiny_model_and_variables()
  images = _images()

  # Gradients of the new layers only (a smaller backward graph to compile).
  def loss(heads):
    params = {**variables['params'], **heads}
    out, _ = model.apply({**variables, 'params': params}, images, train=True,
                         rngs={'dropout': _key(7)}, mutable=['batch_stats'])
    return jnp.mean(out['logits'] ** 2) + 0.4 * jnp.mean(out['aux_logits'])

  heads = {name: variables['params'][name] for name in ('head', 'aux_head')}
  grads = jax.jit(jax.grad(loss))(heads)
  leaves = jax.tree.leaves(grads)
  assert all(np.all(np.isfinite(g)) for g in leaves)
  assert np.any(np.asarray(grads['aux_head']['classifier']['bias']) != 0)
  assert np.any(np.asarray(grads['head']['ppm_6']['conv']['kernel']) != 0)


def test_bfloat16_logits_are_float32():
  # Abstract evaluation: dtypes only, nothing compiled.
  model = build.build_model(_tiny_psp(), NUM_CLASSES, dtype=jnp.bfloat16)
  out, variables = jax.eval_shape(
      lambda x: model.init_with_output(_key(0), x, train=False),
      _images(batch=1))
  assert out['logits'].dtype == out['aux_logits'].dtype == jnp.float32
  assert out['features'].dtype == jnp.float32
  assert out['levels']['c4'].dtype == jnp.bfloat16
  assert all(leaf.dtype == jnp.float32
             for leaf in jax.tree.leaves(variables['params']))


def test_resnet101_forward():
  base = defaults.resnet101_model()
  base.width, base.resnet_blocks = 0.0625, (1, 1, 1, 1)
  config = defaults.psp_model(base)
  config.psp_channels, config.psp_aux_channels = 8, 4
  model = build.build_model(config, NUM_CLASSES)
  images = _images(batch=1)
  variables = _variables(model, images)
  out = jax.jit(functools.partial(model.apply, train=False))(variables,
                                                             images)
  # c4 = layer3: 1024 / 16 = 64 channels; c5: 2048 / 16 = 128.
  assert variables['params']['aux_head']['conv']['conv']['kernel'].shape == (
      3, 3, 64, 4)
  assert variables['params']['head']['ppm_1']['conv']['kernel'].shape == (
      1, 1, 128, 8)
  side = build.feature_size(config, 40)       # 40 -> 20 -> 11 -> 6
  assert side == 6
  assert out['logits'].shape == out['aux_logits'].shape == (1, side, side,
                                                            NUM_CLASSES)
  assert np.all(np.isfinite(out['logits']))
  assert np.all(np.isfinite(out['aux_logits']))


# ----------------------------------------------------------------------------
# Configuration and dispatch
# ----------------------------------------------------------------------------
def test_psp_model_defaults():
  base = defaults.resnet38_model()
  config = defaults.psp_model(base)
  assert config.head == 'psp' and base.head == 'linear'   # base untouched
  assert 'psp_channels' not in base
  assert config.psp_channels == 512
  assert tuple(config.psp_pool_scales) == (1, 2, 3, 6)
  assert config.psp_aux_level == 'c4'
  assert config.psp_aux_channels == 256
  assert config.psp_dropout == pytest.approx(0.1)
  assert config.backbone == 'resnet38_psa'
  assert '(params|batch_stats)/aux_head/.*' in config.dont_load
  assert tuple(config.dont_load).count('(params|batch_stats)/aux_head/.*') == 1
  again = defaults.psp_model(config)
  assert tuple(again.dont_load) == tuple(config.dont_load)


def test_build_model_dispatch():
  config = _tiny_psp(psp_pool_scales=(1, 3), psp_dropout=0.2,
                     psp_aux_level='c5')
  model = build.build_model(config, 7)
  assert isinstance(model, pspnet.PSPNet)
  assert (model.num_classes, model.channels, tuple(model.pool_scales),
          model.aux_level, model.aux_channels) == (7, 8, (1, 3), 'c5', 4)
  assert model.dropout == pytest.approx(0.2)
  # Full-size ResNet-38 PSPNet, abstractly (no compute): parameter layout.
  full = build.build_model(defaults.psp_model(defaults.resnet38_model()), 21)
  shapes = build.abstract_variables(full, image_size=33)['params']
  assert set(shapes) == {'backbone', 'head', 'aux_head'}
  # c5 = conv6 (4096) + 4 x 512 pooled = 6144 into the bottleneck;
  # c4 = conv5 (1024) into the aux head.
  assert shapes['head']['bottleneck']['conv']['kernel'].shape == (3, 3, 6144,
                                                                  512)
  assert shapes['aux_head']['conv']['conv']['kernel'].shape == (3, 3, 1024,
                                                                256)
  assert shapes['head']['classifier']['kernel'].shape == (1, 1, 512, 21)
  # Other heads still build Segmenters.
  assert not isinstance(build.build_model(defaults.tiny_model(), 3),
                        pspnet.PSPNet)
  assert 'psp' in build.HEADS


def test_build_head_refuses_psp():
  with pytest.raises(ValueError, match="head='psp'.*build_model"):
    build.build_head(_tiny_psp(), NUM_CLASSES)


@pytest.mark.parametrize('field, value, match', [
    ('psp_channels', 0, 'psp_channels'),
    ('psp_aux_channels', 0, 'psp_aux_channels'),
    ('psp_pool_scales', (), 'psp_pool_scales'),
    ('psp_pool_scales', (1, 0), 'psp_pool_scales'),
    ('psp_pool_scales', (2, 2), 'psp_pool_scales'),
    ('psp_dropout', 1.0, 'psp_dropout'),
    ('psp_dropout', -0.1, 'psp_dropout'),
])
def test_bad_config_raises(field, value, match):
  with pytest.raises(ValueError, match=match):
    build.build_model(_tiny_psp(**{field: value}), NUM_CLASSES)


def test_bad_num_classes_and_aux_level_raise():
  with pytest.raises(ValueError, match='num_classes'):
    build.build_model(_tiny_psp(), 0)
  model = build.build_model(_tiny_psp(psp_aux_level='c2'), NUM_CLASSES)
  with pytest.raises(ValueError, match='aux_level.*c2'):       # VGG: c3..c5
    build.abstract_variables(model, image_size=40)
  model = build.build_model(_tiny_psp(), NUM_CLASSES)
  with pytest.raises(ValueError, match='images'):
    model.init(_key(0), jnp.zeros((1, 40, 40, 1)))
