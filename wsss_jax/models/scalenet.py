"""ScaleNet (scale-aggregation ResNet), the CAM backbone of PMM.

Li, Kuang, Chen and Zhang, "Data-driven Neuron Allocation for Scale
Aggregation Networks" (CVPR 2019).  A ResNet whose bottleneck 3x3 conv is
replaced by a scale-aggregation block: the reduced features go through four
branches, branch i max-pooled by `SCALES[i]` (none, 2, 4, 7), convolved,
brought back to the block's resolution and batch-normalised; the branches are
concatenated and expanded by a 1x1 conv as in a bottleneck.  How many output
channels each branch gets differs per block (the "neuron allocation" learnt
on ImageNet); it is a static structure, one entry per block,
(c_0, c_1, c_2, c_3, side): the four branch widths (0 = branch absent) and
the block's ImageNet feature side (56/28/14/7), which only decides the
branch kernel sizes (`branch_kernel_size`).  `SCALENET101_STRUCTURE` is
ScaleNet-101's; `load_structure` reads another from its json.

PMM (Li et al., ICCV 2021, Sec. 4.1; docs/pmm.md) runs ScaleNet-101 at output
stride 8: 7x7/2 stem conv, 3/2/1 max-pool, layer2 stride 2, layer3 and layer4
stride 1 without dilation, and its SEAM PCM reads layer2 (C3, 512 channels)
and layer3 (C4, 1024 channels).  A block strides by a floor-mode
stride x stride max-pool of its input, before both the main path and the
shortcut (a 1x1 conv + BN, first block of each stage only):

  module      blocks  planes  out (width 1)  side, OS 8
  conv1/bn1   stem            64             ceil(H / 2), then 3/2/1 pool
  layer1      3       64      256            ceil(ceil(H / 2) / 2)     (C2)
  layer2      4       128     512            floor of C2's / 2          (C3)
  layer3      23      256     1024           = C3's                     (C4)
  layer4      3       512     2048           = C3's                     (C5)

Module names follow the PyTorch state dict, so that
`wsss_jax.tools.convert_weights --layout=scalenet101` is a rename: stem
`conv1`/`bn1`, stages `layer1`..`layer4`, blocks `block1`.. (PyTorch index
+ 1), inside a block `conv1`/`bn1` (1x1 reduce), `conv2_i`/`bn2_i` (branch i,
PyTorch `conv2.i`/`bn2.i`), `conv3`/`bn3` (1x1 expand) and
`shortcut_conv`/`shortcut_bn` (PyTorch `downsample.0`/`downsample.1`).
The ImageNet weights expect RGB input normalised with the ImageNet mean and
std (`defaults.scalenet101_model` sets `weights_source='torchvision'`).
"""

from __future__ import annotations

import json
import os
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from wsss_jax.models import layers
from wsss_jax.ops.resize import resize_bilinear

STEM_CHANNELS = 64
STAGE_PLANES = (64, 128, 256, 512)
EXPANSION = 4
# Max-pool window (= stride) of each branch; branch 0 keeps the resolution.
SCALES = (1, 2, 4, 7)
SCALENET101_BLOCKS = (3, 4, 23, 3)
# output stride -> per-stage strides of layer1..layer4 (PMM uses 8; 32 is
# the ImageNet network).
STAGE_STRIDES = {
    8: (1, 2, 1, 1),
    16: (1, 2, 2, 1),
    32: (1, 2, 2, 2),
}

# ScaleNet-101's per-block allocation (c_0, c_1, c_2, c_3, ImageNet side),
# blocks in network order (3 + 4 + 23 + 3), from the authors' released
# structure file scalenet101.json.
SCALENET101_STRUCTURE = (
    (61, 11, 7, 7, 56), (56, 23, 4, 3, 56), (59, 24, 3, 0, 56),
    (123, 41, 1, 6, 28), (126, 38, 1, 6, 28), (127, 41, 3, 0, 28),
    (127, 41, 3, 0, 28),
    (220, 86, 35, 0, 14), (186, 64, 55, 36, 14), (156, 25, 53, 107, 14),
    (191, 44, 52, 54, 14), (181, 53, 83, 24, 14), (221, 82, 34, 4, 14),
    (177, 62, 90, 12, 14), (130, 75, 102, 34, 14), (206, 71, 55, 9, 14),
    (203, 83, 53, 2, 14), (207, 73, 54, 7, 14), (245, 84, 12, 0, 14),
    (221, 103, 17, 0, 14), (221, 100, 20, 0, 14), (158, 99, 84, 0, 14),
    (220, 106, 15, 0, 14), (173, 92, 73, 3, 14), (135, 122, 84, 0, 14),
    (109, 71, 132, 29, 14), (147, 94, 93, 7, 14), (191, 108, 42, 0, 14),
    (127, 95, 113, 6, 14), (203, 117, 21, 0, 14),
    (282, 377, 23, 0, 7), (279, 388, 15, 0, 7), (84, 442, 155, 1, 7),
)

Structure = tuple[tuple[int, int, int, int, int], ...]


def validate_structure(structure: Sequence[Sequence[int]],
                       blocks: Sequence[int] | None = None) -> Structure:
  """Checks a ScaleNet structure and returns it as a tuple of int 5-tuples.

  Args:
    structure: one (c_0, c_1, c_2, c_3, side) entry per block; widths >= 0,
      at least one > 0, side >= 1.
    blocks: blocks per stage; if given, their sum must equal the entries.

  Raises:
    ValueError: naming `structure` (or `blocks`) and the bad entry.
  """
  if isinstance(structure, (str, bytes)) or not isinstance(
      structure, Sequence) or not structure:
    raise ValueError(f'structure must be a non-empty list of (c0, c1, c2, '
                     f'c3, side) entries, got {structure!r}')
  result = []
  for index, entry in enumerate(structure):
    if (isinstance(entry, (str, bytes)) or not isinstance(entry, Sequence)
        or len(entry) != len(SCALES) + 1
        or not all(isinstance(v, int) and not isinstance(v, bool)
                   for v in entry)):
      raise ValueError(f'structure[{index}] must be {len(SCALES) + 1} ints '
                       f'(four branch widths and the side), got {entry!r}')
    *channels, side = entry
    if min(channels) < 0 or max(channels) < 1 or side < 1:
      raise ValueError(f'structure[{index}]={tuple(entry)}: branch widths '
                       f'must be >= 0 with one > 0, and the side >= 1')
    result.append(tuple(int(v) for v in entry))
  if blocks is not None:
    if len(blocks) != 4 or min(blocks) < 1:
      raise ValueError(f'blocks must be 4 positive counts, got '
                       f'{tuple(blocks)}')
    if sum(blocks) != len(result):
      raise ValueError(f'structure has {len(result)} entries but blocks '
                       f'{tuple(blocks)} need {sum(blocks)}')
  return tuple(result)


def load_structure(path: str | os.PathLike) -> Structure:
  """Reads a ScaleNet structure json (a list of [c0, c1, c2, c3, side]).

  The authors' `scalenet101.json` gives `SCALENET101_STRUCTURE`.

  Raises:
    ValueError: unreadable file or bad entries (naming the file).
  """
  path = os.fspath(path)
  try:
    with open(path, encoding='utf-8') as f:
      data = json.load(f)
  except (OSError, json.JSONDecodeError) as error:
    raise ValueError(f'structure file {path!r} is not a readable json: '
                     f'{error}') from error
  try:
    return validate_structure(data)
  except ValueError as error:
    raise ValueError(f'structure file {path!r}: {error}') from error


def resolve_structure(spec: str | os.PathLike | Sequence[Sequence[int]]
                      ) -> Structure:
  """The structure a config names: '' -> `SCALENET101_STRUCTURE`, a path ->
  `load_structure(path)`, a sequence of entries -> validated as it is."""
  if isinstance(spec, (str, os.PathLike)):
    return load_structure(spec) if os.fspath(spec) else SCALENET101_STRUCTURE
  return validate_structure(spec)


def branch_kernel_size(side: int, branch: int) -> int:
  """Kernel side of branch `branch`'s conv (ScaleNet's rule).

  3 (padding = dilation) when side / 2**branch > 1, else 1 (no padding):
  branches whose ImageNet map would be a single cell get a 1x1 conv.  Note
  the rule divides by 2**branch, not by `SCALES[branch]` (8, not 7, for
  branch 3), as the released weights were built.
  """
  return 3 if side / 2 ** branch > 1 else 1


def scale_pool(x: jax.Array, scale: int) -> jax.Array:
  """Max-pools a branch input by `scale` (window = stride, floor mode).

  A map smaller than `scale` on either side is reduced to one cell, its
  maximum (PMM's ScaleNet).  The official line passes (H, W) as PyTorch's
  (kernel, stride), which on a non-square map takes the maximum of the
  leading H x H square (H < W) or fails (H > W); the whole map is meant and
  taken here.  It only matters for inputs under 56 px (side < 7 at C3).

  Args:
    x: (B, H, W, C).
    scale: window and stride; 1 returns x.

  Returns:
    (B, floor(H / scale), floor(W / scale), C), or (B, 1, 1, C) when
    H < scale or W < scale; x's dtype.
  """
  if scale == 1:
    return x
  if x.shape[1] < scale or x.shape[2] < scale:
    return jnp.max(x, axis=(1, 2), keepdims=True)
  return layers.max_pool2d(x, scale, scale)


def restore_size(x: jax.Array, size: tuple[int, int]) -> jax.Array:
  """Upsamples a pooled branch back to the block's side `size` = (H, W).

  Nearest (pixel repetition) when both sides divide exactly, else bilinear
  with align_corners=False (PyTorch's `F.upsample` rule in ScaleNet).

  Args:
    x: (B, h, w, C) with h <= H, w <= W.
    size: (H, W).

  Returns:
    (B, H, W, C) in x's dtype.
  """
  height, width = int(size[0]), int(size[1])
  h, w = x.shape[1], x.shape[2]
  if (h, w) == (height, width):
    return x
  if height % h == 0 and width % w == 0:
    return jnp.repeat(jnp.repeat(x, height // h, axis=1), width // w, axis=2)
  return resize_bilinear(x, (height, width), align_corners=False)


class SABlock(nn.Module):
  """One scale-aggregation bottleneck (ScaleNet, Sec. 3; PMM's variant).

  x <- floor-mode stride x stride max-pool of x (stride > 1); h = ReLU(BN(
  1x1 conv(x))); branch i: `scale_pool` by SCALES[i] -> k x k conv
  (`branch_kernel_size`) -> `restore_size` -> BN; ReLU of the concatenated
  branches -> 1x1 conv -> BN; plus the shortcut (x, or BN(1x1 conv(x)) with
  `projection`); ReLU.  Branches of width 0 do not exist.

  Attributes:
    planes: reduce width (output is `features`).
    features: output channels.
    branches: the four branch widths (0 = absent).
    side: ImageNet side of the block (kernel sizes only).
    stride: max-pool stride applied first.
    dilation: dilation (= padding) of the 3x3 branch convs.
    projection: 1x1 conv + BN shortcut.
    frozen_bn: `FrozenBatchNorm` instead of a trained `nn.BatchNorm`.
    dtype: computation dtype.
  """
  planes: int
  features: int
  branches: tuple[int, ...]
  side: int
  stride: int = 1
  dilation: int = 1
  projection: bool = False
  frozen_bn: bool = True
  dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """(B, H, W, C_in) -> (B, H', W', features), H' = floor(H / stride)."""
    def conv(features, kernel, dilation, name):
      pad = dilation * (kernel // 2)
      return layers.conv2d(
          features, kernel, padding=pad, dilation=dilation if kernel > 1 else 1,
          use_bias=False, dtype=self.dtype,
          kernel_init=layers.HE_NORMAL_FAN_OUT, name=name)
    def norm(name):
      return layers.batch_norm(self.frozen_bn, train, self.dtype, name=name)

    if self.stride > 1:
      x = layers.max_pool2d(x, self.stride, self.stride)
    h = nn.relu(norm('bn1')(conv(self.planes, 1, 1, 'conv1')(x)))
    size = h.shape[1:3]
    outs = []
    for index, (scale, width) in enumerate(zip(SCALES, self.branches)):
      if width == 0:
        continue
      b = scale_pool(h, scale)
      b = conv(width, branch_kernel_size(self.side, index), self.dilation,
               f'conv2_{index}')(b)
      b = restore_size(b, size)
      outs.append(norm(f'bn2_{index}')(b))
    h = nn.relu(jnp.concatenate(outs, axis=-1))
    h = norm('bn3')(conv(self.features, 1, 1, 'conv3')(h))
    if self.projection:
      x = norm('shortcut_bn')(conv(self.features, 1, 1, 'shortcut_conv')(x))
    return nn.relu(h + x.astype(h.dtype))


def scaled_branches(branches: Sequence[int], width: float) -> tuple[int, ...]:
  """Branch widths times `width`, rounded, at least 1; absent (0) stay 0."""
  return tuple(0 if c == 0 else layers.scaled_channels(c, width)
               for c in branches)


class ScaleStage(nn.Module):
  """One stage: an `SABlock` per structure entry, named block1.., the first
  striding (and projecting when it strides or changes the channel count).

  Attributes:
    planes, features, stride, dilation, frozen_bn, dtype: as in `SABlock`
      (`stride` applies to the first block).
    entries: the stage's (c_0, c_1, c_2, c_3, side), already width-scaled.
  """
  planes: int
  features: int
  entries: Structure
  stride: int = 1
  dilation: int = 1
  frozen_bn: bool = True
  dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """(B, H, W, C_in) -> (B, floor(H / stride), floor(W / stride), out)."""
    for index, (*branches, side) in enumerate(self.entries):
      stride = self.stride if index == 0 else 1
      x = SABlock(
          planes=self.planes, features=self.features,
          branches=tuple(branches), side=side, stride=stride,
          dilation=self.dilation,
          projection=index == 0 and (stride != 1
                                     or x.shape[-1] != self.features),
          frozen_bn=self.frozen_bn, dtype=self.dtype,
          name=f'block{index + 1}')(x, train)
    return x


class ScaleNet(nn.Module):
  """ScaleNet backbone (default ScaleNet-101 at PMM's output stride 8).

  Attributes:
    structure: per-block (c_0, c_1, c_2, c_3, side), network order
      (`SCALENET101_STRUCTURE`, or `load_structure(json)`).
    blocks: blocks per stage layer1..layer4; sum = len(structure).
    width: multiplies every channel count, branch widths included (absent
      branches stay absent).
    output_stride: 8 (PMM), 16 or 32 (ImageNet); see `STAGE_STRIDES`.
    dilations: per-stage dilation of the 3x3 branch convs (PMM's CAM
      network: none).
    frozen_bn: frozen statistics and affine parameters (PMM freezes BN).
    dtype: computation dtype; parameters are float32.
  """
  structure: Structure = SCALENET101_STRUCTURE
  blocks: tuple[int, ...] = SCALENET101_BLOCKS
  width: float = 1.0
  output_stride: int = 8
  dilations: tuple[int, ...] = (1, 1, 1, 1)
  frozen_bn: bool = True
  dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> dict:
    """Runs the backbone.

    Args:
      x: (B, H, W, 3) normalised RGB images.
      train: batch statistics for a trained BN (ignored by frozen BN).

    Returns:
      {'features': C5 (B, h, w, 2048 * width), 'levels': {'c2': layer1
      (stride 4, 256 * width), 'c3': layer2 (512 * width), 'c4': layer3
      (1024 * width), 'c5': layer4}} in `dtype`; at output stride 8,
      h = floor(ceil(ceil(H / 2) / 2) / 2) (448 -> 56) for c3..c5.
    """
    structure = validate_structure(self.structure, self.blocks)
    if self.output_stride not in STAGE_STRIDES:
      raise ValueError(f'output_stride must be one of '
                       f'{sorted(STAGE_STRIDES)}, got {self.output_stride}')
    if len(self.dilations) != 4 or min(self.dilations) < 1:
      raise ValueError(f'dilations must be 4 positive ints, got '
                       f'{tuple(self.dilations)}')
    if self.width <= 0:
      raise ValueError(f'width must be > 0, got {self.width}')
    scaled = lambda channels: layers.scaled_channels(channels, self.width)
    x = layers.conv2d(scaled(STEM_CHANNELS), 7, stride=2, padding=3,
                      use_bias=False, dtype=self.dtype,
                      kernel_init=layers.HE_NORMAL_FAN_OUT,
                      name='conv1')(x.astype(self.dtype))
    x = nn.relu(layers.batch_norm(self.frozen_bn, train, self.dtype,
                                  name='bn1')(x))
    x = layers.max_pool2d(x, 3, stride=2, padding=1)
    strides = STAGE_STRIDES[self.output_stride]
    levels, start = {}, 0
    for stage, count in enumerate(self.blocks):
      x = ScaleStage(
          planes=scaled(STAGE_PLANES[stage]),
          features=scaled(STAGE_PLANES[stage] * EXPANSION),
          entries=tuple((*scaled_branches(entry[:-1], self.width), entry[-1])
                        for entry in structure[start:start + count]),
          stride=strides[stage],
          dilation=self.dilations[stage],
          frozen_bn=self.frozen_bn,
          dtype=self.dtype,
          name=f'layer{stage + 1}')(x, train)
      start += count
      levels[f'c{stage + 2}'] = x
    return {'features': x, 'levels': levels}
