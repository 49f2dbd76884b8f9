"""Model construction from a `wsss_jax.defaults` model config section.

    model = build_model(config.model, num_classes=21, dtype=jnp.bfloat16)
    variables = model.init(rng, images, train=False)
    out = model.apply(variables, images, train=True,
                      rngs={'dropout': key}, mutable=['batch_stats'])

Fields read (see `defaults.largefov_model` / `resnet101_model` /
`resnet38_model`): backbone, width, fc6_dilation, fc_dim, dropout, head,
head_bias, aspp_rates, aspp_dim, frozen_bn, and for ResNet resnet_blocks,
resnet_stride_in_1x1, resnet_stem_ceil_mode, output_stride (defaults used when
a config lacks them; ResNet-38 reads only width, frozen_bn and output_stride,
which must be 8).  head='psp' (`defaults.psp_model`) makes `build_model`
return a whole `pspnet.PSPNet` and reads psp_channels, psp_pool_scales,
psp_aux_level, psp_aux_channels and psp_dropout.  ScaleNet
(`defaults.scalenet101_model`) reads width, frozen_bn, output_stride,
scalenet_blocks, scalenet_structure ('' = ScaleNet-101's, else a .json path)
and scalenet_dilations.
"""

from __future__ import annotations

from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from wsss_jax.models import heads
from wsss_jax.models import layers
from wsss_jax.models import pspnet
from wsss_jax.models import resnet
from wsss_jax.models import resnet38
from wsss_jax.models import scalenet
from wsss_jax.models import segmenter
from wsss_jax.models import vgg

BACKBONES = ('vgg16_largefov', 'resnet101_deeplab', 'resnet38_psa',
             'scalenet101')
HEADS = ('linear', 'aspp_v2', 'cosine', 'dot', 'psp')

_RESNET_DEFAULTS = dict(resnet_blocks=(3, 4, 23, 3), resnet_stride_in_1x1=True,
                        resnet_stem_ceil_mode=True, output_stride=8)


def _field(config: Mapping[str, Any], name: str) -> Any:
  """config[name], falling back to the ResNet defaults; clear error if absent."""
  if name in config:
    return config[name]
  if name in _RESNET_DEFAULTS:
    return _RESNET_DEFAULTS[name]
  raise KeyError(f'model config has no field {name!r} (build it from '
                 f'wsss_jax.defaults.largefov_model / resnet101_model / '
                 f'resnet38_model)')


def compute_dtype(dtype: Any) -> jnp.dtype:
  """A jnp dtype from a dtype or a name ('float32', 'bfloat16', 'float16')."""
  resolved = jnp.dtype(dtype)
  if not jnp.issubdtype(resolved, jnp.floating):
    raise ValueError(f'compute dtype must be floating, got {resolved}')
  return resolved


def build_backbone(model_config: Mapping[str, Any],
                   dtype: Any = jnp.float32) -> nn.Module:
  """The backbone module named by `model_config.backbone` (unbound, unnamed)."""
  dtype = compute_dtype(dtype)
  name = _field(model_config, 'backbone')
  width = float(_field(model_config, 'width'))
  if width <= 0:
    raise ValueError(f'model.width must be > 0, got {width}')
  if name == 'vgg16_largefov':
    return vgg.VGG16LargeFOV(
        width=width,
        fc6_dilation=int(_field(model_config, 'fc6_dilation')),
        fc_dim=int(_field(model_config, 'fc_dim')),
        dropout=float(_field(model_config, 'dropout')),
        batch_norm=bool(model_config.get('batch_norm', False)),
        dtype=dtype)
  if name == 'resnet101_deeplab':
    return resnet.ResNetDeepLab(
        blocks=tuple(int(b) for b in _field(model_config, 'resnet_blocks')),
        width=width,
        stride_in_1x1=bool(_field(model_config, 'resnet_stride_in_1x1')),
        stem_ceil_mode=bool(_field(model_config, 'resnet_stem_ceil_mode')),
        output_stride=int(_field(model_config, 'output_stride')),
        frozen_bn=bool(_field(model_config, 'frozen_bn')),
        dtype=dtype)
  if name == 'resnet38_psa':
    output_stride = int(_field(model_config, 'output_stride'))
    if output_stride != 8:
      raise ValueError(f'model.output_stride={output_stride}: resnet38_psa has '
                       f'fixed dilations, output stride 8 only')
    return resnet38.ResNet38(width=width,
                             frozen_bn=bool(_field(model_config, 'frozen_bn')),
                             dtype=dtype)
  if name == 'scalenet101':
    return scalenet.ScaleNet(
        structure=scalenet.resolve_structure(
            model_config.get('scalenet_structure', '')),
        blocks=tuple(int(b) for b in model_config.get(
            'scalenet_blocks', scalenet.SCALENET101_BLOCKS)),
        width=width,
        output_stride=int(_field(model_config, 'output_stride')),
        dilations=tuple(int(d) for d in model_config.get(
            'scalenet_dilations', (1, 1, 1, 1))),
        frozen_bn=bool(_field(model_config, 'frozen_bn')),
        dtype=dtype)
  raise ValueError(f'model.backbone={name!r} is unknown; choose one of '
                   f'{BACKBONES}')


def build_head(model_config: Mapping[str, Any], num_classes: int,
               dtype: Any = jnp.float32) -> nn.Module:
  """The head module named by `model_config.head` (unbound, unnamed)."""
  dtype = compute_dtype(dtype)
  if int(num_classes) < 1:
    raise ValueError(f'num_classes must be >= 1, got {num_classes}')
  name = _field(model_config, 'head')
  if name == 'psp':
    raise ValueError("model.head='psp' is a whole network (PSP head + "
                     "auxiliary FCN head); use build_model")
  use_bias = bool(_field(model_config, 'head_bias'))
  if name == 'linear':
    return heads.LinearHead(num_classes=int(num_classes), use_bias=use_bias,
                            dtype=dtype)
  if name in ('cosine', 'dot'):
    return heads.CosineHead(
        num_classes=int(num_classes), kind=name,
        temperature=float(model_config.get('cosine_temperature',
                                           heads.COSINE_TEMPERATURE)),
        dtype=dtype)
  if name == 'aspp_v2':
    return heads.ASPPV2Head(
        num_classes=int(num_classes),
        rates=tuple(int(r) for r in _field(model_config, 'aspp_rates')),
        aspp_dim=int(_field(model_config, 'aspp_dim')),
        use_bias=use_bias,
        classifier=str(model_config.get('aspp_classifier', 'linear')),
        temperature=float(model_config.get('cosine_temperature',
                                           heads.COSINE_TEMPERATURE)),
        dtype=dtype)
  raise ValueError(f'model.head={name!r} is unknown; choose one of {HEADS}')


def build_model(model_config: Mapping[str, Any], num_classes: int,
                dtype: Any = jnp.float32) -> nn.Module:
  """A `Segmenter` with top-level parameter entries `backbone` and `head`.

  With `model_config.head == 'psp'` a `pspnet.PSPNet` instead (entries
  `backbone`, `head`, `aux_head`; outputs add 'aux_logits').

  Args:
    model_config: a `wsss_jax.defaults` model section (ConfigDict or dict).
    num_classes: classifier outputs (background included).
    dtype: computation dtype (e.g. bfloat16 on accelerators); parameters are
      float32 and logits are returned in float32.

  Returns:
    An unbound module; `apply(variables, images, train=...)` returns
    {'logits', 'features'[, 'levels']} (see `segmenter.Segmenter`).
  """
  if _field(model_config, 'head') == 'psp':
    if int(num_classes) < 1:
      raise ValueError(f'num_classes must be >= 1, got {num_classes}')
    return pspnet.PSPNet(
        backbone=build_backbone(model_config, dtype),
        num_classes=int(num_classes),
        channels=int(model_config.get('psp_channels', 512)),
        pool_scales=tuple(int(s) for s in
                          model_config.get('psp_pool_scales', (1, 2, 3, 6))),
        aux_level=str(model_config.get('psp_aux_level', 'c4')),
        aux_channels=int(model_config.get('psp_aux_channels', 256)),
        dropout=float(model_config.get('psp_dropout', 0.1)),
        dtype=compute_dtype(dtype))
  return segmenter.Segmenter(
      backbone=build_backbone(model_config, dtype),
      head=build_head(model_config, num_classes, dtype))


def feature_size(model_config: Mapping[str, Any], size: int) -> int:
  """Side of the logit map for an input side `size` (PyTorch size rules).

  VGG: three floor-mode 3/2/1 max-pools, each n -> ceil(n / 2) (321 -> 41).
  ResNet-38: three stride-2 blocks (3x3/2/1 conv), each n -> ceil(n / 2).
  ResNet: 7x7/2 stem conv (n -> ceil(n / 2)), 3/2/1 stem max-pool (ceil or
  floor mode), then one n -> ceil(n / 2) per stride-2 stage.
  ScaleNet: the same stem (floor-mode pool), then one n -> floor(n / 2)
  (a 2/2 max-pool) per stride-2 stage (448 -> 56 at output stride 8).
  """
  name = _field(model_config, 'backbone')
  halve = lambda n: -(-n // 2)
  if name in ('vgg16_largefov', 'resnet38_psa'):
    return halve(halve(halve(size)))
  if name == 'resnet101_deeplab':
    size = layers.pool_output_size(
        halve(size), 3, 2, 1, bool(_field(model_config,
                                          'resnet_stem_ceil_mode')))
    strides, _ = resnet.STAGE_GEOMETRY[int(_field(model_config,
                                                  'output_stride'))]
    for stride in strides:
      if stride == 2:
        size = halve(size)
    return size
  if name == 'scalenet101':
    size = layers.pool_output_size(halve(size), 3, 2, 1, False)
    output_stride = int(_field(model_config, 'output_stride'))
    if output_stride not in scalenet.STAGE_STRIDES:
      raise ValueError(f'model.output_stride must be one of '
                       f'{sorted(scalenet.STAGE_STRIDES)}, got {output_stride}')
    for stride in scalenet.STAGE_STRIDES[output_stride]:
      size //= stride
    return size
  raise ValueError(f'model.backbone={name!r} is unknown; choose one of '
                   f'{BACKBONES}')


def abstract_variables(model: nn.Module, image_size: int = 65,
                       batch_size: int = 1) -> dict:
  """Variable shapes/dtypes of `model` (jax.ShapeDtypeStruct leaves), no compute."""
  images = jax.ShapeDtypeStruct((batch_size, image_size, image_size, 3),
                                jnp.float32)
  return jax.eval_shape(
      lambda rng, x: model.init(rng, x, train=False),
      jax.ShapeDtypeStruct((2,), jnp.uint32), images)


def param_count(tree: Any) -> int:
  """Total number of elements over the array (or ShapeDtypeStruct) leaves."""
  return int(sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree)))
