"""The PyTorch twins of experiments/torch_twins.py against our networks,
losses and optimiser: equal parameter counts and groups, equal outputs with
our parameters copied in, equal loss and SGD updates, equal BAP and Box2Seg
loss terms; and PSA's ResNet-38, whose twin (PSA's module names) is written
here.  torch is an optional extra (not installed in CI)."""

from __future__ import annotations

import functools
import os

import numpy as np
import pytest

torch = pytest.importorskip('torch')
pytestmark = pytest.mark.slow     # 30-50 s on 2 cores (XLA compilations)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

from experiments import torch_twins as tt  # noqa: E402
from wsss_jax import defaults, run, segmentation  # noqa: E402
from wsss_jax.methods.bana import bap as bana_bap  # noqa: E402
from wsss_jax.methods.bana import objective as bana_objective  # noqa: E402
from wsss_jax.methods.box2seg import losses as box2seg_losses  # noqa: E402
from wsss_jax.methods.box2seg import model as box2seg_model  # noqa: E402
from wsss_jax.methods.box2seg import objective as box2seg  # noqa: E402
from wsss_jax.models import build  # noqa: E402
from wsss_jax.ops import image as image_ops  # noqa: E402
from wsss_jax.training import mesh as mesh_lib, optim  # noqa: E402
from wsss_jax.training import state as state_lib, step as step_lib  # noqa: E402
from wsss_jax.models import weights  # noqa: E402
from wsss_jax.tools import convert_weights  # noqa: E402

from torch_reference import PSA_BOTTLENECKS, PSA_RES_BLOCKS  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _flat(tree, prefix=()):
  """{'a/b/leaf': leaf} of a nested dict (leaves kept as they are)."""
  out = {}
  for key, value in tree.items():
    path = prefix + (str(key),)
    if hasattr(value, 'items'):              # dict or FrozenDict
      out.update(_flat(value, path))
    else:
      out['/'.join(path)] = value
  return out


def _randomise(twin, seed):
  """Random BN statistics and affine vectors in `twin` (the init's 0/1
  would hide a swapped mean and variance)."""
  generator = torch.Generator().manual_seed(seed)
  def uniform(tensor):
    tensor.copy_(0.5 + torch.rand(tensor.shape, generator=generator))
  def normal(tensor):
    tensor.copy_(0.1 * torch.randn(tensor.shape, generator=generator))
  with torch.no_grad():
    for module in twin.modules():
      if isinstance(module, torch.nn.BatchNorm2d):
        uniform(module.weight), normal(module.bias)
        normal(module.running_mean), uniform(module.running_var)
      elif isinstance(module, tt.FrozenBatchNorm2d):
        uniform(module.scale), normal(module.bias)
        normal(module.mean), uniform(module.var)


def _variables(twin, model, seed=0):
  """Our variables, taken from a randomised twin: no Flax init to compile.
  Their tree must be the one our init builds (names, shapes)."""
  _randomise(twin, seed)
  variables = tt.flax_variables_from_torch(twin)
  abstract = build.abstract_variables(model)
  shapes = {k: v.shape for c in ('params', 'batch_stats')
            for k, v in _flat(abstract.get(c, {}), (c,)).items()}
  assert {k: v.shape for c in ('params', 'batch_stats')
          for k, v in _flat(variables[c], (c,)).items()} == shapes
  return jax.tree.map(jnp.asarray, variables)


def _images(rng, batch, size):
  return rng.integers(0, 256, (batch, size, size, 3), np.uint8)


def _our_forward(model, variables, images, normalization):
  return jax.jit(lambda v, x: model.apply(
      v, image_ops.normalize_images(x, normalization), train=False))(
          variables, images)


def _assert_close(ours, theirs, rtol, what=''):
  ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
  scale = max(np.max(np.abs(ours)), 1e-12)
  error = np.max(np.abs(ours - theirs)) / scale
  assert error <= rtol, f'{what}: relative error {error:.2e} > {rtol}'


# ----------------------------------------------------------------------------
# Networks
# ----------------------------------------------------------------------------
@pytest.mark.parametrize('make_config', [defaults.tiny_model,
                                         defaults.largefov_model,
                                         defaults.resnet101_model])
def test_parameter_counts_and_groups_equal_ours(make_config):
  config = make_config()
  abstract = build.abstract_variables(build.build_model(config, 21))
  params = abstract['params']
  twin = tt.build_segmenter_twin(config, 21)
  assert tt.param_count(twin) == build.param_count(params)
  # Every array of our tree has its one place in the twin (names, shapes).
  tt.load_flax_params(twin, jax.tree.map(
      lambda leaf: np.zeros(leaf.shape, np.float32), abstract))
  groups = _flat(optim.parameter_groups(params, ('head',)))
  decay = _flat(optim.weight_decay_mask(params))
  expected = {key: (str(groups[key]), bool(decay[key])) for key in groups}
  assert tt.parameter_group_labels(twin, ('head',)) == expected


def _compare_segmenter(config, size, num_classes=5, batch=2, seed=0):
  model = build.build_model(config, num_classes)
  variables = _variables(tt.build_segmenter_twin(config, num_classes), model,
                         seed)
  images = _images(np.random.default_rng(seed), batch, size)
  style = image_ops.normalization_for(config, defaults.input_pipeline())
  ours = _our_forward(model, variables, images, style)['logits']
  twin = tt.build_segmenter_twin(config, num_classes)
  tt.load_flax_params(twin, variables)
  twin.eval()
  with torch.no_grad():
    theirs = twin(tt.normalize_images(torch.from_numpy(images), style))
  return np.asarray(ours), theirs['logits'].permute(0, 2, 3, 1).numpy()


def test_tiny_logits_match_ours():
  ours, theirs = _compare_segmenter(defaults.tiny_model(), 64)
  assert ours.shape == theirs.shape == (2, 8, 8, 5)
  _assert_close(ours, theirs, 1e-4, 'tiny logits')


def test_largefov_and_resnet_topologies_match_ours_on_odd_sizes():
  """Narrow LargeFOV / ResNet (every pool rule, dilation and ASPP branch of
  the full networks, a fraction of the channels) on a 65-px input, where
  floor and ceil pooling differ."""
  largefov = defaults.largefov_model()
  largefov.update(width=1 / 16, fc_dim=16)
  ours, theirs = _compare_segmenter(largefov, 65)
  assert ours.shape == theirs.shape == (2, 9, 9, 5)
  _assert_close(ours, theirs, 1e-4, 'LargeFOV logits')
  resnet = defaults.resnet101_model()
  resnet.update(width=1 / 16, resnet_blocks=(1, 2, 1, 1))
  ours, theirs = _compare_segmenter(resnet, 65)
  side = build.feature_size(resnet, 65)
  assert ours.shape == theirs.shape == (2, side, side, 5)
  _assert_close(ours, theirs, 1e-4, 'ResNet logits')


def test_loaded_parameters_round_trip():
  source = tt.build_segmenter_twin(defaults.tiny_model(), 3)
  _randomise(source, 0)
  variables = tt.flax_variables_from_torch(source)
  twin = tt.build_segmenter_twin(defaults.tiny_model(), 3)
  tt.load_flax_params(twin, variables)
  for key, value in twin.state_dict().items():
    np.testing.assert_array_equal(value.numpy(), source.state_dict()[key],
                                  err_msg=key)
  with pytest.raises(KeyError):
    tt.load_flax_params(twin, {'params': variables['params'],
                               'batch_stats': {}})


# ----------------------------------------------------------------------------
# PSA's ResNet-38: a PyTorch twin with PSA's module names
# ----------------------------------------------------------------------------
class PSAResBlockTwin(torch.nn.Module):
  """Pre-activation two-conv block; returns (sum, x_bn_relu)."""

  def __init__(self, c_in, mid, c_out, stride=1, first_dilation=None,
               dilation=1):
    super().__init__()
    first_dilation = dilation if first_dilation is None else first_dilation
    self.same_shape = c_in == c_out and stride == 1
    self.bn_branch2a = torch.nn.BatchNorm2d(c_in)
    if not self.same_shape:
      self.conv_branch1 = torch.nn.Conv2d(c_in, c_out, 1, stride, bias=False)
    self.conv_branch2a = torch.nn.Conv2d(c_in, mid, 3, stride,
                                         padding=first_dilation,
                                         dilation=first_dilation, bias=False)
    self.bn_branch2b1 = torch.nn.BatchNorm2d(mid)
    self.conv_branch2b1 = torch.nn.Conv2d(mid, c_out, 3, padding=dilation,
                                          dilation=dilation, bias=False)

  def forward(self, x):
    x_bn_relu = torch.relu(self.bn_branch2a(x))
    branch1 = x if self.same_shape else self.conv_branch1(x_bn_relu)
    y = torch.relu(self.bn_branch2b1(self.conv_branch2a(x_bn_relu)))
    return branch1 + self.conv_branch2b1(y), x_bn_relu


class PSABottleneckTwin(torch.nn.Module):
  """Pre-activation bottleneck with Dropout2d; returns (sum, x_bn_relu)."""

  def __init__(self, c_in, c_out, dilation, dropout):
    super().__init__()
    self.bn_branch2a = torch.nn.BatchNorm2d(c_in)
    self.conv_branch1 = torch.nn.Conv2d(c_in, c_out, 1, bias=False)
    self.conv_branch2a = torch.nn.Conv2d(c_in, c_out // 4, 1, bias=False)
    self.bn_branch2b1 = torch.nn.BatchNorm2d(c_out // 4)
    self.dropout_2b1 = torch.nn.Dropout2d(dropout)
    self.conv_branch2b1 = torch.nn.Conv2d(c_out // 4, c_out // 2, 3,
                                          padding=dilation, dilation=dilation,
                                          bias=False)
    self.bn_branch2b2 = torch.nn.BatchNorm2d(c_out // 2)
    self.dropout_2b2 = torch.nn.Dropout2d(dropout)
    self.conv_branch2b2 = torch.nn.Conv2d(c_out // 2, c_out, 1, bias=False)

  def forward(self, x):
    x_bn_relu = torch.relu(self.bn_branch2a(x))
    y = torch.relu(self.bn_branch2b1(self.conv_branch2a(x_bn_relu)))
    y = self.conv_branch2b1(self.dropout_2b1(y))
    y = self.dropout_2b2(torch.relu(self.bn_branch2b2(y)))
    return self.conv_branch1(x_bn_relu) + self.conv_branch2b2(y), x_bn_relu


class PSAResNet38Twin(torch.nn.Module):
  """PSA's ResNet-38 at `width` (every channel count scaled); forward
  returns {'conv4', 'conv5', 'conv6'} NCHW, as PSA's forward_as_dict."""
  DROPOUT = {'b6': 0.3, 'b7': 0.5}

  def __init__(self, width=1.0):
    super().__init__()
    c = lambda n: max(1, int(round(n * width)))
    self.conv1a = torch.nn.Conv2d(3, c(64), 3, padding=1, bias=False)
    self.blocks = [name for name, *_ in PSA_RES_BLOCKS + PSA_BOTTLENECKS]
    for name, c_in, mid, c_out, stride, first_dilation, dilation in (
        PSA_RES_BLOCKS):
      setattr(self, name, PSAResBlockTwin(c(c_in), c(mid), c(c_out), stride,
                                          first_dilation, dilation))
    for name, c_in, c_out, dilation in PSA_BOTTLENECKS:
      setattr(self, name, PSABottleneckTwin(c(c_in), c(c_out), dilation,
                                            self.DROPOUT[name]))
    self.bn7 = torch.nn.BatchNorm2d(c(4096))

  def forward(self, x):
    x, normalised = self.conv1a(x), {}
    for name in self.blocks:
      x, normalised[name] = getattr(self, name)(x)
    return {'conv4': normalised['b5'], 'conv5': normalised['b6'],
            'conv6': torch.relu(self.bn7(x))}


def test_psa_resnet38_twin_matches_ours_through_the_converter(tmp_path):
  """The twin's own state dict, saved as a DataParallel .pth, converted
  (psa_resnet38) and loaded into ours, gives the twin's conv4, conv5 and
  conv6 in inference mode."""
  twin = PSAResNet38Twin(width=1 / 16)
  _randomise(twin, 0)
  source, converted = str(tmp_path / 'res38.pth'), str(tmp_path / 'res38.npz')
  torch.save({f'module.{k}': v for k, v in twin.state_dict().items()}, source)
  report = convert_weights.convert_file(source, 'psa_resnet38', converted)
  assert {k for k, _ in report['unused']} == {
      k for k in twin.state_dict() if k.endswith('num_batches_tracked')}
  assert not [k for k in report['not_produced'] if '/backbone/' in k]
  config = defaults.resnet38_model()
  config.width = 1 / 16
  model = build.build_backbone(config)
  nested = weights.unflatten_variables(weights.read_weights(converted))
  variables = {c: jax.tree.map(jnp.asarray, v['backbone'])
               for c, v in nested.items()}
  images = _images(np.random.default_rng(0), 2, 57)
  ours = _our_forward(model, variables, images, 'imagenet')
  twin.eval()
  with torch.no_grad():
    theirs = twin(tt.normalize_images(torch.from_numpy(images), 'imagenet'))
  assert ours['features'].shape == (2, 8, 8, 256)
  for name, key in (('conv4', 'conv4'), ('conv5', 'conv5'),
                    ('conv6', 'features')):
    # Measured: 3e-7 at most on values up to 0.9 (2 CPU cores).
    np.testing.assert_allclose(ours[key], theirs[name].permute(0, 2, 3, 1),
                               rtol=1e-5, atol=1e-5, err_msg=name)
  # Full width: the same parameter count (PyTorch counts BN affine values,
  # which our frozen BN keeps in batch_stats).
  with torch.device('meta'):
    full = PSAResNet38Twin()
  abstract = build.abstract_variables(
      build.build_backbone(defaults.resnet38_model()))
  affine = sum(int(np.prod(v.shape)) for k, v in weights.flatten_variables(
      abstract['batch_stats']).items() if k.endswith(('/scale', '/bias')))
  assert tt.param_count(full) == build.param_count(abstract['params']) + affine


# ----------------------------------------------------------------------------
# Train step: cross-entropy and SGD with the DeepLab groups
# ----------------------------------------------------------------------------
def test_tiny_cross_entropy_and_sgd_steps_match_ours():
  config, num_classes, size, batch_size = defaults.tiny_model(), 5, 64, 2
  model = build.build_model(config, num_classes)
  variables = _variables(tt.build_segmenter_twin(config, num_classes), model)
  optim_config = defaults.sgd_deeplab(lr=1e-2)
  rng = np.random.default_rng(1)
  labels = rng.integers(0, num_classes, (batch_size, size, size)).astype(
      np.uint8)
  labels[0, :20] = 255                             # ignored pixels
  batch = {'image': _images(rng, batch_size, size), 'mask': labels}
  mesh = mesh_lib.make_mesh()
  make_tx = functools.partial(optim.make_optimizer, optim_config,
                              num_steps=10)
  state = state_lib.create_train_state(model, make_tx, jax.random.PRNGKey(0),
                                       (1, size, size, 3), mesh,
                                       variables=variables)
  train_step = step_lib.make_train_step(
      model, segmentation.cross_entropy_on('mask'), 'imagenet', mesh)
  twin = tt.build_segmenter_twin(config, num_classes)
  tt.load_flax_params(twin, variables)
  torch_step = tt.segmenter_step(twin, optim_config, 10, 'imagenet')
  torch_batch = tt.to_torch_batch(batch)
  before = jax.tree.map(np.asarray, _flat(variables['params']))
  device_batch = mesh_lib.device_batch(batch, mesh)
  for _ in range(2):       # the second step uses momentum and the schedule
    state, metrics = train_step(state, device_batch)
    theirs = torch_step(torch_batch)
    np.testing.assert_allclose(theirs['loss'], float(metrics['loss']),
                               rtol=1e-5)
    np.testing.assert_allclose(theirs['grad_norm'],
                               float(metrics['grad_norm']), rtol=1e-4)
  after = _flat(jax.device_get(state.params))
  twin_after = _flat(tt.flax_variables_from_torch(twin)['params'])
  for key, value in after.items():
    np.testing.assert_allclose(twin_after[key], value, atol=1e-5, err_msg=key)
    # The update itself to 1 % of its size: float32 parameters near 1 hold
    # it to ~3e-3, and the first layers' gradients are sums with
    # cancellation; conv biases before a BatchNorm have a zero gradient (BN
    # removes them) and only rounding-noise updates, left out.
    # test_optimizer_matches_ours_on_given_gradients pins the rule exactly.
    update = value - before[key]
    if np.max(np.abs(update)) > 1e-7:
      _assert_close(update, twin_after[key] - before[key], 1e-2, key)


@pytest.mark.parametrize('optim_config', [defaults.sgd_deeplab(lr=0.1),
                                          defaults.adam_benchmark(lr=0.01)],
                         ids=['sgd', 'adam'])
def test_optimizer_matches_ours_on_given_gradients(optim_config):
  """Three steps with the same gradients: groups, kernel-only decay,
  momentum / Adam moments and the poly schedule (over 4 steps)."""
  twin = tt.build_segmenter_twin(defaults.tiny_model(), 3)
  _randomise(twin, 0)
  params = jax.tree.map(jnp.asarray,
                        tt.flax_variables_from_torch(twin)['params'])
  tx = optim.make_optimizer(optim_config, params, num_steps=4)
  opt_state = tx.init(params)
  update = jax.jit(tx.update)
  optimizer, scheduler = tt.make_optimizer(twin, optim_config, 4)
  named = dict(twin.named_parameters())
  rng = np.random.default_rng(0)
  for _ in range(3):
    grads = jax.tree.map(
        lambda p: rng.normal(0, 0.1, p.shape).astype(np.float32), params)
    updates, opt_state = update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    flat_grads = _flat(grads)
    for name, param in named.items():
      grad = flat_grads[tt.flax_key(twin, name)]
      if grad.ndim == 4:
        grad = grad.transpose(3, 2, 0, 1)
      param.grad = torch.from_numpy(np.ascontiguousarray(grad))
    optimizer.step()
    scheduler.step()
  theirs = _flat(tt.flax_variables_from_torch(twin)['params'])
  for key, value in _flat(params).items():
    # Steps are ~1e-2 (Adam) and ~1e-3 (SGD): 1e-6 is float32 rounding of
    # the two libraries' orders of operations.
    np.testing.assert_allclose(theirs[key], value, rtol=1e-5, atol=1e-6,
                               err_msg=key)


# ----------------------------------------------------------------------------
# BANA stage 1: background-aware pooling
# ----------------------------------------------------------------------------
def _box_batch(rng, batch, size, max_boxes, num_classes):
  boxes = np.zeros((batch, max_boxes, 4), np.float32)
  labels = np.full((batch, max_boxes), -1, np.int32)
  for b in range(batch):
    for k in range(rng.integers(1, max_boxes + 1)):
      x0, y0 = rng.uniform(0, size * 0.6, 2)
      w, h = rng.uniform(size / 10, size * 0.6, 2)
      boxes[b, k] = (x0, y0, min(x0 + w, size), min(y0 + h, size))
      labels[b, k] = rng.integers(1, num_classes)
  valid = np.ones((batch, size, size), bool)
  valid[0, :, size - 7:] = False                   # crop padding
  boxes[-1, 0] = (0, 0, size, size)                # a GAP-fallback image
  labels[-1, 0] = 1
  return {'image': _images(rng, batch, size), 'valid': valid, 'boxes': boxes,
          'box_labels': labels,
          'grabcut': rng.integers(0, num_classes, (batch, size, size),
                                  dtype=np.uint8)}


@pytest.mark.parametrize('compat, balance_rows', [
    (dict(bap_roi_grid=(1, 1), bap_sampling='aligned'), True),
    (dict(bap_roi_grid=(2, 2), bap_sampling='grid_sample_ac_false'), False)])
def test_labeler_loss_and_gradients_match_ours(compat, balance_rows):
  config = bana_objective.classifier_config(
      run.load_config_file(os.path.join(REPO, 'configs', 'bana.py'), ''),
      'bap')
  config.bana.compat.update(compat)
  config.bana.balance_rows = balance_rows
  options = bana_objective.BapOptions.from_config(config.bana)
  rng = np.random.default_rng(2)
  size, dim, num_classes = 48, 8, 4
  batch = _box_batch(rng, 4, size, 3, num_classes)
  features = rng.normal(size=(4, 6, 6, dim)).astype(np.float32)
  kernel = rng.normal(size=(dim, num_classes)).astype(np.float32)

  def ours_fn(features, kernel):
    loss, metrics = bana_objective.classifier_loss(options)(
        {'features': features}, jax.tree.map(jnp.asarray, batch),
        step_lib.LossContext(jnp.zeros((), jnp.int32), None,
                             {'head': {'classifier': {
                                 'kernel': kernel[None, None]}}}))
    return loss, metrics
  (loss, metrics), grads = jax.jit(jax.value_and_grad(
      ours_fn, argnums=(0, 1), has_aux=True))(features, kernel)

  head = torch.nn.Module()
  head.classifier = torch.nn.Conv2d(dim, num_classes, 1, bias=False)
  holder = torch.nn.Module()
  holder.head = head
  with torch.no_grad():
    head.classifier.weight.copy_(torch.from_numpy(kernel.T[:, :, None, None]))
  torch_features = torch.from_numpy(features.transpose(0, 3, 1, 2).copy())
  torch_features.requires_grad_(True)
  theirs, their_metrics = tt.labeler_loss(options)(
      {'features': torch_features}, tt.to_torch_batch(batch),
      tt.LossContext(0, holder))
  theirs.backward()
  np.testing.assert_allclose(theirs.item(), float(loss), rtol=1e-6)
  for name in ('fg_accuracy', 'bg_accuracy', 'num_fg_rows', 'num_bg_rows'):
    np.testing.assert_allclose(float(their_metrics[name]),
                               float(metrics[name]), rtol=1e-6)
  _assert_close(grads[0], torch_features.grad.permute(0, 2, 3, 1), 1e-5,
                'd loss / d features')
  _assert_close(grads[1], head.classifier.weight.grad[:, :, 0, 0].T, 1e-5,
                'd loss / d kernel')


def test_bap_forward_parts_match_ours():
  rng = np.random.default_rng(3)
  batch = _box_batch(rng, 3, 40, 4, 5)
  features = rng.normal(size=(3, 5, 5, 6)).astype(np.float32)
  args = dict(grid=4, roi_grid=(1, 1), sampling='aligned', pooling='bap',
              min_background_fraction=0.125)
  ours = jax.jit(functools.partial(bana_bap.bap_forward, **args))(
      features, batch['boxes'], batch['box_labels'], batch['valid'])
  theirs = tt.bap_forward(torch.from_numpy(features),
                          torch.from_numpy(batch['boxes']),
                          torch.from_numpy(batch['box_labels']),
                          torch.from_numpy(batch['valid']), **args)
  for key in ('fg_labels', 'query_valid', 'fallback', 'sample_valid'):
    np.testing.assert_array_equal(theirs[key].numpy(), np.asarray(ours[key]),
                                  err_msg=key)
  for key in ('fg', 'queries', 'attention', 'background_fraction'):
    np.testing.assert_allclose(theirs[key].numpy(), np.asarray(ours[key]),
                               rtol=1e-5, atol=1e-6, err_msg=key)


# ----------------------------------------------------------------------------
# Box2Seg
# ----------------------------------------------------------------------------
def _box2seg_config(variant=''):
  return run.load_config_file(os.path.join(REPO, 'configs', 'box2seg.py'),
                              variant)


def test_box2seg_network_matches_ours():
  config = _box2seg_config('tiny')
  num_classes, size = 4, 48
  model = box2seg_model.build_box2seg_model(config, num_classes)
  twin = tt.build_box2seg_twin(config, num_classes)
  variables = _variables(twin, model)
  images = _images(np.random.default_rng(4), 2, size)
  ours = _our_forward(model, variables, images, 'imagenet')
  assert tt.param_count(twin) == build.param_count(variables['params'])
  twin = tt.build_box2seg_twin(config, num_classes)
  tt.load_flax_params(twin, variables)
  twin.eval()
  with torch.no_grad():
    theirs = tt.channels_last(twin(tt.normalize_images(
        torch.from_numpy(images), 'imagenet')))
  for key in ('logits', 'attention_logits', 'embeddings', 'features'):
    _assert_close(ours[key], theirs[key].numpy(), 1e-4, key)


def _box2seg_outputs(rng, batch, grid, num_classes, embed_dim):
  shape = (batch, grid, grid)
  return {'logits': rng.normal(size=shape + (num_classes,)),
          'attention_logits': rng.normal(size=shape + (num_classes - 1,)),
          'embeddings': rng.normal(size=shape + (embed_dim,))}


def test_box2seg_loss_terms_match_ours():
  config = _box2seg_config()
  config.box2seg.weights.affinity = 0.0     # the one sampled term, below
  options = box2seg.Box2SegLossOptions.from_config(config.box2seg)
  rng = np.random.default_rng(5)
  num_classes, size, grid = 5, 64, 16
  batch = _box_batch(rng, 4, size, 4, num_classes)
  batch['grabcut'][1, :8] = 255
  outputs = {k: v.astype(np.float32) for k, v in _box2seg_outputs(
      rng, 4, grid, num_classes, 6).items()}
  step = 120                                 # inside the λ_AW warm-up
  ours_fn = box2seg.train_loss(options, num_classes)
  loss, metrics = jax.jit(lambda o, b: ours_fn(o, b, step_lib.LossContext(
      jnp.asarray(step), jax.random.PRNGKey(0), None)))(outputs, batch)
  their_outputs = {k: torch.from_numpy(v).permute(0, 3, 1, 2)
                   for k, v in outputs.items()}
  theirs, their_metrics = tt.box2seg_train_loss(options, num_classes)(
      their_outputs, tt.to_torch_batch(batch), tt.LossContext(step, None))
  np.testing.assert_allclose(theirs.item(), float(loss), rtol=1e-5)
  for name in ('grabcut', 'aw', 'alpha', 'attention_fill'):
    np.testing.assert_allclose(float(their_metrics[name]),
                               float(metrics[name]), rtol=1e-5, err_msg=name)

  ours_targets = jax.jit(functools.partial(
      box2seg.grid_targets, num_classes=num_classes))(outputs, batch)
  their_targets = tt.grid_targets(tt.channels_last(their_outputs),
                                  tt.to_torch_batch(batch), num_classes)
  for key, value in ours_targets.items():
    np.testing.assert_array_equal(their_targets[key].numpy(),
                                  np.asarray(value), err_msg=key)

  # L_A on the same sampled cells; the samplers agree per class within one.
  labels = np.asarray(ours_targets['mask_labels']).reshape(4, -1)
  valid = np.asarray(ours_targets['valid_mask']).reshape(4, -1)
  count = box2seg.num_affinity_samples(0.1, grid * grid)
  index, picked = jax.device_get(jax.jit(
      box2seg_losses.class_balanced_sample, static_argnums=3)(
          labels, valid, jax.random.PRNGKey(1), count))
  their_index, their_picked = tt.class_balanced_sample(
      torch.from_numpy(labels.copy()), torch.from_numpy(valid.copy()), count)
  for b in range(4):
    ours_counts = np.bincount(labels[b][index[b]][picked[b]], minlength=256)
    their_counts = np.bincount(labels[b][their_index[b].numpy()][
        their_picked[b].numpy()], minlength=256)
    assert np.abs(ours_counts - their_counts).max() <= 1
  beta = rng.normal(size=(4, count, 6)).astype(np.float32)
  y = rng.dirichlet(np.ones(num_classes), (4, count)).astype(np.float32)
  ours_affinity = jax.jit(box2seg_losses.affinity_loss, static_argnums=3)(
      beta, y, picked, 'mean')
  their_affinity = tt.affinity_loss(torch.from_numpy(beta),
                                    torch.from_numpy(y),
                                    torch.from_numpy(picked.copy()), 'mean')
  np.testing.assert_allclose(their_affinity.item(), float(ours_affinity),
                             rtol=1e-5)
