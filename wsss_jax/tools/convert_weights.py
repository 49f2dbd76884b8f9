"""Convert PyTorch(-named) checkpoints to wsss_jax `.npz` weight files.

    python -m wsss_jax.tools.convert_weights --input=vgg16_20M.pth \\
        --layout=deeplab_vgg16 --output=vgg16_20M.npz --report

Input: a PyTorch state dict (`.pth`/`.pt`, read with `torch.load(...,
weights_only=True)`; PyTorch is imported only for these) or an `.npz` holding
the same PyTorch names (no PyTorch needed).  A common wrapper prefix
(`module.`, `base.`, `scale.`) shared by every key is stripped.

Layouts (source names -> wsss_jax modules, rule tables in `weight_layouts`):
  torchvision_vgg16       features.{0,2,..,28} -> conv1_1..conv5_3; the
                          ImageNet classifier is unused (fc6/fc7 not produced).
  deeplab_vgg16           conv1_1..conv5_3, fc6 (1024x512x3x3), fc7, fc8* as
                          in DeepLab's vgg16_20M conversions (BANA).
  lpg_vgg16               LPG's nn.Sequential: features.{0..28} convs,
                          features.32 = fc6, .35 = fc7, .38 = fc8 (classifier).
  torchvision_resnet101   conv1, bn1, layerL.i.{conv,bn}{1,2,3},
                          layerL.i.downsample.{0,1}; model needs
                          resnet_stride_in_1x1=False, resnet_stem_ceil_mode=False.
  deeplab_resnet101       kazuto1011/deeplab-pytorch MSRA names:
                          layer1.conv1.{conv,bn}, layerL.blockI.{reduce,conv3x3,
                          increase,shortcut|proj}.{conv,bn}, aspp.c{0..3}.
  psa_resnet38            PSA/AffinityNet's ResNet-38 (its ImageNet file and
                          PSA/RRM checkpoints): conv1a, b2..b7 (bn_branch2a,
                          conv_branch1, conv_branch2a, bn_branch2b1, ...), bn7
                          -> the same names under backbone/; RRM's fc8 ->
                          classifier, fc8_seg_conv{1,2} -> head/conv{1,2}
                          (the parameter tree of wsss_jax.methods.rrm).
  scalenet101             ScaleNet-101's ImageNet file (PMM's CAM backbone):
                          conv1, bn1, layerL.i.{conv1,bn1,conv2.j,bn2.j,conv3,
                          bn3,downsample.{0,1}} -> backbone/layerL/block<i+1>/
                          {conv1,bn1,conv2_j,bn2_j,conv3,bn3,shortcut_*}.
  lpg_hourglass           LPG's pseudo-mask generator (a one-stack CenterNet
                          hourglass, wsss_jax.models.hourglass): pre.0.{conv,bn},
                          pre.1.*, kps.0.[low2.]*{up1,low1,low2,low3}.i.*,
                          cnvs.0.{conv,bn}, fm.0.0.conv, fm.0.1 -> pre/layers_0,
                          pre/layers_1, hourglass/[low2/]*<list>_i, cnv,
                          fm/layers_{0,1}; a residual's skip.{0,1} ->
                          skip_conv/skip_bn.  Multi-stack keys (kps.1, inters,
                          inters_, cnvs_) and other heads are errors.

Conversions: conv weight OIHW -> kernel HWIO (a 2-D [out, in] weight becomes a
1x1 kernel), BN weight/bias/running_mean/running_var -> scale/bias/mean/var;
scale/bias go to `batch_stats` for frozen BN (default) or `params`
(`--bn=trainable`), mean/var always to `batch_stats`.  `--caffe_bn` divides
BN mean/var by the caffe scale-factor blob, stored as `<bn>.scale_factor`.
Channel order is kept: caffe-trained weights expect BGR input, which is what
`wsss_jax.ops.image.normalize_images(..., 'caffe')` produces.
`--flip_first_conv` reverses the first conv's input channels instead (for
feeding RGB to BGR-trained weights, or the reverse).

The result is checked against the wsss_jax model built from the shapes found
(width, fc_dim, block counts, classes; for psa_resnet38 the backbone plus
RRM's classifier and segmentation branch; for lpg_hourglass the
HourglassNet of the file's width, input channels and outputs): shape mismatches and unrecognised
source keys are errors; model keys not produced are reported.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from typing import Any, Mapping

import numpy as np

from wsss_jax.tools.weight_layouts import LAYOUTS, RULES

_WRAPPER_PREFIXES = ('module.', 'base.', 'scale.')

# RRM's segmentation branch width (RRMNet.seg_channels), assumed when a file
# has no fc8_seg_conv1 to read it from.
_RRM_SEG_CHANNELS = 512
_BN_LEAVES = {'weight': 'scale', 'bias': 'bias', 'running_mean': 'mean',
              'running_var': 'var'}


class ConversionError(ValueError):
  """The source checkpoint does not fit the chosen layout."""


def strip_wrapper_prefix(state: Mapping[str, Any]) -> tuple[dict, str]:
  """Removes wrapper prefixes (DataParallel `module.`, MSC `base.`/`scale.`)
  shared by every key; returns (state, stripped prefix)."""
  state, stripped = dict(state), ''
  while state:
    prefix = next((p for p in _WRAPPER_PREFIXES
                   if all(k.startswith(p) for k in state)), None)
    if prefix is None:
      break
    state = {k[len(prefix):]: v for k, v in state.items()}
    stripped += prefix
  return state, stripped


def _conv_leaf(key: str, leaf: str, value: np.ndarray) -> tuple[str, np.ndarray]:
  if leaf == 'bias':
    if value.ndim != 1:
      raise ConversionError(f'{key}: a bias must be 1-D, got {value.shape}')
    return 'bias', value
  if leaf != 'weight':
    raise ConversionError(f'{key}: unknown conv parameter {leaf!r}')
  if value.ndim == 4:                               # OIHW -> HWIO
    return 'kernel', np.transpose(value, (2, 3, 1, 0))
  if value.ndim == 2:                               # [out, in] -> 1x1 HWIO
    return 'kernel', value.T[None, None]
  raise ConversionError(f'{key}: a conv weight must be 4-D (OIHW) or 2-D, got '
                        f'{value.shape}')


def _put(out: dict, sources: dict, target: str, array: np.ndarray,
         source: str) -> None:
  """out[target] = float32 array, refusing two sources for one target."""
  if target in out:
    raise ConversionError(f'{source} and {sources[target]} both map to '
                          f'{target}')
  out[target], sources[target] = array.astype(np.float32), source


def convert_state_dict(state: Mapping[str, Any], layout: str, *,
                       caffe_bn: bool = False, frozen_bn: bool = True,
                       flip_first_conv: bool = False,
                       allow_unrecognised: bool = False) -> tuple[dict, dict]:
  """Converts {PyTorch name: array} to {wsss_jax '/'-joined key: array}.

  Args:
    state: source arrays (numpy or anything `np.asarray` accepts).
    layout: one of `LAYOUTS`.
    caffe_bn: divide BN running mean/var by the `<bn>.scale_factor` blob.
    frozen_bn: BN scale/bias into `batch_stats` (else `params`).
    flip_first_conv: reverse the first conv's input channels (BGR <-> RGB).
    allow_unrecognised: list unknown source keys as unused instead of failing.

  Returns:
    (flat arrays, report) with report keys layout, stripped_prefix,
    converted, unused [(key, reason)], first_conv_flipped.
  """
  if layout not in LAYOUTS:
    raise ConversionError(f'unknown layout {layout!r}; choose one of {LAYOUTS}')
  state, stripped = strip_wrapper_prefix(state)
  bn_collection = 'batch_stats' if frozen_bn else 'params'
  out, sources, unused, unrecognised, factors = {}, {}, [], [], {}
  for key in sorted(state):
    value = np.asarray(state[key])
    module, _, leaf = key.rpartition('.')
    rule = next((r for r in RULES[layout] if re.fullmatch(r.pattern, module)),
                None)
    match = re.fullmatch(rule.pattern, module) if rule else None
    target = rule.target(match) if rule and rule.kind != 'unused' else None
    if rule and rule.kind == 'unused':
      unused.append((key, rule.reason))
    elif target is None:
      unrecognised.append(key)
    elif rule.kind == 'conv':
      name, array = _conv_leaf(key, leaf, value)
      _put(out, sources, f'params/{target}/{name}', array, key)
    elif leaf == 'num_batches_tracked':
      unused.append((key, 'BN update counter'))
    elif leaf == 'scale_factor' and caffe_bn:
      factors[target] = value
    elif leaf in _BN_LEAVES:
      if value.ndim != 1:
        raise ConversionError(f'{key}: BN vectors must be 1-D, got {value.shape}')
      name = _BN_LEAVES[leaf]
      collection = bn_collection if name in ('scale', 'bias') else 'batch_stats'
      _put(out, sources, f'{collection}/{target}/{name}', value, key)
    else:
      unrecognised.append(key)
  if unrecognised and not allow_unrecognised:
    raise ConversionError(
        f'{len(unrecognised)} source keys do not fit layout {layout!r} '
        f'(wrong --layout? caffe scale factors need --caffe_bn): '
        + ', '.join(unrecognised[:20]))
  unused += [(key, 'unrecognised') for key in unrecognised]
  if caffe_bn:
    _apply_caffe_factors(out, factors)
  flipped = flip_first_conv and _flip_first_conv(out)
  report = dict(layout=layout, stripped_prefix=stripped, converted=len(out),
                unused=unused, first_conv_flipped=flipped,
                caffe_bn=caffe_bn, bn_collection=bn_collection)
  return out, report


def _apply_caffe_factors(out: dict, factors: Mapping[str, np.ndarray]) -> None:
  """Divides each BN's mean/var by its caffe scale factor (0 -> statistics 0,
  caffe's rule)."""
  bn_modules = {key.rsplit('/', 1)[0].split('/', 1)[1] for key in out
                if key.startswith('batch_stats/') and key.endswith('/mean')}
  lacking = sorted(bn_modules - set(factors))
  if lacking:
    raise ConversionError(f'--caffe_bn: no scale_factor for BN modules '
                          f'{lacking[:20]}')
  for module, factor in factors.items():
    factor = float(np.asarray(factor).reshape(-1)[0])
    multiplier = 0.0 if factor == 0 else 1.0 / factor
    for name in ('mean', 'var'):
      key = f'batch_stats/{module}/{name}'
      if key not in out:
        raise ConversionError(f'--caffe_bn: scale factor for {module} without '
                              f'running_{name}')
      out[key] = (out[key] * multiplier).astype(np.float32)


def _flip_first_conv(out: dict) -> bool:
  """Reverses the first conv's input channels in place (BGR <-> RGB)."""
  key = next((k for k in ('params/backbone/conv1_1/kernel',
                          'params/backbone/conv1/kernel',
                          'params/backbone/conv1a/kernel',
                          'params/pre/layers_0/conv/kernel') if k in out),
             None)
  if key is None:
    raise ConversionError('--flip_first_conv: the input has no first conv')
  if out[key].shape[2] != 3:
    raise ConversionError(f'{key}: first conv has {out[key].shape[2]} input '
                          f'channels, cannot reverse their order')
  out[key] = np.ascontiguousarray(out[key][:, :, ::-1, :])
  return True


def _block_counts(flat: Mapping[str, np.ndarray]) -> list[int]:
  """Blocks per stage layer1..layer4 of a converted ResNet-like backbone."""
  blocks = []
  for layer in range(1, 5):
    found = [int(m.group(1)) for k in flat
             if (m := re.match(rf'params/backbone/layer{layer}/block(\d+)/', k))]
    if not found:
      raise ConversionError(f'no blocks found for stage layer{layer}')
    blocks.append(max(found))
  return blocks


def infer_model_config(flat: Mapping[str, np.ndarray], layout: str,
                       frozen_bn: bool = True):
  """The wsss_jax model config whose variables the converted arrays describe.

  Returns (model_config ConfigDict, num_classes); widths, fc_dim, block counts
  and the class count come from the array shapes (psa_resnet38: RRM's class
  count with background, fc8's outputs + 1).
  """
  from wsss_jax import defaults   # pylint: disable=g-import-not-at-top
  def out_channels(key, default):
    return int(flat[key].shape[-1]) if key in flat else default
  if layout == 'lpg_hourglass':
    return _hourglass_config(flat, frozen_bn)
  if layout == 'psa_resnet38':
    config = defaults.resnet38_model()
    config.frozen_bn = frozen_bn
    stem = 'params/backbone/conv1a/kernel'
    # RRM's classifier has K outputs (no background), its segmentation
    # branch K + 1.
    num_classes = out_channels('params/classifier/kernel', 0) + 1
    if num_classes == 1:
      num_classes = out_channels('params/head/conv2/kernel', 21)
    head_key = None
  elif layout == 'scalenet101':
    config = defaults.scalenet101_model()
    config.frozen_bn = frozen_bn
    stem = 'params/backbone/conv1/kernel'
    config.scalenet_blocks = tuple(_block_counts(flat))
    # The ImageNet file holds no segmentation head.
    num_classes = 21
    head_key = None
  elif layout.endswith('vgg16'):
    config = defaults.largefov_model()
    stem = 'params/backbone/conv1_1/kernel'
    config.fc_dim = out_channels('params/backbone/fc7/kernel',
                                 out_channels('params/backbone/fc6/kernel', 1024))
    config.head = 'linear'
    head_key = 'params/head/classifier'
  else:
    config = defaults.resnet101_model()
    stem = 'params/backbone/conv1/kernel'
    torchvision = layout.startswith('torchvision')
    config.resnet_stride_in_1x1 = not torchvision
    config.resnet_stem_ceil_mode = not torchvision
    config.frozen_bn = frozen_bn
    config.resnet_blocks = tuple(_block_counts(flat))
    branches = sorted({int(m.group(1)) for k in flat
                       if (m := re.match(r'params/head/c(\d)/', k))})
    if branches:
      if len(branches) > len(config.aspp_rates):
        raise ConversionError(f'{len(branches)} ASPP branches, at most '
                              f'{len(config.aspp_rates)} supported')
      config.aspp_rates = tuple(config.aspp_rates)[:len(branches)]
    head_key = 'params/head/c0'
  if stem not in flat:
    raise ConversionError(f'the first conv ({stem}) is missing from the input')
  config.width = out_channels(stem, 64) / 64.0
  if head_key is not None:
    num_classes = out_channels(f'{head_key}/kernel', 21)
    config.head_bias = (f'{head_key}/bias' in flat
                        or f'{head_key}/kernel' not in flat)
  return config, num_classes


def _hourglass_config(flat: Mapping[str, np.ndarray], frozen_bn: bool):
  """(config, outputs) of LPG's HourglassNet from converted arrays: width
  from the stem conv's outputs (48 at width 1), input channels from its
  inputs (4 or 5 in LPG), outputs from the `fm` head's last conv."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  from wsss_jax.models import hourglass  # pylint: disable=g-import-not-at-top
  stem = 'params/pre/layers_0/conv/kernel'
  if stem not in flat:
    raise ConversionError(f'the first conv ({stem}) is missing from the input')
  head = 'params/fm/layers_1/kernel'
  config = ml_collections.ConfigDict(dict(
      backbone='lpg_hourglass',
      width=int(flat[stem].shape[-1]) / hourglass.STEM_CHANNELS,
      input_channels=int(flat[stem].shape[2]),
      frozen_bn=frozen_bn))
  outputs = int(flat[head].shape[-1]) if head in flat else 2
  return config, outputs


def _rrm_branch_shapes(flat: Mapping[str, np.ndarray], features: int,
                       num_classes: int) -> dict[str, tuple]:
  """Shapes of RRM's classifier and segmentation branch (the `classifier`
  and `head` entries of wsss_jax.methods.rrm.model.RRMNet) on `features`
  backbone channels; the hidden width is the file's, else RRM's 512."""
  hidden = (int(flat['params/head/conv1/kernel'].shape[-1])
            if 'params/head/conv1/kernel' in flat else _RRM_SEG_CHANNELS)
  return {
      'params/classifier/kernel': (1, 1, features, num_classes - 1),
      'params/head/conv1/kernel': (3, 3, features, hidden),
      'params/head/conv1/bias': (hidden,),
      'params/head/conv2/kernel': (3, 3, hidden, num_classes),
      'params/head/conv2/bias': (num_classes,),
  }


def _model_shapes(flat: Mapping[str, np.ndarray], layout: str, config,
                  num_classes: int) -> dict[str, tuple]:
  """{model key: shape} of the network the converted arrays feed."""
  from wsss_jax.models import build   # pylint: disable=g-import-not-at-top
  from wsss_jax.models import weights  # pylint: disable=g-import-not-at-top
  def shapes(variables, prefix=''):
    return {f'{collection}/{prefix}{rest}': tuple(leaf.shape)
            for key, leaf in weights.flatten_variables(variables).items()
            for collection, rest in [key.split('/', 1)]}
  if layout == 'lpg_hourglass':
    from wsss_jax.models import hourglass  # pylint: disable=g-import-not-at-top
    model = hourglass.HourglassNet(width=config.width, num_outputs=num_classes,
                                   frozen_bn=config.frozen_bn)
    return shapes(hourglass.abstract_variables(model, config.input_channels))
  if layout != 'psa_resnet38':
    model = build.build_model(config, num_classes)
    return shapes(build.abstract_variables(model))
  # RRM's network lives in a method package, which tools do not import
  # (docs/architecture.md): the backbone is built, the two branches known.
  backbone = shapes(build.abstract_variables(build.build_backbone(config)),
                    'backbone/')
  features = backbone['params/backbone/b7/conv_branch2b2/kernel'][-1]
  return {**backbone, **_rrm_branch_shapes(flat, features, num_classes)}


def check_against_model(flat: Mapping[str, np.ndarray], layout: str,
                        frozen_bn: bool = True) -> dict:
  """Compares converted arrays with the variables of the inferred model.

  Returns {'inferred_model': {...}, 'not_produced': [model keys absent]};
  raises ConversionError on keys the model lacks or on shape mismatches.
  """
  config, num_classes = infer_model_config(flat, layout, frozen_bn)
  expected = _model_shapes(flat, layout, config, num_classes)
  extra = sorted(set(flat) - set(expected))
  mismatch = [(k, tuple(v.shape), expected[k]) for k, v in flat.items()
              if k in expected and tuple(v.shape) != expected[k]]
  if extra or mismatch:
    raise ConversionError(
        f'converted arrays do not fit the inferred model: keys without a model '
        f'leaf {extra[:20]}; shape mismatches (key, converted, model) '
        f'{mismatch[:20]}')
  summary = {k: (list(v) if isinstance(v, tuple) else v)
             for k, v in config.to_dict().items()}
  summary['num_classes'] = num_classes
  return dict(inferred_model=summary,
              not_produced=sorted(set(expected) - set(flat)))


def read_source(path: str) -> dict[str, np.ndarray]:
  """{name: array} from a `.npz` of PyTorch names or a PyTorch state dict."""
  if not os.path.isfile(path):
    raise ConversionError(f'input file {path!r} does not exist')
  if path.endswith('.npz'):
    with np.load(path, allow_pickle=False) as archive:
      return {key: archive[key] for key in archive.files}
  if not path.endswith(('.pth', '.pt', '.pkl', '.bin')):
    raise ConversionError(f'{path}: expected a .pth/.pt state dict or a .npz')
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as error:
    raise ConversionError('reading .pth files needs PyTorch (pip install '
                          '"wsss_jax[torch]"), or save the state dict as .npz '
                          'of numpy arrays') from error
  state = torch.load(path, map_location='cpu', weights_only=True)
  for wrapper in ('state_dict', 'model'):
    if isinstance(state, Mapping) and isinstance(state.get(wrapper), Mapping):
      state = state[wrapper]
  if not isinstance(state, Mapping):
    raise ConversionError(f'{path}: expected a state dict, got {type(state)}')
  arrays = {}
  for key, value in state.items():
    if not torch.is_tensor(value):
      raise ConversionError(f'{path}: entry {key!r} is not a tensor')
    value = value.detach().cpu()
    if value.is_floating_point():
      value = value.float()
    arrays[key] = value.numpy()
  return arrays


def convert_file(input_path: str, layout: str, output_path: str,
                 **options) -> dict:
  """Reads, converts, checks and saves; returns the full report."""
  from wsss_jax.models import weights  # pylint: disable=g-import-not-at-top
  flat, report = convert_state_dict(read_source(input_path), layout, **options)
  report.update(check_against_model(flat, layout,
                                    options.get('frozen_bn', True)))
  report.update(input=input_path, output=output_path,
                sha256=weights.save_weights(output_path, flat))
  return report


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
      prog='python -m wsss_jax.tools.convert_weights',
      description=__doc__.split('\n\n')[0])
  parser.add_argument('--input', required=True, help='.pth/.pt or .npz')
  parser.add_argument('--layout', required=True, choices=LAYOUTS)
  parser.add_argument('--output', required=True, help='.npz to write')
  parser.add_argument('--report', action='store_true',
                      help='print the full JSON report')
  parser.add_argument('--caffe_bn', '--caffe-bn', dest='caffe_bn',
                      action='store_true',
                      help='divide BN mean/var by <bn>.scale_factor')
  parser.add_argument('--bn', choices=('frozen', 'trainable'), default='frozen',
                      help='collection of BN scale/bias (batch_stats/params)')
  parser.add_argument('--flip_first_conv', '--flip-first-conv',
                      dest='flip_first_conv', action='store_true',
                      help="reverse the first conv's input channels (BGR<->RGB)")
  parser.add_argument('--allow_unrecognised', '--allow-unrecognised',
                      dest='allow_unrecognised', action='store_true')
  args = parser.parse_args(argv)
  try:
    report = convert_file(
        args.input, args.layout, args.output, caffe_bn=args.caffe_bn,
        frozen_bn=args.bn == 'frozen', flip_first_conv=args.flip_first_conv,
        allow_unrecognised=args.allow_unrecognised)
  except (ConversionError, ValueError) as error:
    print(f'error: {error}', file=sys.stderr)
    return 1
  print(f'wrote {report["converted"]} arrays to {report["output"]} '
        f'(sha256 {report["sha256"]}); {len(report["unused"])} source keys '
        f'unused, {len(report["not_produced"])} model keys not produced; '
        f'first conv channels reversed: {report["first_conv_flipped"]}')
  if args.report:
    print(json.dumps(report, indent=1, default=str))
  return 0


if __name__ == '__main__':
  sys.exit(main())
