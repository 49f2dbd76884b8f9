"""Where each source name of a PyTorch checkpoint goes in wsss_jax's modules,
one rule table per layout (`convert_weights --layout=...`).

A rule maps a source module name (the key without its last `.leaf`) to a
wsss_jax module path, or marks it as known but unused; the conversion of the
arrays themselves (transposes, BN leaves, checks) is `convert_weights`'.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Callable, Mapping

LAYOUTS = ('torchvision_vgg16', 'deeplab_vgg16', 'lpg_vgg16',
           'torchvision_resnet101', 'deeplab_resnet101', 'psa_resnet38',
           'scalenet101', 'lpg_hourglass')

_VGG_CONVS = ('conv1_1', 'conv1_2', 'conv2_1', 'conv2_2', 'conv3_1', 'conv3_2',
              'conv3_3', 'conv4_1', 'conv4_2', 'conv4_3', 'conv5_1', 'conv5_2',
              'conv5_3')
# Index of each conv in an nn.Sequential of conv/ReLU/pool layers (torchvision
# and LPG agree up to conv5_3; LPG continues pool5, pool5a, fc6, ..., fc8).
_SEQUENTIAL_VGG = dict(zip((0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28),
                           ('backbone/' + name for name in _VGG_CONVS)))
_LPG_VGG = {**_SEQUENTIAL_VGG, 32: 'backbone/fc6', 35: 'backbone/fc7',
            38: 'head/classifier'}
_MSRA_BRANCH = {'reduce': '1', 'conv3x3': '2', 'increase': '3',
                'shortcut': 'shortcut', 'proj': 'shortcut'}
# PSA's ResNet-38 blocks (module names kept, see wsss_jax.models.resnet38).
_PSA_BLOCK = r'(b[2-7](?:_\d)?)'
_PSA_CONVS = r'(conv_branch1|conv_branch2a|conv_branch2b1|conv_branch2b2)'
_PSA_BNS = r'(bn_branch2a|bn_branch2b1|bn_branch2b2)'
# A CenterNet `residual`'s convs and BNs (wsss_jax.models.hourglass.Residual
# names, the skip nn.Sequential's two members renamed).
_RESIDUAL_CONVS = r'(conv1|conv2|skip\.0)'
_RESIDUAL_BNS = r'(bn1|bn2|skip\.1)'
_RESIDUAL_NAMES = {'skip.0': 'skip_conv', 'skip.1': 'skip_bn'}
# LPG's one-stack hourglass `kps.0`: any nesting of `low2.` (the level
# below), then a residual list and its index.
_HOURGLASS_LIST = r'kps\.0\.((?:low2\.)*)(up1|low1|low2|low3)\.(\d+)'


@dataclasses.dataclass(frozen=True)
class Rule:
  """Maps a source module name (key without its last `.leaf`) to a target.

  `target(match)` returns the wsss_jax module path or None (unrecognised);
  kind 'conv', 'bn', or 'unused' (known to have no place in the model).
  """
  pattern: str
  kind: str
  target: Callable[[re.Match], str | None] = lambda m: None
  reason: str = ''


def _table(table: Mapping[int, str]) -> Callable[[re.Match], str | None]:
  return lambda m: table.get(int(m.group(1)))


def _msra_block(m: re.Match) -> str:
  layer, block, branch, op = m.groups()
  suffix = _MSRA_BRANCH[branch]
  name = f'{suffix}_{op}' if suffix == 'shortcut' else f'{op}{suffix}'
  return f'backbone/layer{int(layer) - 1}/block{block}/{name}'


def _psa_block(m: re.Match) -> str | None:
  from wsss_jax.models import resnet38  # pylint: disable=g-import-not-at-top
  block, op = m.groups()
  names = [spec[0] for spec in resnet38.RES_BLOCKS + resnet38.BOTTLENECK_BLOCKS]
  return f'backbone/{block}/{op}' if block in names else None


def _torchvision_block(m: re.Match) -> str:
  layer, index, op, which = m.groups()
  return f'backbone/layer{layer}/block{int(index) + 1}/{op}{which}'


def _scale_branch(m: re.Match) -> str:
  """ScaleNet's branch i conv/BN (`conv2.i`, `bn2.i`) -> `conv2_i`/`bn2_i`."""
  layer, index, op, branch = m.groups()
  return f'backbone/layer{layer}/block{int(index) + 1}/{op}2_{branch}'


def _residual(m: re.Match) -> str:
  """`pre.1.<op>` -> pre/layers_1/<op> (skip.0/1 -> skip_conv/skip_bn)."""
  op, = m.groups()
  return f'pre/layers_1/{_RESIDUAL_NAMES.get(op, op)}'


def _hourglass_block(m: re.Match) -> str | None:
  """LPG's `kps.0.[low2.]*<list>.<i>.<op>` -> hourglass/[low2/]*<list>_<i>/
  <op>, for lists and indices the one-stack hourglass has (else None).

  Level d (d `low2.` prefixes) has BLOCKS[d] residuals in up1/low1/low3;
  only the bottom level's `low2` is a residual list (BLOCKS[-1] long).
  """
  from wsss_jax.models import hourglass  # pylint: disable=g-import-not-at-top
  nesting, name, index, op = m.groups()
  depth, index = nesting.count('low2.'), int(index)
  bottom = len(hourglass.DIMS) - 2
  if depth > bottom or (name == 'low2' and depth != bottom):
    return None
  count = hourglass.BLOCKS[-1] if name == 'low2' else hourglass.BLOCKS[depth]
  if index >= count:
    return None
  return ('hourglass/' + 'low2/' * depth
          + f'{name}_{index}/{_RESIDUAL_NAMES.get(op, op)}')


def _downsample(m: re.Match) -> str:
  layer, index, part = m.groups()
  name = 'shortcut_conv' if part == '0' else 'shortcut_bn'
  return f'backbone/layer{layer}/block{int(index) + 1}/{name}'


RULES = {
    'torchvision_vgg16': (
        Rule(r'features\.(\d+)', 'conv', _table(_SEQUENTIAL_VGG)),
        Rule(r'classifier\.\d+', 'unused',
              reason='ImageNet fully connected classifier, not in LargeFOV'),
    ),
    'deeplab_vgg16': (
        Rule(r'(conv[1-5]_[1-3]|fc6|fc7)', 'conv',
              lambda m: (f'backbone/{m.group(1)}'
                         if m.group(1) in _VGG_CONVS + ('fc6', 'fc7') else None)),
        Rule(r'fc8(?:_\w+)?', 'conv', lambda m: 'head/classifier'),
    ),
    'lpg_vgg16': (
        Rule(r'features\.(\d+)', 'conv', _table(_LPG_VGG)),
    ),
    'torchvision_resnet101': (
        Rule(r'conv1', 'conv', lambda m: 'backbone/conv1'),
        Rule(r'bn1', 'bn', lambda m: 'backbone/bn1'),
        Rule(r'layer([1-4])\.(\d+)\.(conv)([1-3])', 'conv', _torchvision_block),
        Rule(r'layer([1-4])\.(\d+)\.(bn)([1-3])', 'bn', _torchvision_block),
        Rule(r'layer([1-4])\.(\d+)\.downsample\.(0)', 'conv', _downsample),
        Rule(r'layer([1-4])\.(\d+)\.downsample\.(1)', 'bn', _downsample),
        Rule(r'fc', 'unused', reason='ImageNet classifier'),
    ),
    'deeplab_resnet101': (
        Rule(r'layer1\.conv1\.conv', 'conv', lambda m: 'backbone/conv1'),
        Rule(r'layer1\.conv1\.bn', 'bn', lambda m: 'backbone/bn1'),
        Rule(r'layer([2-5])\.block(\d+)\.(reduce|conv3x3|increase|shortcut|proj)'
              r'\.(conv)', 'conv', _msra_block),
        Rule(r'layer([2-5])\.block(\d+)\.(reduce|conv3x3|increase|shortcut|proj)'
              r'\.(bn)', 'bn', _msra_block),
        Rule(r'aspp\.(?:stages\.)?c(\d)', 'conv',
              lambda m: f'head/c{m.group(1)}'),
        Rule(r'fc', 'unused', reason='ImageNet classifier'),
    ),
    'psa_resnet38': (
        Rule(r'conv1a', 'conv', lambda m: 'backbone/conv1a'),
        Rule(r'bn7', 'bn', lambda m: 'backbone/bn7'),
        Rule(rf'{_PSA_BLOCK}\.{_PSA_CONVS}', 'conv', _psa_block),
        Rule(rf'{_PSA_BLOCK}\.{_PSA_BNS}', 'bn', _psa_block),
        Rule(r'fc8', 'conv', lambda m: 'classifier'),
        Rule(r'fc8_seg_conv([12])', 'conv',
              lambda m: f'head/conv{m.group(1)}'),
        Rule(r'linear1000', 'unused', reason='ImageNet classifier'),
    ),
    # ScaleNet's ImageNet `scalenet101.pth` (wsss_jax.models.scalenet): a
    # torchvision-like stem and blocks; branch i of a block is conv2.i/bn2.i.
    'scalenet101': (
        Rule(r'conv1', 'conv', lambda m: 'backbone/conv1'),
        Rule(r'bn1', 'bn', lambda m: 'backbone/bn1'),
        Rule(r'layer([1-4])\.(\d+)\.(conv)([13])', 'conv', _torchvision_block),
        Rule(r'layer([1-4])\.(\d+)\.(bn)([13])', 'bn', _torchvision_block),
        Rule(r'layer([1-4])\.(\d+)\.(conv)2\.([0-3])', 'conv', _scale_branch),
        Rule(r'layer([1-4])\.(\d+)\.(bn)2\.([0-3])', 'bn', _scale_branch),
        Rule(r'layer([1-4])\.(\d+)\.downsample\.(0)', 'conv', _downsample),
        Rule(r'layer([1-4])\.(\d+)\.downsample\.(1)', 'bn', _downsample),
        Rule(r'fc', 'unused', reason='ImageNet classifier'),
    ),
    # LPG's released generator checkpoints (wsss_jax.models.hourglass):
    # CenterNet's exkp with one stack and the single head `fm`.  A
    # multi-stack file's kps.1/cnvs.1/inters/inters_/cnvs_ keys and other
    # heads fit no rule and fail the conversion.
    'lpg_hourglass': (
        Rule(r'pre\.0\.conv', 'conv', lambda m: 'pre/layers_0/conv'),
        Rule(r'pre\.0\.bn', 'bn', lambda m: 'pre/layers_0/bn'),
        Rule(rf'pre\.1\.{_RESIDUAL_CONVS}', 'conv', _residual),
        Rule(rf'pre\.1\.{_RESIDUAL_BNS}', 'bn', _residual),
        Rule(rf'{_HOURGLASS_LIST}\.{_RESIDUAL_CONVS}', 'conv', _hourglass_block),
        Rule(rf'{_HOURGLASS_LIST}\.{_RESIDUAL_BNS}', 'bn', _hourglass_block),
        Rule(r'cnvs\.0\.conv', 'conv', lambda m: 'cnv/conv'),
        Rule(r'cnvs\.0\.bn', 'bn', lambda m: 'cnv/bn'),
        Rule(r'fm\.0\.0\.conv', 'conv', lambda m: 'fm/layers_0/conv'),
        Rule(r'fm\.0\.1', 'conv', lambda m: 'fm/layers_1'),
    ),
}
