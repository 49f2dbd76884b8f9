"""PyTorch twins of our jitted train steps, for side-by-side timing (issue 11).

Our own PyTorch code, written from the wsss_jax modules each part mirrors (no
official repository copied):

  networks    `SegmenterTwin` (wsss_jax.models.build.build_model: VGG16
              LargeFOV with optional BatchNorm, DeepLab-v2 ResNet-101, the
              linear and ASPP-v2 heads) and `Box2SegTwin`
              (wsss_jax.methods.box2seg.model: encoder, UPerNet decoder,
              y / α / β branches);
  losses      `cross_entropy_on` (wsss_jax.segmentation, i.e.
              wsss_jax.losses.segmentation_cross_entropy), `box2seg_train_loss`
              (wsss_jax.methods.box2seg.objective.train_loss) and
              `labeler_loss` (wsss_jax.methods.bana.objective.classifier_loss:
              `bap_forward` + `bap_loss`);
  optimiser   `make_optimizer` (wsss_jax.training.optim.make_optimizer):
              torch SGD or Adam over parameter groups with the learning-rate
              multipliers and the kernel-only weight decay, and a LambdaLR
              for the schedule;
  step        `TrainStep`: normalise the uint8 batch, forward, loss,
              backward, gradient norm, optimiser and scheduler step (what
              wsss_jax.training.step.make_train_step's jitted step does).

    twin = build_segmenter_twin(defaults.tiny_model(), num_classes=7)
    load_flax_params(twin, variables)      # our {'params', 'batch_stats'}
    optimizer, scheduler = make_optimizer(twin, defaults.sgd_deeplab(), 1000)
    step = TrainStep(twin, cross_entropy_on('mask'), optimizer, scheduler,
                     'imagenet')
    metrics = step(to_torch_batch(numpy_batch))

Names.  Every torch module carries the name of the Flax module it mirrors
(`backbone.conv1_1`, `backbone.layer3.block2.shortcut_bn`, `head.c0`,
`decoder.ppm_1.bn`, ...): the names `wsss_jax.tools.convert_weights`
produces, so a Flax path is a torch name and `load_flax_params` only converts
leaves (kernel HWIO -> weight OIHW; BN scale/bias/mean/var -> weight/bias/
running_mean/running_var, convert_weights' table read backwards).  Frozen BN
(`FrozenBatchNorm2d`) keeps its four vectors as buffers named as ours, so,
like ours, it has no parameters.

Layout.  The networks run NCHW (what a PyTorch data loader gives, and the
official codes' layout); the losses that index cells (Box2Seg, BAP) are
written on NHWC views of the outputs, line by line as ours.

Known differences from ours (none changes a step's loss or update):
  * trained BatchNorm updates its running variance with the unbiased batch
    variance (PyTorch) where Flax uses the biased one; the train-mode
    output uses the biased variance in both;
  * dropout masks and Box2Seg's affinity pair sampling draw from torch's
    generator (same distribution, same number of pairs);
  * the BANA Labeler's twin does not compute the head's logits, which its
    loss never reads (XLA removes that dead convolution from our step).
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from wsss_jax.data import schema
from wsss_jax.methods.box2seg import objective as box2seg_objective
from wsss_jax.methods.bana import bap as bana_bap
from wsss_jax.methods.bana import objective as bana_objective
from wsss_jax.models import layers, resnet, vgg

BN_EPSILON = layers.BN_EPSILON
BN_MOMENTUM = 0.1                 # PyTorch convention (Flax's 0.9)
_EPS = 1e-12
# Flax BatchNorm leaf -> torch BatchNorm2d name (convert_weights._BN_LEAVES
# read backwards).
_BN_TORCH_NAMES = {'scale': 'weight', 'bias': 'bias', 'mean': 'running_mean',
                   'var': 'running_var'}
_BN_FLAX_NAMES = {v: k for k, v in _BN_TORCH_NAMES.items()}
_BN_STATS = ('mean', 'var')


# ----------------------------------------------------------------------------
# Layers
# ----------------------------------------------------------------------------
class FrozenBatchNorm2d(nn.Module):
  """`layers.FrozenBatchNorm` on NCHW: fixed statistics and affine vectors.

  y = x · scale / sqrt(var + eps) + (bias − mean · scale / sqrt(var + eps)).
  The four vectors are buffers (never trained, no weight decay), named as
  our `batch_stats` leaves.
  """

  def __init__(self, channels: int, eps: float = BN_EPSILON):
    super().__init__()
    self.eps = eps
    self.register_buffer('scale', torch.ones(channels))
    self.register_buffer('bias', torch.zeros(channels))
    self.register_buffer('mean', torch.zeros(channels))
    self.register_buffer('var', torch.ones(channels))

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    multiplier = self.scale * torch.rsqrt(self.var + self.eps)
    offset = self.bias - self.mean * multiplier
    return x * multiplier[:, None, None] + offset[:, None, None]


def batch_norm(channels: int, frozen: bool) -> nn.Module:
  """`layers.batch_norm`: frozen, or trained with PyTorch's defaults."""
  if frozen:
    return FrozenBatchNorm2d(channels)
  return nn.BatchNorm2d(channels, eps=BN_EPSILON, momentum=BN_MOMENTUM)


def resize_bilinear(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
  """`ops.resize.resize_bilinear` (align_corners=False) on NCHW."""
  size = (int(size[0]), int(size[1]))
  if tuple(x.shape[-2:]) == size:
    return x
  return F.interpolate(x, size=size, mode='bilinear', align_corners=False)


# ----------------------------------------------------------------------------
# Backbones and heads (wsss_jax.models)
# ----------------------------------------------------------------------------
class VGG16LargeFOVTwin(nn.Module):
  """`vgg.VGG16LargeFOV`: conv1_1..conv5_3 (+ BN), max-pools with -inf
  padding in floor mode, pool5a average 3x3 counting the zero padding, fc6
  (dilated), fc7, channel dropout (`nn.Dropout2d`) after each."""

  def __init__(self, width: float = 1.0, fc6_dilation: int = 12,
               fc_dim: int = 1024, dropout: float = 0.5,
               batch_norm_layers: bool = False):
    super().__init__()
    self.with_bn = bool(batch_norm_layers)
    self.convs: list[tuple[int, str]] = []     # (block, conv name) in order
    channels = 3
    self.level_channels = {}
    for block, (base, repeats) in enumerate(vgg.VGG16_BLOCKS, start=1):
      dilation = 2 if block == 5 else 1
      out = layers.scaled_channels(base, width)
      for index in range(1, repeats + 1):
        name = f'conv{block}_{index}'
        self.add_module(name, nn.Conv2d(channels, out, 3, padding=dilation,
                                        dilation=dilation))
        if self.with_bn:
          self.add_module(f'{name}_bn', batch_norm(out, frozen=False))
        self.convs.append((block, name))
        channels = out
      if block in (3, 4):
        self.level_channels[f'c{block}'] = out
    self.fc6 = nn.Conv2d(channels, fc_dim, 3, padding=fc6_dilation,
                         dilation=fc6_dilation)
    self.fc7 = nn.Conv2d(fc_dim, fc_dim, 1)
    # Flax's Dropout returns its input at rate 0: no mask multiply here either.
    self.drop6 = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
    self.drop7 = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
    self.level_channels['c5'] = fc_dim
    self.out_channels = fc_dim

  def forward(self, x: torch.Tensor) -> dict:
    levels = {}
    for position, (block, name) in enumerate(self.convs):
      x = getattr(self, name)(x)
      if self.with_bn:
        x = getattr(self, f'{name}_bn')(x)
      x = F.relu(x, inplace=True)
      last_of_block = (position + 1 == len(self.convs)
                       or self.convs[position + 1][0] != block)
      if last_of_block:
        if block in (3, 4):
          levels[f'c{block}'] = x
        x = F.max_pool2d(x, 3, stride=2 if block <= 3 else 1, padding=1)
    x = F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=True)
    x = self.drop6(F.relu(self.fc6(x), inplace=True))
    x = self.drop7(F.relu(self.fc7(x), inplace=True))
    levels['c5'] = x
    return {'features': x, 'levels': levels}


class BottleneckTwin(nn.Module):
  """`resnet.Bottleneck`: 1x1 -> 3x3 (dilated) -> 1x1 plus the shortcut; the
  stride on the first 1x1 (MSRA) or on the 3x3 (torchvision v1.5)."""

  def __init__(self, in_channels: int, features: int, stride: int,
               dilation: int, projection: bool, stride_in_1x1: bool,
               frozen_bn: bool):
    super().__init__()
    mid = max(1, features // resnet.BOTTLENECK_EXPANSION)
    stride_1x1, stride_3x3 = (stride, 1) if stride_in_1x1 else (1, stride)
    self.conv1 = nn.Conv2d(in_channels, mid, 1, stride=stride_1x1, bias=False)
    self.bn1 = batch_norm(mid, frozen_bn)
    self.conv2 = nn.Conv2d(mid, mid, 3, stride=stride_3x3, padding=dilation,
                           dilation=dilation, bias=False)
    self.bn2 = batch_norm(mid, frozen_bn)
    self.conv3 = nn.Conv2d(mid, features, 1, bias=False)
    self.bn3 = batch_norm(features, frozen_bn)
    self.projection = projection
    if projection:
      self.shortcut_conv = nn.Conv2d(in_channels, features, 1, stride=stride,
                                     bias=False)
      self.shortcut_bn = batch_norm(features, frozen_bn)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    h = F.relu(self.bn1(self.conv1(x)), inplace=True)
    h = F.relu(self.bn2(self.conv2(h)), inplace=True)
    h = self.bn3(self.conv3(h))
    shortcut = self.shortcut_bn(self.shortcut_conv(x)) if self.projection else x
    return F.relu(h + shortcut, inplace=True)


class ResNetDeepLabTwin(nn.Module):
  """`resnet.ResNetDeepLab`: 7x7/2 stem, 3/2/1 max-pool (ceil mode for the
  MSRA layout), four stages `layer1..layer4` of `block1..` bottlenecks with
  the strides and dilations of `resnet.STAGE_GEOMETRY[output_stride]`."""

  def __init__(self, blocks: Sequence[int] = (3, 4, 23, 3), width: float = 1.0,
               stride_in_1x1: bool = True, stem_ceil_mode: bool = True,
               output_stride: int = 8, frozen_bn: bool = True):
    super().__init__()
    strides, dilations = resnet.STAGE_GEOMETRY[int(output_stride)]
    stem = layers.scaled_channels(resnet.STEM_CHANNELS, width)
    self.conv1 = nn.Conv2d(3, stem, 7, stride=2, padding=3, bias=False)
    self.bn1 = batch_norm(stem, frozen_bn)
    self.stem_ceil_mode = bool(stem_ceil_mode)
    channels = stem
    self.level_channels = {}
    for stage, count in enumerate(blocks):
      features = layers.scaled_channels(resnet.STAGE_CHANNELS[stage], width)
      stage_blocks = collections.OrderedDict()
      for index in range(int(count)):
        stage_blocks[f'block{index + 1}'] = BottleneckTwin(
            channels, features, strides[stage] if index == 0 else 1,
            dilations[stage], index == 0, stride_in_1x1, frozen_bn)
        channels = features
      self.add_module(f'layer{stage + 1}', nn.Sequential(stage_blocks))
      self.level_channels[f'c{stage + 2}'] = features
    self.num_stages = len(blocks)
    self.out_channels = channels

  def forward(self, x: torch.Tensor) -> dict:
    x = F.relu(self.bn1(self.conv1(x)), inplace=True)
    x = F.max_pool2d(x, 3, stride=2, padding=1, ceil_mode=self.stem_ceil_mode)
    levels = {}
    for stage in range(self.num_stages):
      x = getattr(self, f'layer{stage + 1}')(x)
      levels[f'c{stage + 2}'] = x
    return {'features': x, 'levels': levels}


class LinearHeadTwin(nn.Module):
  """`heads.LinearHead`: a 1x1 conv `classifier`."""

  def __init__(self, in_channels: int, num_classes: int, use_bias: bool):
    super().__init__()
    self.classifier = nn.Conv2d(in_channels, num_classes, 1, bias=use_bias)

  def forward(self, features: torch.Tensor) -> torch.Tensor:
    return self.classifier(features)


class ASPPV2HeadTwin(nn.Module):
  """`heads.ASPPV2Head`, standard form (aspp_dim 0): 3x3 convs `c0..c3`
  with dilation = padding = rate, straight to the classes, summed."""

  def __init__(self, in_channels: int, num_classes: int, rates: Sequence[int],
               use_bias: bool):
    super().__init__()
    self.rates = tuple(int(r) for r in rates)
    for index, rate in enumerate(self.rates):
      self.add_module(f'c{index}', nn.Conv2d(
          in_channels, num_classes, 3, padding=rate, dilation=rate,
          bias=use_bias))

  def forward(self, features: torch.Tensor) -> torch.Tensor:
    total = None
    for index in range(len(self.rates)):
      branch = getattr(self, f'c{index}')(features)
      total = branch if total is None else total + branch
    return total


class SegmenterTwin(nn.Module):
  """`segmenter.Segmenter`: `backbone` then `head`; NCHW outputs
  {'logits', 'features', 'levels'}."""

  def __init__(self, backbone: nn.Module, head: nn.Module):
    super().__init__()
    self.backbone = backbone
    self.head = head

  def forward(self, images: torch.Tensor, with_logits: bool = True) -> dict:
    out = self.backbone(images)
    result = {'features': out['features'], 'levels': out['levels']}
    if with_logits:
      result['logits'] = self.head(out['features'])
    return result


def build_backbone_twin(model_config: Mapping[str, Any]) -> nn.Module:
  """`build.build_backbone`'s network as a torch module."""
  name = model_config['backbone']
  width = float(model_config['width'])
  if name == 'vgg16_largefov':
    return VGG16LargeFOVTwin(
        width=width, fc6_dilation=int(model_config['fc6_dilation']),
        fc_dim=int(model_config['fc_dim']),
        dropout=float(model_config['dropout']),
        batch_norm_layers=bool(model_config.get('batch_norm', False)))
  if name == 'resnet101_deeplab':
    return ResNetDeepLabTwin(
        blocks=tuple(int(b) for b in model_config['resnet_blocks']),
        width=width, stride_in_1x1=bool(model_config['resnet_stride_in_1x1']),
        stem_ceil_mode=bool(model_config['resnet_stem_ceil_mode']),
        output_stride=int(model_config['output_stride']),
        frozen_bn=bool(model_config['frozen_bn']))
  raise ValueError(f'no torch twin for backbone {name!r}')


def build_segmenter_twin(model_config: Mapping[str, Any],
                         num_classes: int) -> SegmenterTwin:
  """`build.build_model(model_config, num_classes)` as a torch module
  (heads 'linear' and the standard 'aspp_v2')."""
  backbone = build_backbone_twin(model_config)
  head_name = model_config['head']
  use_bias = bool(model_config['head_bias'])
  if head_name == 'linear':
    head = LinearHeadTwin(backbone.out_channels, num_classes, use_bias)
  elif head_name == 'aspp_v2' and int(model_config['aspp_dim']) <= 0:
    head = ASPPV2HeadTwin(backbone.out_channels, num_classes,
                          model_config['aspp_rates'], use_bias)
  else:
    raise ValueError(f'no torch twin for head {head_name!r} (aspp_dim '
                     f"{model_config.get('aspp_dim')})")
  return SegmenterTwin(backbone, head)


# ----------------------------------------------------------------------------
# Box2Seg network (wsss_jax.methods.box2seg.model, wsss_jax.models.upernet)
# ----------------------------------------------------------------------------
class ConvBNReLUTwin(nn.Module):
  """`upernet.ConvBNReLU`: k x k conv without bias, trained BN, ReLU."""

  def __init__(self, in_channels: int, features: int, kernel: int):
    super().__init__()
    self.conv = nn.Conv2d(in_channels, features, kernel, padding=kernel // 2,
                          bias=False)
    self.bn = batch_norm(features, frozen=False)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return F.relu(self.bn(self.conv(x)), inplace=True)


class UPerNetTwin(nn.Module):
  """`upernet.UPerNetDecoder`: PPM on the coarsest level, lateral 1x1s, the
  top-down sums, 3x3 FPN convs, fusion at the finest resolution."""

  def __init__(self, in_channels: Sequence[int], channels: int,
               pool_scales: Sequence[int]):
    super().__init__()
    self.pool_scales = tuple(int(s) for s in pool_scales)
    self.num_levels = len(in_channels)
    top = in_channels[-1]
    for scale in self.pool_scales:
      self.add_module(f'ppm_{scale}', ConvBNReLUTwin(top, channels, 1))
    self.ppm_bottleneck = ConvBNReLUTwin(
        top + len(self.pool_scales) * channels, channels, 3)
    for index, level_channels in enumerate(in_channels[:-1]):
      self.add_module(f'lateral_{index}',
                      ConvBNReLUTwin(level_channels, channels, 1))
      self.add_module(f'fpn_{index}', ConvBNReLUTwin(channels, channels, 3))
    self.fuse = ConvBNReLUTwin(self.num_levels * channels, channels, 3)

  def forward(self, levels: Sequence[torch.Tensor]) -> torch.Tensor:
    top = levels[-1]
    size = top.shape[-2:]
    pooled = [top]
    for scale in self.pool_scales:
      branch = getattr(self, f'ppm_{scale}')(F.adaptive_avg_pool2d(top, scale))
      pooled.append(resize_bilinear(branch, size))
    top = self.ppm_bottleneck(torch.cat(pooled, dim=1))
    laterals = [getattr(self, f'lateral_{i}')(x)
                for i, x in enumerate(levels[:-1])] + [top]
    for i in range(len(laterals) - 2, -1, -1):
      laterals[i] = laterals[i] + resize_bilinear(laterals[i + 1],
                                                  laterals[i].shape[-2:])
    outputs = [getattr(self, f'fpn_{i}')(x)
               for i, x in enumerate(laterals[:-1])] + [top]
    finest = outputs[0].shape[-2:]
    return self.fuse(torch.cat([resize_bilinear(x, finest) for x in outputs],
                               dim=1))


class BranchDecoderTwin(nn.Module):
  """`box2seg.model.BranchDecoder`: ConvBNReLU 3x3 `conv1`, 1x1 `conv2`."""

  def __init__(self, in_channels: int, features: int, hidden: int,
               bias_init: float = 0.0):
    super().__init__()
    self.conv1 = ConvBNReLUTwin(in_channels, hidden, 3)
    self.conv2 = nn.Conv2d(hidden, features, 1)
    nn.init.constant_(self.conv2.bias, bias_init)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.conv2(self.conv1(x))


class Box2SegTwin(nn.Module):
  """`box2seg.model.Box2SegNet`: encoder, UPerNet `decoder`, branches `head`
  (y), `attention_head` (α logits), `embedding_head` (β); NCHW outputs."""

  def __init__(self, backbone: nn.Module, num_classes: int, embed_dim: int,
               decoder_channels: int, branch_channels: int,
               levels: Sequence[str], pool_scales: Sequence[int],
               attention_bias_init: float = 0.0):
    super().__init__()
    self.levels = tuple(levels)
    self.backbone = backbone
    self.decoder = UPerNetTwin(
        [backbone.level_channels[name] for name in self.levels],
        decoder_channels, pool_scales)
    self.head = BranchDecoderTwin(decoder_channels, num_classes,
                                  branch_channels)
    self.attention_head = BranchDecoderTwin(decoder_channels, num_classes - 1,
                                            branch_channels,
                                            attention_bias_init)
    self.embedding_head = BranchDecoderTwin(decoder_channels, embed_dim,
                                            branch_channels)

  def forward(self, images: torch.Tensor) -> dict:
    out = self.backbone(images)
    fused = self.decoder([out['levels'][name] for name in self.levels])
    return {'logits': self.head(fused),
            'attention_logits': self.attention_head(fused),
            'embeddings': self.embedding_head(fused),
            'features': fused}


def build_box2seg_twin(config, num_classes: int) -> Box2SegTwin:
  """`box2seg.model.build_box2seg_model(config, num_classes)` in torch."""
  cfg = config.box2seg
  return Box2SegTwin(
      build_backbone_twin(config.model), int(num_classes),
      embed_dim=int(cfg.embed_dim), decoder_channels=int(cfg.decoder_channels),
      branch_channels=int(cfg.branch_channels), levels=tuple(cfg.levels),
      pool_scales=tuple(cfg.pool_scales),
      attention_bias_init=float(cfg.attention_bias_init))


# ----------------------------------------------------------------------------
# Flax <-> torch parameters
# ----------------------------------------------------------------------------
def _flatten(tree: Mapping[str, Any],
             prefix: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...],
                                                           Any]]:
  for key, value in tree.items():
    if isinstance(value, Mapping):
      yield from _flatten(value, prefix + (str(key),))
    else:
      yield prefix + (str(key),), value


def _torch_leaf(owner: nn.Module, leaf: str, value: np.ndarray
                ) -> tuple[str, np.ndarray]:
  """(torch tensor name, array) of Flax leaf `leaf` of module `owner`."""
  if isinstance(owner, nn.Conv2d):
    if leaf == 'kernel':
      return 'weight', np.transpose(value, (3, 2, 0, 1))     # HWIO -> OIHW
    if leaf == 'bias':
      return 'bias', value
  elif isinstance(owner, nn.BatchNorm2d) and leaf in _BN_TORCH_NAMES:
    return _BN_TORCH_NAMES[leaf], value
  elif isinstance(owner, FrozenBatchNorm2d) and leaf in _BN_TORCH_NAMES:
    return leaf, value
  raise KeyError(f'no torch tensor for Flax leaf {leaf!r} of a '
                 f'{type(owner).__name__}')


def load_flax_params(module: nn.Module, variables: Mapping[str, Any]) -> None:
  """Copies our Flax variables ({'params', 'batch_stats'}) into `module`.

  Every torch parameter and buffer (but BatchNorm's `num_batches_tracked`)
  must receive exactly one Flax array of the right shape, and every Flax
  array must land somewhere: a mismatch raises KeyError / ValueError.
  """
  state = module.state_dict()
  loaded = {}
  for collection in ('params', 'batch_stats'):
    for path, value in _flatten(variables.get(collection, {})):
      owner_path = '.'.join(path[:-1])
      owner = module.get_submodule(owner_path)
      name, array = _torch_leaf(owner, path[-1], np.asarray(value))
      key = f'{owner_path}.{name}'
      if key not in state:
        raise KeyError(f'{collection}/{"/".join(path)} -> {key}: not in the '
                       'torch module')
      if tuple(state[key].shape) != array.shape:
        raise ValueError(f'{key}: torch shape {tuple(state[key].shape)}, '
                         f'Flax shape {array.shape}')
      loaded[key] = torch.from_numpy(np.array(array, np.float32))
  missing = [k for k in state
             if k not in loaded and not k.endswith('num_batches_tracked')]
  if missing:
    raise KeyError(f'torch tensors without a Flax array: {missing[:5]} '
                   f'({len(missing)} in all)')
  module.load_state_dict(loaded, strict=False)


def flax_variables_from_torch(module: nn.Module) -> dict[str, dict]:
  """The module's tensors as our Flax variables {'params', 'batch_stats'}
  (nested dicts of numpy arrays, our names and layouts): the inverse of
  `load_flax_params`."""
  variables: dict[str, dict] = {'params': {}, 'batch_stats': {}}
  for key, tensor in module.state_dict().items():
    owner_path, _, name = key.rpartition('.')
    owner = module.get_submodule(owner_path)
    value = tensor.detach().cpu().numpy().copy()
    if isinstance(owner, nn.Conv2d):
      collection, leaf = 'params', ('kernel' if name == 'weight' else name)
      if leaf == 'kernel':
        value = np.transpose(value, (2, 3, 1, 0))             # OIHW -> HWIO
    elif isinstance(owner, nn.BatchNorm2d):
      if name == 'num_batches_tracked':
        continue
      leaf = _BN_FLAX_NAMES[name]
      collection = 'batch_stats' if leaf in _BN_STATS else 'params'
    elif isinstance(owner, FrozenBatchNorm2d):
      collection, leaf = 'batch_stats', name
    else:
      raise KeyError(f'{key}: no Flax leaf for a {type(owner).__name__}')
    node = variables[collection]
    for part in owner_path.split('.'):
      node = node.setdefault(part, {})
    node[leaf] = value
  return variables


def param_count(module: nn.Module) -> int:
  """Trained parameters (frozen-BN buffers excluded, as in ours)."""
  return int(sum(p.numel() for p in module.parameters()))


def to_torch_batch(batch: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
  """Numpy batch -> torch tensors on torch's default device (sharing memory
  on the CPU; host-only keys dropped)."""
  device = torch.get_default_device()
  return {k: torch.from_numpy(np.ascontiguousarray(v)).to(device)
          for k, v in batch.items() if k not in schema.HOST_ONLY_KEYS}


# ----------------------------------------------------------------------------
# Input normalisation (wsss_jax.ops.image.normalize_images)
# ----------------------------------------------------------------------------
def normalize_images(images: torch.Tensor, style: str) -> torch.Tensor:
  """uint8 RGB (B, H, W, 3) -> normalised float (B, 3, H, W), contiguous NCHW
  (the layout a PyTorch data loader hands the official codes)."""
  x = images.to(torch.float32)
  if style == 'caffe':
    mean_bgr = torch.tensor(schema.CAFFE_MEAN_RGB[::-1], dtype=torch.float32)
    x = x.flip(-1) - mean_bgr
  elif style == 'imagenet':
    mean = torch.tensor(schema.IMAGENET_MEAN_RGB, dtype=torch.float32)
    std = torch.tensor(schema.IMAGENET_STD_RGB, dtype=torch.float32)
    x = (x - mean) / std
  else:
    raise ValueError(f'Unknown normalisation {style!r}')
  return x.permute(0, 3, 1, 2).contiguous()


def channels_last(outputs: Mapping[str, Any]) -> dict:
  """NCHW tensor outputs -> (B, h, w, C) views (levels left out)."""
  return {k: v.permute(0, 2, 3, 1) for k, v in outputs.items()
          if isinstance(v, torch.Tensor) and v.ndim == 4}


# ----------------------------------------------------------------------------
# Shared loss pieces (wsss_jax.losses, wsss_jax.ops)
# ----------------------------------------------------------------------------
def safe_mean(values: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
  """`losses.safe_mean`: Σ w·v / max(Σ w, 1e-12)."""
  weights = weights.to(values.dtype)
  return torch.sum(values * weights) / torch.clamp(torch.sum(weights),
                                                   min=_EPS)


def resize_labels_nearest(labels: torch.Tensor, height: int,
                          width: int) -> torch.Tensor:
  """`losses.resize_labels_nearest`: src = floor((i + 0.5)·in/out)."""
  in_h, in_w = labels.shape[1], labels.shape[2]
  rows = torch.floor((torch.arange(height, dtype=torch.float32) + 0.5)
                     * in_h / height).long()
  cols = torch.floor((torch.arange(width, dtype=torch.float32) + 0.5)
                     * in_w / width).long()
  return labels[:, rows][:, :, cols]


def softmax_cross_entropy(logits: torch.Tensor, labels: torch.Tensor,
                          ignore_label: int = schema.IGNORE_LABEL
                          ) -> tuple[torch.Tensor, torch.Tensor]:
  """`losses.softmax_cross_entropy` on (..., C) logits: (loss, valid)."""
  num_classes = logits.shape[-1]
  labels = labels.long()
  valid = (labels != ignore_label) & (labels >= 0) & (labels < num_classes)
  safe_labels = torch.where(valid, labels, 0)
  log_probs = F.log_softmax(logits.to(torch.float32), dim=-1)
  picked = torch.gather(log_probs, -1, safe_labels[..., None])[..., 0]
  return torch.where(valid, -picked, 0.0), valid


def segmentation_cross_entropy(logits: torch.Tensor,
                               labels: torch.Tensor) -> torch.Tensor:
  """`losses.segmentation_cross_entropy` on NCHW logits: labels to the logit
  grid by centre-sampling nearest, mean over the valid pixels of the batch
  (255 and out-of-range labels ignored; 0 when none is valid)."""
  num_classes = logits.shape[1]
  labels = resize_labels_nearest(labels, logits.shape[2],
                                 logits.shape[3]).long()
  valid = (labels != schema.IGNORE_LABEL) & (labels >= 0) & (
      labels < num_classes)
  targets = torch.where(valid, labels, schema.IGNORE_LABEL)
  total = F.cross_entropy(logits, targets, ignore_index=schema.IGNORE_LABEL,
                          reduction='sum')
  return total / torch.clamp(valid.sum().to(total.dtype), min=_EPS)


def l2_normalize(x: torch.Tensor) -> torch.Tensor:
  """`ops.features.l2_normalize`: x / max(‖x‖, 1e-12), last axis."""
  squared = torch.sum(x * x, dim=-1, keepdim=True)
  return x * torch.rsqrt(torch.clamp(squared, min=_EPS * _EPS))


def centre_membership(boxes: torch.Tensor, box_labels: torch.Tensor,
                      grid_hw: Sequence[int],
                      image_hw: Sequence[int] | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
  """`ops.boxes.centre_membership`: (in_y (B, N, h), in_x (B, N, w))."""
  h, w = int(grid_hw[0]), int(grid_hw[1])
  height, width = image_hw if image_hw is not None else (h, w)
  boxes = boxes.to(torch.float32)
  real = (box_labels >= 1)[..., None]
  cy = (torch.arange(h, dtype=torch.float32) + 0.5) * (height / h)
  cx = (torch.arange(w, dtype=torch.float32) + 0.5) * (width / w)
  in_y = (cy >= boxes[..., 1:2]) & (cy < boxes[..., 3:4]) & real
  in_x = (cx >= boxes[..., 0:1]) & (cx < boxes[..., 2:3]) & real
  return in_y, in_x


def one_hot(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
  """`jax.nn.one_hot`: float32, all zeros for labels outside 0..C-1."""
  return (labels[..., None] == torch.arange(num_classes)).to(torch.float32)


@dataclasses.dataclass
class LossContext:
  """What a torch loss may need besides outputs and batch (ours:
  `step.LossContext`; randomness comes from torch's generator)."""
  step: int
  model: nn.Module


LossFn = Callable[[dict, dict, LossContext], tuple[torch.Tensor, dict]]


def cross_entropy_on(label_key: str) -> LossFn:
  """`segmentation.cross_entropy_on`: CE against `batch[label_key]`."""
  def loss_fn(outputs, batch, context):
    del context
    loss = segmentation_cross_entropy(outputs['logits'], batch[label_key])
    return loss, {'ce': loss}
  return loss_fn


# ----------------------------------------------------------------------------
# Box2Seg losses (wsss_jax.methods.box2seg.losses / objective), NHWC
# ----------------------------------------------------------------------------
def box_labels_on_grid(boxes: torch.Tensor, box_labels: torch.Tensor,
                       grid: Sequence[int], image_size: Sequence[int]
                       ) -> torch.Tensor:
  """`objective.box_labels_on_grid`: box class per output cell, (B, h, w);
  centre rule, a box without a centre takes its own centre's cell, smaller
  boxes in front (ties: later box on top)."""
  (h, w), (height, width) = grid, image_size
  x0, y0, x1, y1 = boxes.to(torch.float32).unbind(-1)
  real = box_labels >= 1
  in_y, in_x = centre_membership(boxes, box_labels, (h, w), (height, width))
  cover = in_y[..., :, None] & in_x[..., None, :]                # (B, N, h, w)
  own_row = torch.clamp(torch.floor((y0 + y1) / 2 * h / height), 0, h - 1)
  own_col = torch.clamp(torch.floor((x0 + x1) / 2 * w / width), 0, w - 1)
  own = ((torch.arange(h)[:, None] == own_row[..., None, None])
         & (torch.arange(w)[None, :] == own_col[..., None, None]))
  empty = ~cover.flatten(-2).any(-1)
  cover = (cover | (own & empty[..., None, None])) & real[..., None, None]
  area = torch.where(real, (x1 - x0) * (y1 - y0), -1.0)
  # Largest box first, ties in annotation order: rank 0 paints first.
  order = torch.sort(-area, dim=-1, stable=True).indices
  rank = torch.argsort(order, dim=-1)
  priority = torch.where(cover, rank[..., None, None] + 1, 0)    # 0: none
  best, winner = priority.max(dim=1)                             # (B, h, w)
  label = torch.gather(box_labels.long(), 1,
                       winner.reshape(winner.shape[0], -1)).reshape(
                           winner.shape)
  return torch.where(best > 0, label, 0)


def grid_targets(outputs: dict, batch: dict, num_classes: int,
                 mask_key: str = box2seg_objective.GRABCUT_KEY) -> dict:
  """`objective.grid_targets` (outputs NHWC)."""
  h, w = outputs['logits'].shape[1:3]
  height, width = batch[schema.IMAGE].shape[1:3]
  valid = resize_labels_nearest(batch[schema.VALID], h, w).bool()
  mask_labels = resize_labels_nearest(batch[mask_key], h, w).long()
  valid_mask = valid & (mask_labels != schema.IGNORE_LABEL)
  box = box_labels_on_grid(batch[schema.BOXES], batch[schema.BOX_LABELS],
                           (h, w), (height, width))
  return {'valid': valid,
          'box': one_hot(box, num_classes) * valid[..., None],
          'mask': one_hot(torch.where(valid_mask, mask_labels, 0),
                          num_classes) * valid_mask[..., None],
          'mask_labels': torch.where(valid_mask, mask_labels,
                                     schema.IGNORE_LABEL),
          'valid_mask': valid_mask}


def _per_image_mean_ce(log_y, target, valid):
  valid = valid.to(log_y.dtype)
  per_cell = -torch.sum(target * log_y, dim=-1) * valid
  m = torch.clamp(valid.sum(dim=(1, 2)), min=1.0)
  return torch.mean(per_cell.sum(dim=(1, 2)) / m)


def box_loss(log_y, box_onehot, valid):
  """L_box, Eq. (1)."""
  return _per_image_mean_ce(log_y, box_onehot, valid)


def grabcut_loss(log_y, grabcut_onehot, valid):
  """L_GC, Eq. (2)."""
  return _per_image_mean_ce(log_y, grabcut_onehot, valid)


def foreground_attention_loss(log_y, alpha, box_onehot, valid,
                              class_reduction: str):
  """L_fg, Eq. (3): per-class box-normalised, attention-weighted CE."""
  box_fg = box_onehot[..., 1:] * valid[..., None].to(log_y.dtype)
  weighted = -torch.sum(alpha * box_fg * log_y[..., 1:], dim=(1, 2))
  area = box_fg.sum(dim=(1, 2))
  present = area > 0
  per_class = torch.where(present, weighted / torch.clamp(area, min=1.0), 0.0)
  if class_reduction == 'sum':
    per_image = per_class.sum(-1)
  elif class_reduction == 'mean':
    per_image = per_class.sum(-1) / torch.clamp(present.sum(-1), min=1)
  else:
    raise ValueError(f'fg_class_reduction={class_reduction!r}')
  return per_image.mean()


def background_loss(log_y, box_onehot, valid):
  """L_bg, Eq. (4)."""
  bg = box_onehot[..., 0] * valid.to(log_y.dtype)
  total = -torch.sum(bg * log_y[..., 0], dim=(1, 2))
  count = bg.sum(dim=(1, 2))
  return torch.where(count > 0, total / torch.clamp(count, min=1.0),
                     0.0).mean()


def attention_weighted_loss(log_y, alpha, box_onehot, valid,
                            class_reduction: str):
  """L_AW, Eq. (5) = L_fg + L_bg."""
  return (foreground_attention_loss(log_y, alpha, box_onehot, valid,
                                    class_reduction)
          + background_loss(log_y, box_onehot, valid))


def bbox_attention_loss(alpha, box_onehot, valid, reduction: str):
  """L_α^bbox, Eq. (6)."""
  valid_f = valid.to(alpha.dtype)
  per_cell = torch.sum((box_onehot[..., 1:] - alpha) ** 2, dim=-1) * valid_f
  per_image = per_cell.sum(dim=(1, 2))
  if reduction == 'mean':
    per_image = per_image / torch.clamp(valid_f.sum(dim=(1, 2)), min=1.0)
  elif reduction != 'sum':
    raise ValueError(f'bbox_reg_reduction={reduction!r}')
  return per_image.mean()


def grabcut_fill_rates(grabcut_onehot, box_onehot, valid):
  """η_c, Eq. (7), and the classes present."""
  valid_f = valid[..., None].to(box_onehot.dtype)
  grabcut = torch.sum(grabcut_onehot[..., 1:] * valid_f, dim=(1, 2))
  area = torch.sum(box_onehot[..., 1:] * valid_f, dim=(1, 2))
  present = area > 0
  return torch.where(present, grabcut / torch.clamp(area, min=1.0),
                     0.0), present


def predicted_fill_rates(alpha, box_onehot, valid):
  """η'_c, Eq. (8)."""
  box_fg = box_onehot[..., 1:] * valid[..., None].to(alpha.dtype)
  area = box_fg.sum(dim=(1, 2))
  return torch.sum(box_fg * alpha, dim=(1, 2)) / torch.clamp(area, min=1.0)


def fill_rate_loss(alpha, grabcut_onehot, box_onehot, valid, gamma: float,
                   reduction: str):
  """L_α^fr: hinges max(0, γη − η') over (image, present class)."""
  eta, present = grabcut_fill_rates(grabcut_onehot, box_onehot, valid)
  eta_pred = predicted_fill_rates(alpha, box_onehot, valid)
  hinge = torch.where(present, torch.clamp(gamma * eta - eta_pred, min=0.0),
                      0.0)
  if reduction == 'image_sum':
    return hinge.sum(-1).mean()
  if reduction == 'mean':
    return safe_mean(hinge, present)
  if reduction == 'sum':
    return hinge.sum()
  raise ValueError(f'fill_rate_reduction={reduction!r}')


def class_balanced_sample(labels: torch.Tensor, valid: torch.Tensor,
                          num_samples: int,
                          generator: torch.Generator | None = None
                          ) -> tuple[torch.Tensor, torch.Tensor]:
  """`losses.class_balanced_sample`: `num_samples` cells per image, visited
  round-robin over the classes present, random order within a class.

  Returns (indices (B, n_s) into m, picked (B, n_s) bool).
  """
  batch, m = labels.shape
  keys = torch.rand((batch, m), generator=generator)
  big = torch.iinfo(torch.int32).max
  cls = torch.where(valid, labels.long(), big)
  # Sort by class, then by key: a stable sort by class of the key order.
  by_key = torch.argsort(keys, dim=1)
  order = torch.gather(by_key, 1, torch.argsort(
      torch.gather(cls, 1, by_key), dim=1, stable=True))
  sorted_cls = torch.gather(cls, 1, order)
  position = torch.arange(m).expand(batch, m)
  is_start = torch.cat([torch.ones((batch, 1), dtype=torch.bool),
                        sorted_cls[:, 1:] != sorted_cls[:, :-1]], dim=1)
  start = torch.cummax(torch.where(is_start, position, 0), dim=1).values
  rank_sorted = (position - start).to(torch.float32)
  rank = torch.zeros((batch, m)).scatter_(1, order, rank_sorted)
  priority = torch.where(valid, rank + keys, torch.inf)
  neg, index = torch.topk(-priority, num_samples, dim=1)
  return index, torch.isfinite(neg)


def affinity_loss(beta: torch.Tensor, targets: torch.Tensor,
                  picked: torch.Tensor, reduction: str) -> torch.Tensor:
  """L_A, Eq. (10), through Gram matrices (‖BᵀB‖² − 2‖BᵀT‖² + ‖TᵀT‖²
  minus the diagonal), never the n x n matrices."""
  w = picked.to(beta.dtype)[..., None]
  b, t = l2_normalize(beta) * w, targets.to(beta.dtype) * w

  def gram_sq(x, y):
    g = torch.einsum('bnd,bne->bde', x, y)
    return torch.sum(g * g, dim=(1, 2))

  total = gram_sq(b, b) - 2.0 * gram_sq(b, t) + gram_sq(t, t)
  diagonal = torch.sum(((b * b).sum(-1) - (t * t).sum(-1)) ** 2, dim=1)
  pairs_sum = torch.clamp(total - diagonal, min=0.0)
  if reduction == 'mean':
    n = picked.sum(dim=1).to(beta.dtype)
    per_image = pairs_sum / torch.clamp(n * (n - 1.0), min=1.0)
  elif reduction == 'sum':
    per_image = pairs_sum
  else:
    raise ValueError(f'affinity_reduction={reduction!r}')
  return per_image.mean()


def _sampled_affinity(outputs, targets, pair_targets, pair_fraction: float,
                      reduction: str) -> torch.Tensor:
  """L_A on class-balanced samples of the valid M cells."""
  batch, h, w, _ = outputs['embeddings'].shape
  labels = targets['mask_labels'].reshape(batch, -1)
  index, picked = class_balanced_sample(
      labels, targets['valid_mask'].reshape(batch, -1),
      box2seg_objective.num_affinity_samples(pair_fraction, h * w))

  def gather(x):
    flat = x.reshape(batch, h * w, x.shape[-1])
    return torch.gather(flat, 1, index[..., None].expand(-1, -1, x.shape[-1]))

  return affinity_loss(gather(outputs['embeddings']), gather(pair_targets),
                       picked, reduction)


def aw_ramp(step: int, warmup_steps: int) -> float:
  """`objective.aw_ramp`: λ_AW's linear warm-up factor."""
  if not warmup_steps:
    return 1.0
  return min(1.0, float(step) / float(warmup_steps))


def box2seg_train_loss(options: box2seg_objective.Box2SegLossOptions,
                       num_classes: int,
                       mask_key: str = box2seg_objective.GRABCUT_KEY
                       ) -> LossFn:
  """`objective.train_loss` (phase 2, Eq. 11; no semi-supervised key)."""
  weights = options.weights

  def loss_fn(outputs, batch, context):
    outputs = channels_last(outputs)
    t = grid_targets(outputs, batch, num_classes, mask_key)
    valid = t['valid']
    log_y = F.log_softmax(outputs['logits'], dim=-1)
    alpha = torch.sigmoid(outputs['attention_logits'])
    zero = torch.zeros(())
    terms = {}
    if weights.box:
      terms['box'] = box_loss(log_y, t['box'], valid)
    if weights.grabcut:
      terms['grabcut'] = grabcut_loss(log_y, t['mask'], t['valid_mask'])
    if weights.aw:
      terms['aw'] = attention_weighted_loss(log_y, alpha, t['box'], valid,
                                            options.fg_class_reduction)
    if weights.alpha:
      if options.alpha_regularizer == 'fill_rate':
        terms['alpha'] = fill_rate_loss(alpha, t['mask'], t['box'], valid,
                                        options.fill_rate_gamma,
                                        options.fill_rate_reduction)
      else:
        terms['alpha'] = bbox_attention_loss(alpha, t['box'], valid,
                                             options.bbox_reg_reduction)
    if weights.affinity:
      y = torch.exp(log_y)
      if options.affinity_stop_grad_y:
        y = y.detach()
      terms['affinity'] = _sampled_affinity(
          outputs, t, y, options.affinity_pair_fraction,
          options.affinity_reduction)
    total = (weights.grabcut * terms.get('grabcut', zero)
             + weights.aw * aw_ramp(context.step, options.aw_warmup_steps)
             * terms.get('aw', zero)
             + weights.alpha * terms.get('alpha', zero)
             + weights.affinity * terms.get('affinity', zero)
             + weights.box * terms.get('box', zero))
    with torch.no_grad():           # monitoring only, as ours
      eta_pred = predicted_fill_rates(alpha, t['box'], valid)
      present = t['box'][..., 1:].sum(dim=(1, 2)) > 0
      fill = safe_mean(eta_pred, present)
    return total, dict(terms, attention_fill=fill)
  return loss_fn


# ----------------------------------------------------------------------------
# BANA stage 1: background-aware pooling (wsss_jax.methods.bana.bap), NHWC
# ----------------------------------------------------------------------------
def background_mask(boxes, box_labels, valid):
  """`bap.background_mask`: real pixels outside every box, (B, H, W)."""
  in_y, in_x = centre_membership(boxes, box_labels, valid.shape[1:3])
  covered = torch.einsum('bnh,bnw->bhw', in_y.to(torch.float32),
                         in_x.to(torch.float32)) > 0.5
  return valid.bool() & ~covered


def downsample_mask(mask, h: int, w: int):
  """`bap.downsample_mask`: legacy nearest, src = floor(dst·in/out)."""
  in_h, in_w = mask.shape[1], mask.shape[2]
  rows = (torch.arange(h) * in_h) // h
  cols = (torch.arange(w) * in_w) // w
  return mask[:, rows][:, :, cols].bool()


def pad_to_grid(x: torch.Tensor, n: int) -> torch.Tensor:
  """`bap.pad_to_grid`: zero-pads axes 1, 2 to multiples of n (an even pad
  split, an odd one all at the end)."""
  def pads(size):
    pad = (-size) % n
    return (pad // 2, pad // 2) if pad % 2 == 0 else (0, pad)
  # F.pad lists (before, after) pairs from the last axis backwards.
  spec = [0, 0] * (x.ndim - 3) + list(pads(x.shape[2])) + list(pads(x.shape[1]))
  return F.pad(x, spec)


def grid_queries(features, mask_f, grid: int):
  """`bap.grid_queries`: q_j = Σ M f / (Σ M + 1e-12) per grid cell, Eq. (1)."""
  feats = pad_to_grid(features, grid)
  mask = pad_to_grid(mask_f.to(features.dtype), grid)
  batch, hp, wp, dim = feats.shape
  ch, cw = hp // grid, wp // grid
  weighted = (feats * mask[..., None]).reshape(batch, grid, ch, grid, cw, dim)
  total = weighted.sum(dim=(2, 4)).reshape(batch, grid * grid, dim)
  count = mask.reshape(batch, grid, ch, grid, cw).sum(dim=(2, 4)).reshape(
      batch, grid * grid)
  return total / (count[..., None] + _EPS), count > 0


def _axis_samples(first, last, in_size: int, out_size: int, max_samples: int,
                  mode: str):
  scale = (out_size - 1) / max(in_size - 1, 1)
  first_f, last_f = first * scale, last * scale
  count = torch.clamp(torch.ceil(last_f) - torch.floor(first_f), 1,
                      max_samples).to(torch.int32)
  k = torch.arange(max_samples, dtype=torch.float32)
  t = k / torch.clamp(count - 1, min=1).to(torch.float32)[..., None]
  if mode == 'aligned':
    pos = first_f[..., None] + t * (last_f - first_f)[..., None]
  elif mode == 'grid_sample_ac_false':
    half = max(in_size - 1, 1) / 2.0
    first_n, last_n = first / half - 1.0, last / half - 1.0
    pos_n = first_n[..., None] + t * (last_n - first_n)[..., None]
    pos = ((pos_n + 1.0) * out_size - 1.0) / 2.0
  else:
    raise ValueError(f'bap_sampling={mode!r}')
  valid = k < count[..., None]
  pos = torch.where(valid, pos, pos[..., :1])
  return pos, valid, count


def box_sampling_grid(boxes, image_hw, feature_hw, max_samples: int,
                      mode: str = 'aligned'):
  """`bap.box_sampling_grid`: (coords (B,N,S,S,2), sample_valid, counts)."""
  boxes = boxes.to(torch.float32)
  ys, vy, nh = _axis_samples(boxes[..., 1], boxes[..., 3] - 1.0, image_hw[0],
                             feature_hw[0], max_samples, mode)
  xs, vx, nw = _axis_samples(boxes[..., 0], boxes[..., 2] - 1.0, image_hw[1],
                             feature_hw[1], max_samples, mode)
  shape = ys.shape + (max_samples,)
  coords = torch.stack([ys[..., :, None].expand(shape),
                        xs[..., None, :].expand(shape)], dim=-1)
  sample_valid = vy[..., :, None] & vx[..., None, :]
  return coords, sample_valid, torch.stack([nh, nw], dim=-1)


def bilinear_sample(features, coords):
  """`bap.bilinear_sample`: four gathered corners, zero outside the map."""
  batch, h, w, dim = features.shape
  flat = features.reshape(batch, h * w, dim)
  y, x = coords[..., 0], coords[..., 1]
  y0, x0 = torch.floor(y), torch.floor(x)
  ly, lx = y - y0, x - x0

  def corner(yi, xi, weight):
    inside = (yi >= 0) & (yi <= h - 1) & (xi >= 0) & (xi <= w - 1)
    r = torch.clamp(yi, 0, h - 1).long()
    c = torch.clamp(xi, 0, w - 1).long()
    index = (r * w + c).reshape(batch, -1, 1).expand(-1, -1, dim)
    values = torch.gather(flat, 1, index).reshape(coords.shape[:-1] + (dim,))
    return values * torch.where(inside, weight, 0.0)[..., None]

  return (corner(y0, x0, (1 - ly) * (1 - lx))
          + corner(y0, x0 + 1, (1 - ly) * lx)
          + corner(y0 + 1, x0, ly * (1 - lx))
          + corner(y0 + 1, x0 + 1, ly * lx))


def background_attention(roi_features, queries, query_valid):
  """`bap.background_attention`, Eqs. (2)-(3): mean ReLU(cos) over the
  valid queries, (B, N, S, S)."""
  sq = torch.sum(roi_features * roi_features, dim=-1)
  inv_norm = torch.rsqrt(torch.clamp(sq, min=_EPS * _EPS))
  q_sq = torch.sum(queries * queries, dim=-1, keepdim=True)
  q_hat = queries * torch.rsqrt(torch.clamp(q_sq, min=_EPS * _EPS))
  cos = torch.einsum('bnijd,bkd->bnijk', roi_features,
                     q_hat) * inv_norm[..., None]
  qv = query_valid.to(cos.dtype)
  total = torch.sum(F.relu(cos) * qv[:, None, None, None, :], dim=-1)
  count = torch.clamp(qv.sum(-1), min=1.0)
  return total / count[:, None, None, None]


def _windows(count, size: int, cells: int):
  k = torch.arange(size)
  n = count[..., None]
  if cells == 1:
    masks = [k < n]
  elif cells == 2:
    stride = n // 2
    kernel = n - stride
    masks = [k < kernel, (k >= stride) & (k < stride + kernel)]
  else:
    raise ValueError(f'bap_roi_grid side {cells}; expected 1 or 2.')
  return torch.stack(masks, dim=-2)


def pool_boxes(roi_features, weights, sample_valid, counts,
               roi_grid: Sequence[int] = (1, 1)):
  """`bap.pool_boxes`, Eq. (4): weighted means over each box's samples
  (per pooling window), (B, N, R, D)."""
  rows = _windows(counts[..., 0], roi_features.shape[2], roi_grid[0])
  cols = _windows(counts[..., 1], roi_features.shape[3], roi_grid[1])
  dtype = roi_features.dtype
  wv = torch.where(sample_valid, weights, 0.0).to(dtype)
  rows, cols = rows.to(dtype), cols.to(dtype)
  num = torch.einsum('bnai,bncj,bnij,bnijd->bnacd', rows, cols, wv,
                     roi_features)
  den = torch.einsum('bnai,bncj,bnij->bnac', rows, cols, wv)
  pooled = num / (den[..., None] + _EPS)
  batch, boxes = pooled.shape[:2]
  return pooled.reshape(batch, boxes, roi_grid[0] * roi_grid[1], -1)


def bap_forward(features, boxes, box_labels, valid, *, grid: int,
                roi_grid: Sequence[int], sampling: str, pooling: str,
                min_background_fraction: float,
                max_samples: int | None = None) -> dict:
  """`bap.bap_forward` on (B, h, w, D) features (Eqs. 1-4, with the GAP
  fallback of the official code)."""
  if pooling not in bana_bap.POOLING_MODES:
    raise ValueError(f'bap pooling={pooling!r}')
  h, w = features.shape[1], features.shape[2]
  image_hw = (valid.shape[1], valid.shape[2])
  if max_samples is None:
    max_samples = max(h, w) + 1
  real = box_labels > 0
  mask = background_mask(boxes, box_labels, valid)
  queries, query_valid = grid_queries(features, downsample_mask(mask, h, w),
                                      grid)
  coords, sample_valid, counts = box_sampling_grid(
      boxes, image_hw, (h, w), max_samples, sampling)
  sample_valid = sample_valid & real[..., None, None]
  roi = bilinear_sample(features, coords)
  background_fraction = mask.to(torch.float32).mean(dim=(1, 2))
  fallback = ((background_fraction <= min_background_fraction)
              | ~query_valid.any(-1))
  if pooling == 'bap':
    attention = background_attention(roi, queries, query_valid)
    attention = torch.where(fallback[:, None, None, None] | ~sample_valid,
                            0.0, attention)
  else:
    attention = torch.zeros(sample_valid.shape, dtype=roi.dtype)
  fg = pool_boxes(roi, 1.0 - attention, sample_valid, counts, roi_grid)
  labels = torch.where(real, box_labels.long(), -1)
  return {'fg': fg, 'fg_labels': labels[..., None].expand(fg.shape[:3]),
          'queries': queries, 'query_valid': query_valid,
          'attention': attention, 'fallback': fallback,
          'sample_valid': sample_valid,
          'background_fraction': background_fraction}


def bap_loss(out: dict, kernel: torch.Tensor,
             balance: bool) -> tuple[torch.Tensor, dict]:
  """`bap.bap_loss`: CE of the (D, C) classifier on the pooled box rows
  (their class) and the valid queries (class 0)."""
  dim = kernel.shape[0]
  fg = out['fg'].reshape(-1, dim)
  fg_targets = out['fg_labels'].reshape(-1)
  bg = out['queries'].reshape(-1, dim)
  bg_valid = out['query_valid'].reshape(-1)
  fg_logits = fg @ kernel
  bg_logits = bg @ kernel
  bg_targets = torch.where(bg_valid, 0, -1)
  fg_ce, fg_ok = softmax_cross_entropy(fg_logits, fg_targets)
  bg_ce, bg_ok = softmax_cross_entropy(bg_logits, bg_targets)
  if balance:
    loss = 0.5 * (safe_mean(fg_ce, fg_ok) + safe_mean(bg_ce, bg_ok))
  else:
    loss = safe_mean(torch.cat([fg_ce, bg_ce]), torch.cat([fg_ok, bg_ok]))
  with torch.no_grad():
    metrics = {
        'fg_accuracy': safe_mean(
            (fg_logits.argmax(-1) == fg_targets).float(), fg_ok),
        'bg_accuracy': safe_mean((bg_logits.argmax(-1) == 0).float(), bg_ok),
        'num_fg_rows': fg_ok.sum().float(),
        'num_bg_rows': bg_ok.sum().float(),
    }
  return loss, metrics


def labeler_loss(options) -> LossFn:
  """`bana.objective.classifier_loss(options)`: BAP on the backbone
  features, classified by the head's 1x1 kernel (context.model.head)."""
  def loss_fn(outputs, batch, context):
    weight = context.model.head.classifier.weight             # (C, D, 1, 1)
    kernel = weight[:, :, 0, 0].t()
    out = bap_forward(
        outputs['features'].permute(0, 2, 3, 1), batch[schema.BOXES],
        batch[schema.BOX_LABELS], batch[schema.VALID], grid=options.grid,
        roi_grid=options.roi_grid, sampling=options.sampling,
        pooling=options.pooling,
        min_background_fraction=options.min_background_fraction)
    return bap_loss(out, kernel, balance=options.balance_rows)
  return loss_fn


# ----------------------------------------------------------------------------
# Optimiser (wsss_jax.training.optim) and the train step
# ----------------------------------------------------------------------------
def flax_key(module: nn.Module, name: str) -> str:
  """Our flattened parameter key ('backbone/conv1_1/kernel') of torch
  parameter `name` ('backbone.conv1_1.weight')."""
  owner_path, _, leaf = name.rpartition('.')
  if leaf != 'bias':
    owner = module.get_submodule(owner_path)
    leaf = 'kernel' if isinstance(owner, nn.Conv2d) else 'scale'
  return '/'.join(owner_path.split('.') + [leaf])


def parameter_group_labels(module: nn.Module, head_modules: Sequence[str]
                           ) -> dict[str, tuple[str, bool]]:
  """{our parameter key: (group, weight decay)} of every torch parameter,
  by the rules of `optim.parameter_groups` / `optim.weight_decay_mask`: the
  head group when the top-level module is in `head_modules`, 'bias' leaves
  in the bias groups, the decay on kernels only (not biases nor BN scales)."""
  labels = {}
  for name, _ in module.named_parameters():
    key = flax_key(module, name)
    leaf = key.rpartition('/')[2]
    part = 'head' if name.split('.')[0] in head_modules else 'backbone'
    labels[key] = (f"{part}_{'bias' if leaf == 'bias' else 'weight'}",
                   leaf == 'kernel')
  return labels


def parameter_groups(module: nn.Module, optim_config) -> list[dict]:
  """torch param groups: one per (group, decay) of `parameter_group_labels`,
  lr = optim.lr × the group's multiplier."""
  labels = parameter_group_labels(module, tuple(optim_config.head_modules))
  lr = float(optim_config.lr)
  decay = float(optim_config.weight_decay)
  grouped: dict[tuple[str, bool], list[torch.Tensor]] = {}
  for name, param in module.named_parameters():
    grouped.setdefault(labels[flax_key(module, name)], []).append(param)
  return [{'params': params, 'name': group + '_decayed' * decayed,
           'lr': lr * float(optim_config.lr_mult[group]),
           'weight_decay': decay if decayed else 0.0}
          for (group, decayed), params in sorted(grouped.items())]


def schedule_factor(optim_config, num_steps: int) -> Callable[[int], float]:
  """The LambdaLR factor of `optim.make_schedule` at the 0-based step."""
  kind = optim_config.schedule
  if kind == 'poly':
    total = max(int(num_steps), 1)
    power = float(optim_config.poly_power)
    return lambda step: (1.0 - min(step, total) / total) ** power
  if kind == 'step':
    boundaries = sorted(int(round(f * num_steps))
                        for f in optim_config.step_boundaries)
    return lambda step: 0.1 ** sum(step >= b for b in boundaries)
  if kind == 'constant':
    return lambda step: 1.0
  raise ValueError(f'optim.schedule={kind!r}')


def make_optimizer(module: nn.Module, optim_config, num_steps: int):
  """(optimizer, LambdaLR scheduler) equal to `optim.make_optimizer`.

  PyTorch SGD adds λ·w to the gradient before the momentum buffer and
  applies the group's learning rate after it; Adam(weight_decay=λ) is L2 on
  the gradient: both are what our optax chain computes
  (add_decayed_weights -> sgd/adam -> ×group multiplier).
  """
  groups = parameter_groups(module, optim_config)
  if optim_config.name == 'sgd':
    optimizer = torch.optim.SGD(groups, lr=float(optim_config.lr),
                                momentum=float(optim_config.momentum))
  elif optim_config.name == 'adam':
    optimizer = torch.optim.Adam(
        groups, lr=float(optim_config.lr),
        betas=(float(optim_config.adam_b1), float(optim_config.adam_b2)),
        eps=float(optim_config.adam_eps))
  else:
    raise ValueError(f'optim.name={optim_config.name!r}')
  scheduler = torch.optim.lr_scheduler.LambdaLR(
      optimizer, schedule_factor(optim_config, num_steps))
  return optimizer, scheduler


class TrainStep:
  """One training step, as `step.make_train_step`'s jitted function:
  normalise the uint8 images, forward in train mode, loss, backward, global
  gradient norm, optimiser step, scheduler step.

  Calling it with a dict of torch tensors returns the metrics as floats
  (loss, the loss function's terms, grad_norm).
  """

  def __init__(self, model: nn.Module, loss_fn: LossFn,
               optimizer: torch.optim.Optimizer, scheduler,
               normalization: str,
               forward: Callable[[torch.Tensor], dict] | None = None):
    self.model = model
    self.loss_fn = loss_fn
    self.optimizer = optimizer
    self.scheduler = scheduler
    self.normalization = normalization
    self.forward = forward or model
    self.step = 0

  def __call__(self, batch: Mapping[str, torch.Tensor]) -> dict[str, float]:
    self.model.train()
    images = normalize_images(batch[schema.IMAGE], self.normalization)
    self.optimizer.zero_grad(set_to_none=True)
    outputs = self.forward(images)
    loss, metrics = self.loss_fn(outputs, batch,
                                 LossContext(self.step, self.model))
    loss.backward()
    grad_norm = torch.nn.utils.get_total_norm(
        [p.grad for p in self.model.parameters() if p.grad is not None])
    self.optimizer.step()
    self.scheduler.step()
    self.step += 1
    return {k: float(v.detach()) for k, v in dict(
        metrics, loss=loss, grad_norm=grad_norm).items()}


def segmenter_step(model: SegmenterTwin, optim_config, num_steps: int,
                   normalization: str, label_key: str = 'mask') -> TrainStep:
  """The twin of a segmenter step with `segmentation.cross_entropy_on`."""
  optimizer, scheduler = make_optimizer(model, optim_config, num_steps)
  return TrainStep(model, cross_entropy_on(label_key), optimizer, scheduler,
                   normalization)


def box2seg_step(model: Box2SegTwin, config, num_classes: int,
                 num_steps: int, normalization: str) -> TrainStep:
  """The twin of Box2Seg's phase-2 step (`objective.train_loss`)."""
  optimizer, scheduler = make_optimizer(model, config.optim, num_steps)
  options = box2seg_objective.Box2SegLossOptions.from_config(config.box2seg)
  return TrainStep(model, box2seg_train_loss(options, num_classes), optimizer,
                   scheduler, normalization)


def labeler_step(model: SegmenterTwin, config, num_steps: int,
                 normalization: str) -> TrainStep:
  """The twin of BANA's stage-1 step; `config` is what
  `bana.objective.classifier_config` returns."""
  optimizer, scheduler = make_optimizer(model, config.optim, num_steps)
  options = bana_objective.BapOptions.from_config(config.bana)
  return TrainStep(model, labeler_loss(options), optimizer, scheduler,
                   normalization,
                   forward=lambda images: model(images, with_logits=False))
