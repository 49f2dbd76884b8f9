"""PMM's SEAM network and losses (seam.py, seam_losses.py) by hand-computed
cases, edge cases and the tiny benchmark network."""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from wsss_jax import defaults
from wsss_jax.methods.pmm import seam
from wsss_jax.methods.pmm import seam_losses as L
from wsss_jax.ops.resize import resize_bilinear

EPS = 1e-5


def _finite_tree(tree):
  return all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(tree))


def _maps(*channels, h=2, w=2):
  """(1, h, w, C) from C lists of h·w values in row-major pixel order."""
  return jnp.asarray(np.stack([np.reshape(c, (h, w)) for c in channels],
                              axis=-1)[None], jnp.float32)


# ----------------------------------------------------------------------------
# max_norm
# ----------------------------------------------------------------------------
def test_max_norm_by_hand():
  # (1, 1, 3, 1) map [-1, 2, 3]: ReLU -> [0, 2, 3], min 0, max 3:
  # [(0 - 0 - e)_+, (2 - e), (3 - e)] / (3 + e).
  cam = jnp.asarray([-1.0, 2.0, 3.0]).reshape(1, 1, 3, 1)
  np.testing.assert_allclose(
      np.asarray(L.max_norm(cam)).ravel(),
      [0.0, (2 - EPS) / (3 + EPS), (3 - EPS) / (3 + EPS)], rtol=1e-6)
  # [1, 2, 3]: min 1, max 3: [0, (1 - e) / (2 + e), (2 - e) / (2 + e)].
  cam = jnp.asarray([1.0, 2.0, 3.0]).reshape(1, 1, 3, 1)
  np.testing.assert_allclose(
      np.asarray(L.max_norm(cam)).ravel(),
      [0.0, (1 - EPS) / (2 + EPS), (2 - EPS) / (2 + EPS)], rtol=1e-6)


def test_max_norm_constant_and_negative_channels_are_zero_and_finite():
  cam = jnp.stack([jnp.full((1, 2, 2), 0.7), jnp.full((1, 2, 2), -3.0)], -1)
  out, grad = jax.value_and_grad(lambda c: jnp.sum(L.max_norm(c)))(cam)
  assert float(out) == 0.0
  assert bool(jnp.all(jnp.isfinite(grad)))


# ----------------------------------------------------------------------------
# ER
# ----------------------------------------------------------------------------
def test_equivariance_loss_by_hand():
  # C = 3 (bg, a, b), h = w = 2.  Channel a differs by 0.1 and 0.3 on two
  # pixels; channel b differs everywhere but class b is absent -> masked.
  # ER = (0.1 + 0 + 0.3 + 0 + 0 * 4) / (2 * 2 * 2) = 0.05.
  c1 = _maps([9, 9, 9, 9], [0.2, 0.4, 0.6, 0.8], [1, 1, 1, 1])
  c2 = _maps([0, 0, 0, 0], [0.1, 0.4, 0.9, 0.8], [0, 0, 0, 0])
  labels_bg = jnp.asarray([[1.0, 1.0, 0.0]])
  np.testing.assert_allclose(float(L.equivariance_loss(c1, c2, labels_bg)),
                             0.05, rtol=1e-6)
  # With class b present: + 4 · 1 -> (0.4 + 4) / 8 = 0.55.
  np.testing.assert_allclose(
      float(L.equivariance_loss(c1, c2, jnp.asarray([[1.0, 1.0, 1.0]]))),
      0.55, rtol=1e-6)
  # No class present: 0.
  assert float(L.equivariance_loss(c1, c2, jnp.asarray([[1.0, 0, 0]]))) == 0


# ----------------------------------------------------------------------------
# ECR
# ----------------------------------------------------------------------------
# C = 2, h = w = 2, label [1].  Background := 1 - fg for the CAMs:
#   cam1_small fg [.2 .4 .6 .8] -> bg [.8 .6 .4 .2]
#   cam2       fg [.1 .4 .9 .8] -> bg [.9 .6 .1 .2]
#   cam_rv1_small bg [.5 .5 .5 .5], fg [0 .5 1 .5]
#   cam_rv2       bg [1 0 0 0],     fg [0 0 0 0]
# |target(cam2) - rv1|: bg [.4 .1 .4 .3], fg [.1 .1 .1 .3]
# |target(cam1) - rv2|: bg [.2 .6 .4 .2], fg [.2 .4 .6 .8]
# top 0.2: k = int(2·2·2·0.2) = 1 -> .4 + .8 = 1.2
# top 0.5: k = 4 -> (.4+.4+.3+.3)/4 + (.8+.6+.6+.4)/4 = .35 + .6 = .95
ECR_CAM1 = _maps([0, 0, 0, 0], [0.2, 0.4, 0.6, 0.8])
ECR_CAM2 = _maps([0, 0, 0, 0], [0.1, 0.4, 0.9, 0.8])
ECR_RV1 = _maps([0.5, 0.5, 0.5, 0.5], [0.0, 0.5, 1.0, 0.5])
ECR_RV2 = _maps([1.0, 0, 0, 0], [0.0, 0, 0, 0])
ONE = jnp.asarray([[1.0, 1.0]])


def test_equivariant_cross_loss_by_hand():
  args = (ECR_CAM1, ECR_CAM2, ECR_RV1, ECR_RV2, ONE)
  np.testing.assert_allclose(float(L.equivariant_cross_loss(*args)), 1.2,
                             rtol=1e-6)
  np.testing.assert_allclose(
      float(L.equivariant_cross_loss(*args, top=0.5)), 0.95, rtol=1e-6)


def test_equivariant_cross_loss_max_onehot_and_labels_by_hand():
  # One pixel, C = 3, top 1 (k = 3: the mean of all entries).
  # cam2 fg [.3 .7] -> bg .3, one-hot [.3 0 .7]; rv1 [.2 .2 .2]:
  #   |.| = [.1 .2 .5] -> .8/3.
  # cam1 fg [.6 .6] (tie, both kept) -> bg .4: [.4 .6 .6]; rv2 0: 1.6/3.
  c1 = _maps([0], [0.6], [0.6], h=1, w=1)
  c2 = _maps([0], [0.3], [0.7], h=1, w=1)
  rv1 = _maps([0.2], [0.2], [0.2], h=1, w=1)
  rv2 = _maps([0.0], [0.0], [0.0], h=1, w=1)
  both = jnp.asarray([[1.0, 1.0, 1.0]])
  np.testing.assert_allclose(
      float(L.equivariant_cross_loss(c1, c2, rv1, rv2, both, top=1.0)),
      2.4 / 3, rtol=1e-6)
  # Only class 1 present: cam2 -> [., .3, 0] -> [.7 .3 0], rv1 -> [.2 .2 0]:
  #   [.5 .1 0] -> .6/3;  cam1 -> [.4 .6 0] against 0 -> 1/3.
  first = jnp.asarray([[1.0, 1.0, 0.0]])
  np.testing.assert_allclose(
      float(L.equivariant_cross_loss(c1, c2, rv1, rv2, first, top=1.0)),
      1.6 / 3, rtol=1e-6)


def test_max_onehot_keeps_values_and_background():
  x = _maps([0.9], [0.3], [0.7], h=1, w=1)
  np.testing.assert_allclose(np.asarray(L.max_onehot(x)).ravel(),
                             [0.9, 0.0, 0.7])


def test_ecr_stops_the_gradient_of_the_targets():
  grads = jax.grad(lambda c1, c2, r1, r2: L.equivariant_cross_loss(
      c1, c2, r1, r2, ONE, top=0.5), argnums=(0, 1, 2, 3))(
          ECR_CAM1, ECR_CAM2, ECR_RV1, ECR_RV2)
  assert float(jnp.abs(grads[0]).sum()) == 0.0
  assert float(jnp.abs(grads[1]).sum()) == 0.0
  assert float(jnp.abs(grads[2]).sum()) > 0.0
  assert float(jnp.abs(grads[3]).sum()) > 0.0


# ----------------------------------------------------------------------------
# adaptive min-pooling
# ----------------------------------------------------------------------------
def test_adaptive_min_pooling_by_hand():
  # h = 2, w = 4 -> k = 8 // 4 = 2; C = 3.  Image 1, labels [1, 0]:
  # class 2 masked to 0, so the fg max is max(ch1, 0) =
  # [.5 0 .3 .1 .9 .05 .4 .6]; the 2 lowest: 0, .05 -> ReLU sum .05.
  # Image 2 has no class: all 0.  Loss = .05 / (k·B) = .05 / 4 = .0125.
  ch1 = [0.5, -0.2, 0.3, 0.1, 0.9, 0.05, 0.4, 0.6]
  img1 = _maps([7] * 8, ch1, [5] * 8, h=2, w=4)
  img2 = _maps([7] * 8, [3] * 8, [5] * 8, h=2, w=4)
  cam_rv = jnp.concatenate([img1, img2])
  labels_bg = jnp.asarray([[1.0, 1, 0], [1.0, 0, 0]])
  np.testing.assert_allclose(
      float(L.adaptive_min_pooling_loss(cam_rv, labels_bg)), 0.0125,
      rtol=1e-6)
  # Both classes of image 1 present, class 2 at .7: max = [.7 .7 .7 .7 .9
  # .7 .7 .7]; lowest 2: .7 + .7 = 1.4; over k·B = 2: .7.
  img1 = _maps([7] * 8, ch1, [0.7] * 8, h=2, w=4)
  np.testing.assert_allclose(
      float(L.adaptive_min_pooling_loss(img1, jnp.asarray([[1.0, 1, 1]]))),
      0.7, rtol=1e-6)


# ----------------------------------------------------------------------------
# PCM
# ----------------------------------------------------------------------------
def test_pcm_normalize_by_hand():
  # h = 1, w = 3, C = 3; pixels p0 [3 2 1], p1 [0 1 4], p2 [1 -1 2].
  # ch1: ReLU [2 1 0], peak 2 + e -> [(2-e), (1-e), 0] / (2+e) ~ [1 .5 0]
  # ch2: ReLU [1 4 2], peak 4 + e -> [(1-e), (4-e), (2-e)] / (4+e)
  #      ~ [.25 1 .5]
  # fg max: p0 ch1 (ch2 zeroed), p1 ch2 (ch1 zeroed), p2 ch2 (ch1 = 0).
  cam = jnp.asarray([[[[3.0, 2, 1], [0, 1, 4], [1, -1, 2]]]])
  n1 = [(2 - EPS) / (2 + EPS), (1 - EPS) / (2 + EPS), 0.0]
  n2 = [(1 - EPS) / (4 + EPS), (4 - EPS) / (4 + EPS), (2 - EPS) / (4 + EPS)]
  expected = [[1 - n1[0], n1[0], 0.0], [1 - n2[1], 0.0, n2[1]],
              [1 - n2[2], 0.0, n2[2]]]
  np.testing.assert_allclose(np.asarray(seam.pcm_normalize(cam))[0, 0],
                             expected, rtol=1e-6, atol=1e-7)
  # No gradient reaches the CAM through the PCM input.
  grad = jax.grad(lambda c: jnp.sum(seam.pcm_normalize(c)))(cam)
  assert float(jnp.abs(grad).sum()) == 0.0


# 2 × 2 grid, D = 2: f0 [1 0], f1 [0 2], f2 [1 1], f3 [0 0] (a zero vector).
# Normalised: [1 0], [0 1], [1 1]/√2, 0.  A = ReLU(f̂ᵀf̂):
#   A00 = A11 = A22 = 1, A02 = A12 = 1/√2, A01 = 0, row/column 3 = 0.
# Column sums: 1 + 1/√2, 1 + 1/√2, 1 + √2, 0 (+ 1e-5).
# cam ch0 = [1 0 0 0], ch1 = [0 1 .5 1]:
#   ch0: j0 1/(1 + 1/√2) = 2 - √2, j1 0, j2 (1/√2)/(1 + √2) = 1 - 1/√2, j3 0
#   ch1: j0 (.5/√2)/(1 + 1/√2) = (√2 - 1)/2,
#        j1 (1 + .5/√2)/(1 + 1/√2) = (3 - √2)/2 = 0.79289,
#        j2 (1/√2 + .5)/(1 + √2) = 1/2, j3 0.
PCM_FEATS = jnp.asarray([[[[1.0, 0], [0, 2]], [[1, 1], [0, 0]]]])
PCM_CAM = _maps([1, 0, 0, 0], [0, 1, 0.5, 1])


def test_pcm_affinity_by_hand():
  r = 1 / math.sqrt(2)
  raw = np.asarray([[1, 0, r, 0], [0, 1, r, 0], [r, r, 1, 0], [0, 0, 0, 0]])
  expected = raw / (raw.sum(0, keepdims=True) + EPS)
  np.testing.assert_allclose(np.asarray(seam.pcm_affinity(PCM_FEATS))[0],
                             expected, rtol=1e-4, atol=1e-6)


def test_pcm_propagate_by_hand():
  s2 = math.sqrt(2)
  out = np.asarray(seam.pcm_propagate(PCM_CAM, PCM_FEATS))[0].reshape(4, 2)
  np.testing.assert_allclose(out[:, 0], [2 - s2, 0, 1 - 1 / s2, 0],
                             rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(out[:, 1], [(s2 - 1) / 2, (1 + 0.5 / s2) /
                                         (1 + 1 / s2), 0.5, 0],
                             rtol=1e-4, atol=1e-6)


def test_pcm_propagate_gradient_finite_with_zero_features():
  grad = jax.grad(lambda f: jnp.sum(seam.pcm_propagate(PCM_CAM, f) ** 2))(
      PCM_FEATS)
  assert bool(jnp.all(jnp.isfinite(grad)))
  grad = jax.grad(lambda f: jnp.sum(seam.pcm_propagate(PCM_CAM, f)))(
      jnp.zeros((1, 2, 2, 2)))
  assert bool(jnp.all(jnp.isfinite(grad)))


# ----------------------------------------------------------------------------
# The network on the benchmark backbone
# ----------------------------------------------------------------------------
NUM_CLASSES = 4     # K = 3


def _config(**pmm):
  model = defaults.tiny_model()
  model.width = 0.0625
  config = ml_collections.ConfigDict({'model': model})
  if pmm:
    config.pmm = ml_collections.ConfigDict(pmm)
  return config


LABELS = jnp.asarray([[1.0, 0, 1], [0, 0, 0]])     # the second row is empty


@pytest.fixture(scope='module')
def net():
  """Everything the network tests read, from two compilations (init and one
  jitted function), so that each test stays fast."""
  model = seam.build_seam_model(_config(), NUM_CLASSES)
  images = jax.random.normal(jax.random.PRNGKey(0), (2, 32, 32, 3))
  # An RBG key: initialising the backbone with threefry keys compiles for
  # ~10 s on a CPU, with RBG keys in ~2 s.
  variables = jax.jit(lambda key, x: model.init(key, x, train=False))(
      jax.random.key(1, impl='unsafe_rbg'), images)
  stats = variables['batch_stats']

  def train_forward(params, x):
    return model.apply({'params': params, 'batch_stats': stats}, x,
                       train=True, rngs={'dropout': jax.random.PRNGKey(2)},
                       mutable=['batch_stats'])[0]

  @jax.jit
  def run(params, x):
    # One forward and one (batched) backward pass for four objectives: the
    # loss with and without rvmin, Σ cam_rv1 and Σ cam1.
    out, backward = jax.vjp(lambda p: train_forward(p, x), params)
    r = {'out': out}
    # View 2 alone: the images resized bilinearly (align_corners=True).
    small = resize_bilinear(x, (9, 9), align_corners=True)
    r['view2'] = model.apply({'params': params, 'batch_stats': stats}, small,
                             True, method=lambda m, y, t: m.view(y, train=t),
                             mutable=['batch_stats'])[0]
    r['eval'] = model.apply({'params': params, 'batch_stats': stats}, x,
                            train=False)
    r['inference_cam'] = model.apply({'params': params, 'batch_stats': stats},
                                     x, method='inference_cam')
    losses, cotangents = [], []
    for rvmin in (True, False):
      value = L.seam_loss(out, LABELS, rvmin=rvmin)
      cot = jax.grad(lambda o: L.seam_loss(o, LABELS, rvmin=rvmin)[0])(out)
      losses.append(value)
      cotangents.append(cot)
    for key in ('cam_rv1', 'cam1'):
      cotangents.append({k: (jnp.ones_like(v) if k == key
                             else jnp.zeros_like(v)) for k, v in out.items()})
    stacked = jax.tree.map(lambda *c: jnp.stack(c), *cotangents)
    grads = jax.vmap(lambda c: backward(c)[0])(stacked)
    grad = lambda i: jax.tree.map(lambda g: g[i], grads)
    r['loss_True'] = (losses[0], grad(0))
    r['loss_False'] = (losses[1], grad(1))
    r['grad_cam_rv1'], r['grad_cam1'] = grad(2), grad(3)
    return r

  # A non-negative classifier on the non-negative fc7 features: positive,
  # spatially varying CAMs, so that every loss term has a gradient (with an
  # initial classifier all CAMs can be negative, PCM's input is then 0 and
  # cam_rv constant).
  params = dict(variables['params'])
  params['classifier'] = {'kernel': jnp.abs(params['classifier']['kernel'])}
  variables = {'params': params, 'batch_stats': stats}
  return variables, run(params, images)


def test_network_outputs_and_parameter_tree(net):
  variables, r = net
  params = variables['params']
  assert set(params) == {'backbone', 'classifier', 'pcm'}
  assert set(params['pcm']) == {'f8_3', 'f8_4', 'f9'}
  assert 'bias' not in params['classifier']
  assert params['classifier']['kernel'].shape == (1, 1, 128, NUM_CLASSES)
  # c4 = conv4_3 (512 / 16 = 32 ch), c5 = fc7 (128 ch); f9 sees 3 + 64 + 128.
  assert params['pcm']['f8_3']['kernel'].shape == (1, 1, 32, 64)
  assert params['pcm']['f8_4']['kernel'].shape == (1, 1, 128, 128)
  assert params['pcm']['f9']['kernel'].shape == (1, 1, 195, 192)
  assert all('bias' not in params['pcm'][n] for n in ('f8_3', 'f8_4', 'f9'))

  out = r['out']
  shapes = {k: v.shape for k, v in out.items()}
  assert shapes == {
      'cam1': (2, 32, 32, 4), 'cam_rv1': (2, 32, 32, 4),
      'class_logits1': (2, 3), 'cam2': (2, 9, 9, 4), 'cam_rv2': (2, 9, 9, 4),
      'class_logits2': (2, 3), 'logits': (2, 32, 32, 4),
      'class_logits': (2, 3)}
  np.testing.assert_array_equal(out['logits'], out['cam_rv1'])
  np.testing.assert_allclose(out['class_logits2'],
                             jnp.mean(out['cam2'][..., 1:], axis=(1, 2)),
                             rtol=1e-5, atol=1e-6)
  # View 2 is the images resized bilinearly with align_corners=True to 9×9
  # (floor(32 · 0.3)).
  np.testing.assert_allclose(out['cam2'], r['view2'][0], rtol=1e-4,
                             atol=1e-4)
  np.testing.assert_allclose(out['cam_rv2'], r['view2'][1], rtol=1e-4,
                             atol=1e-4)

  evaluation = r['eval']
  assert set(evaluation) == {'cam1', 'cam_rv1', 'class_logits1', 'logits',
                             'class_logits'}
  assert r['inference_cam'].shape == (2, 32, 32, 3)
  np.testing.assert_allclose(r['inference_cam'],
                             evaluation['cam_rv1'][..., 1:], rtol=1e-5,
                             atol=1e-6)


def test_seam_loss_gradient_finite_including_an_empty_label_row(net):
  _, r = net
  for rvmin in (True, False):
    (total, metrics), grads = r[f'loss_{rvmin}']
    assert set(metrics) == {'cls', 'er', 'ecr', 'rvmin'}
    assert _finite_tree((total, metrics, grads))
    expected = metrics['cls'] + metrics['er'] + metrics['ecr'] + (
        metrics['rvmin'] if rvmin else 0.0)
    np.testing.assert_allclose(float(total), float(expected), rtol=1e-6)
    assert float(jnp.abs(grads['pcm']['f9']['kernel']).sum()) > 0
    assert float(jnp.abs(grads['classifier']['kernel']).sum()) > 0


def test_pcm_gradient_only_through_cam_rv(net):
  _, r = net
  # cam_rv's gradient reaches only the PCM convolutions ...
  grads = r['grad_cam_rv1']
  assert all(float(jnp.abs(g).sum()) == 0.0
             for g in jax.tree.leaves((grads['backbone'],
                                       grads['classifier'])))
  assert float(jnp.abs(grads['pcm']['f8_3']['kernel']).sum()) > 0
  # ... and the CAM's never does.
  grads = r['grad_cam1']
  assert all(float(jnp.abs(g).sum()) == 0.0
             for g in jax.tree.leaves(grads['pcm']))
  assert float(jnp.abs(grads['classifier']['kernel']).sum()) > 0


# ----------------------------------------------------------------------------
# Construction and bad arguments
# ----------------------------------------------------------------------------
def test_build_reads_pmm_section_and_defaults():
  model = seam.build_seam_model(_config(), NUM_CLASSES)
  assert (model.second_view_scale, tuple(model.pcm_levels),
          tuple(model.pcm_channels)) == (0.3, ('c4', 'c5'), (64, 128))
  model = seam.build_seam_model(
      _config(second_view_scale=0.5, pcm_levels=('c3', 'c5')), NUM_CLASSES)
  assert (model.second_view_scale, tuple(model.pcm_levels),
          tuple(model.pcm_channels)) == (0.5, ('c3', 'c5'), (64, 128))
  assert seam.second_view_size(32, 10, 0.3) == (9, 3)


def test_bad_arguments_raise_value_error():
  with pytest.raises(ValueError, match='pcm_levels'):
    seam.build_seam_model(_config(pcm_levels=('c4',)), NUM_CLASSES)
  with pytest.raises(ValueError, match='second_view_scale'):
    seam.build_seam_model(_config(second_view_scale=0.0), NUM_CLASSES)
  with pytest.raises(ValueError, match='num_classes'):
    seam.build_seam_model(_config(), 1)
  model = seam.build_seam_model(_config(pcm_levels=('c4', 'c9')), NUM_CLASSES)
  with pytest.raises(ValueError, match='pcm_levels'):
    jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x),
                   jax.ShapeDtypeStruct((1, 16, 16, 3), jnp.float32))
  with pytest.raises(ValueError, match='second_view_scale'):
    seam.second_view_size(3, 3, 0.3)
  with pytest.raises(ValueError, match='ecr_top'):
    L.equivariant_cross_loss(ECR_CAM1, ECR_CAM2, ECR_RV1, ECR_RV2, ONE,
                             top=0.0)
  with pytest.raises(ValueError, match='labels_bg'):
    L.equivariance_loss(ECR_CAM1, ECR_CAM2, jnp.ones((1, 3)))
  with pytest.raises(ValueError, match='cam_rv'):
    L.adaptive_min_pooling_loss(jnp.ones((2, 2, 2)), ONE)


def test_classifier_dropout_drops_whole_channels_in_training_only():
  import flax.linen as nn  # pylint: disable=g-import-not-at-top

  class Features(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
      return {'features': x[:, ::8, ::8] * 0 + 1.0,
              'levels': {'c4': x[:, ::8, ::8], 'c5': x[:, ::8, ::8]}}

  net = seam.SEAMNet(backbone=Features(), num_classes=3,
                     classifier_dropout=0.5)
  x = jnp.ones((2, 16, 16, 3))
  variables = net.init(jax.random.PRNGKey(0), x, train=False)
  kernel = variables['params']['classifier']['kernel']
  variables = {'params': {**variables['params'], 'classifier': {
      'kernel': jnp.ones_like(kernel)}}}
  # Inference: no dropout, every feature channel (3 of value 1) counts.
  cam = net.apply(variables, x, train=False)['cam1']
  np.testing.assert_allclose(cam, 3.0, rtol=1e-6)
  # Training: each (image, channel) is kept x2 or dropped, the same at every
  # pixel, so the raw CAM is constant per image and a multiple of 2.
  out = net.apply(variables, x, train=True,
                  rngs={'dropout': jax.random.PRNGKey(3)})
  cam = np.asarray(out['cam1'])
  for image in cam:
    np.testing.assert_allclose(image, image.flat[0], rtol=1e-6)
    assert image.flat[0] in (0.0, 2.0, 4.0, 6.0)
  assert set(cam[:, 0, 0, 0]) != {6.0}      # something was dropped
  with pytest.raises(ValueError, match='classifier_dropout'):
    seam.SEAMNet(backbone=Features(), num_classes=3,
                 classifier_dropout=1.0).init(jax.random.PRNGKey(0), x)
