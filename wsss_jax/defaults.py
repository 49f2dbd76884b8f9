"""Building blocks for config files (`configs/*.py`).

Each function returns one `ConfigDict` section with every field a run may read,
so that `--config.a.b=value` overrides are type-checked and typos rejected.  A
config file composes them and overrides a few values; it stays a thin file.
"""

from __future__ import annotations

import dataclasses

import ml_collections

from wsss_jax.host.crf import CrfParams
from wsss_jax.models.heads import COSINE_TEMPERATURE

ConfigDict = ml_collections.ConfigDict



# ----------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------
def _data_section(name: str, train_split: str, **source) -> ConfigDict:
  """The fields every dataset section has, plus `source` (one sub-section
  named after the dataset family with its own fields)."""
  return ConfigDict(dict(
      name=name,
      data_dir='',              # '' -> $WSSS_JAX_DATA_DIR or ~/.cache/wsss_jax
      train_split=train_split,
      val_split='val',
      **source))


def shapes_data(family: str = 'main') -> ConfigDict:
  """The embedded synthetic benchmark (no download; generated and cached).

  `family`: 'main' (dataset 'shapes'), 'aux' ('shapes_aux', other classes),
  'hard' ('shapes_hard', the main classes on GrabCut-hard scenes) or
  'pretrain' ('shapes_pretrain', the backbone pretraining classes).
  """
  names = {'main': 'shapes', 'aux': 'shapes_aux', 'hard': 'shapes_hard',
           'pretrain': 'shapes_pretrain'}
  if family not in names:
    raise ValueError(f'shapes family={family!r}: expected one of '
                     f'{sorted(names)}.')
  return _data_section(names[family], 'train', shapes=dict(
      image_size=128, num_classes=6, num_train=2000, num_val=300,
      min_objects=1, max_objects=4, seed=0))


def voc_data() -> ConfigDict:
  """PASCAL VOC 2012 (+ SBD) from local files."""
  return _data_section('voc', 'train_aug', voc=dict(
      voc_root='',              # .../VOCdevkit/VOC2012
      sbd_root='',              # .../benchmark_RELEASE/dataset (optional)
      seg_aug_root='',          # a ready SegmentationClassAug/ folder (optional)
  ))


def coco_data(class_set: str = 'all') -> ConfigDict:
  """MS-COCO instances from local files; `class_set` 'all' or 'non_voc'."""
  return _data_section('coco', 'train', coco=dict(
      root='',                  # holds annotations/ and the image folders
                                # (directly or under images/)
      train_images='train2017',
      val_images='val2017',
      train_annotations='annotations/instances_train2017.json',
      val_annotations='annotations/instances_val2017.json',
      class_set=class_set,
  ))


def input_pipeline(crop_size: int = 112, batch_size: int = 16) -> ConfigDict:
  """Training-time augmentation and batching (numpy, grain)."""
  return ConfigDict(dict(
      crop_size=crop_size,
      batch_size=batch_size,
      scale_range=(0.75, 1.25),  # continuous U(lo, hi); unused if `scales`
      scales=(),                 # discrete random scale choices (LPG, DeepLab)
      flip=True,
      color_jitter=0.0,          # f ~ U(1 - s, 1 + s) for brightness/contrast/saturation
      pad_mode='bottom_right',   # or 'symmetric' (BANA)
      max_boxes=16,
      # grain decoding/augmentation processes.  One takes that work off the
      # thread that dispatches the steps (~3 % faster on 2 CPU cores) and
      # gives the same batches as 0; more workers give a different order.
      worker_count=1,
      # Decoded training records kept in memory per loading process, in MB
      # (pipeline.MemoryCache; 0 = off).  The benchmark's train split is 131 MB.
      cache_mb=512,
      normalization='',          # '' -> from model.weights_source
  ))


# ----------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------
def tiny_model() -> ConfigDict:
  """LargeFOV topology at 1/8 width with BatchNorm: trains in minutes on a
  laptop CPU (the embedded benchmark's default backbone; `base_config`
  starts it from the built-in pretrained weights).

  fc6's dilation is scaled with the feature map: 12 suits the 41x41 maps of
  321-px crops; the benchmark's 12x12-16x16 maps use 4 (a dilation-12 3x3
  kernel would read mostly zero padding there).
  """
  config = largefov_model(fc6_dilation=4)
  config.width = 0.125
  config.fc_dim = 128
  config.dropout = 0.0
  config.batch_norm = True
  config.weights_source = 'torchvision'
  return config


def largefov_model(fc6_dilation: int = 12) -> ConfigDict:
  """DeepLab-LargeFOV (VGG16), output stride 8."""
  return ConfigDict(dict(
      backbone='vgg16_largefov',
      width=1.0,
      fc6_dilation=fc6_dilation,
      fc_dim=1024,
      dropout=0.5,
      batch_norm=False,          # VGG16-BN placement (benchmark backbone only)
      head='linear',
      head_bias=True,
      cosine_temperature=COSINE_TEMPERATURE,   # τ of the 'cosine' head
      aspp_rates=(6, 12, 18, 24),
      aspp_dim=0,
      aspp_classifier='linear',  # classifier after BANA's ASPP (aspp_dim > 0)
      frozen_bn=True,
      init_weights='',           # local .npz from tools.convert_weights
      dont_load=('(params|batch_stats)/head/.*',),  # regexes not taken from it
      allow_missing=(),          # regexes of model keys the file may lack
                                 # (e.g. 'backbone/fc[67]/.*' for torchvision)
      weights_source='caffe',    # 'caffe' or 'torchvision': input normalisation
  ))


def resnet101_model() -> ConfigDict:
  """DeepLab-v2 ResNet-101 (MSRA layout), output stride 8, ASPP summed."""
  config = largefov_model()
  config.backbone = 'resnet101_deeplab'
  config.head = 'aspp_v2'
  config.dropout = 0.0
  config.resnet_blocks = (3, 4, 23, 3)     # bottlenecks in C2..C5
  config.resnet_stride_in_1x1 = True       # MSRA layout; False = torchvision v1.5
  config.resnet_stem_ceil_mode = True      # MSRA stem pool; False = torchvision
  config.output_stride = 8                 # 8 (dilations 2, 4), 16 or 32
  return config


def resnet38_model() -> ConfigDict:
  """PSA/AffinityNet's wide ResNet-38 (RRM, PMM), output stride 8, frozen BN.

  PSA's weights (`convert_weights --layout=psa_resnet38`) expect RGB input
  with the ImageNet mean and std, hence `weights_source='torchvision'`.
  """
  config = largefov_model()
  config.backbone = 'resnet38_psa'
  config.dropout = 0.0                     # unused: b6/b7 have fixed Dropout2d
  config.output_stride = 8                 # the only one (fixed dilations)
  config.weights_source = 'torchvision'
  return config


def scalenet101_model() -> ConfigDict:
  """ScaleNet-101 (PMM's CAM backbone), output stride 8, no dilation,
  frozen BN (`wsss_jax.models.scalenet`).

  The ImageNet weights (`convert_weights --layout=scalenet101`) expect RGB
  input with the ImageNet mean and std, hence `weights_source='torchvision'`.
  The linear head has no bias, like PMM's (SEAM's) `fc8`.
  """
  config = largefov_model()
  config.backbone = 'scalenet101'
  config.dropout = 0.0                     # unused by ScaleNet
  config.head_bias = False
  config.output_stride = 8                 # 8 (PMM), 16 or 32 (ImageNet)
  config.scalenet_blocks = (3, 4, 23, 3)   # blocks in layer1..layer4
  config.scalenet_structure = ''           # '' = ScaleNet-101's allocation;
                                           # else a structure .json path
  config.scalenet_dilations = (1, 1, 1, 1)  # of the 3x3 branch convs
  config.weights_source = 'torchvision'
  return config


def psp_model(base: ConfigDict) -> ConfigDict:
  """PMM's FSSS network: PSPNet (PSP head + auxiliary FCN head) on `base`'s
  backbone (docs/pmm.md).

  A resolved copy of the model section `base` (e.g. `resnet38_model()`) with
  head='psp', so that `models.build.build_model` returns a
  `models.pspnet.PSPNet`: PSP head of `psp_channels` with pool scales
  `psp_pool_scales`, aux FCN head of `psp_aux_channels` on the backbone level
  `psp_aux_level`, Dropout2d `psp_dropout` in both heads; `dont_load` gains
  the aux head so a backbone weight file leaves it at its initial values.
  `head_bias`, `aspp_*` and `cosine_temperature` are unused by this head.
  """
  config = base.copy_and_resolve_references()
  with config.unlocked():
    config.head = 'psp'
    config.psp_channels = 512
    config.psp_pool_scales = (1, 2, 3, 6)
    config.psp_aux_level = 'c4'
    config.psp_aux_channels = 256
    config.psp_dropout = 0.1
    # The aux head is new too: an ImageNet backbone file has no entry for it.
    aux_pattern = '(params|batch_stats)/aux_head/.*'
    dont_load = tuple(config.get('dont_load', ()))
    if aux_pattern not in dont_load:
      config.dont_load = dont_load + (aux_pattern,)
  return config


# ----------------------------------------------------------------------------
# Optimisation, training, evaluation
# ----------------------------------------------------------------------------
def sgd_deeplab(lr: float = 1e-3) -> ConfigDict:
  """SGD with the DeepLab parameter groups and the poly schedule."""
  return ConfigDict(dict(
      name='sgd',
      lr=lr,
      momentum=0.9,
      weight_decay=5e-4,
      schedule='poly',           # 'poly', 'constant' or 'step'
      poly_power=0.9,
      step_boundaries=(),        # fractions of num_steps for 'step' (x0.1 each)
      warmup_steps=0,            # linear ramp of the first steps (optim.linear_warmup)
      lr_mult=dict(backbone_weight=1.0, backbone_bias=2.0,
                   head_weight=10.0, head_bias=20.0),
      head_modules=('head',),    # top-level param collections in the head group
      adam_b1=0.9,
      adam_b2=0.999,
      adam_eps=1e-8,
  ))


def adam_benchmark(lr: float = 3e-3) -> ConfigDict:
  """The embedded benchmark's from-scratch recipe: Adam (L2 5e-4) with the
  DeepLab groups and the poly schedule.  Measured on `shapes` (experiments/
  RESULTS.md): SGD at any learning rate we tried left the from-scratch tiny
  network far behind within the step budget."""
  config = sgd_deeplab(lr)
  config.name = 'adam'
  return config


def training(num_steps: int) -> ConfigDict:
  return ConfigDict(dict(
      num_steps=num_steps,
      log_every=10,
      checkpoint_every=50,
      keep_checkpoints=2,
      eval_every=0,              # 0: evaluate at the end of the stage only
      eval_max_images=64,        # periodic evaluation subset (0 = all)
      # Parameter (and BatchNorm statistics) EMA used for validation, the
      # exported model and labels; 0 = off (training/state.ema_update).
      ema_decay=0.0,
  ))


def benchmark_pretraining() -> ConfigDict:
  """How `model.init_weights='builtin:shapes_pretrain'` is made: training on
  the `shapes_pretrain` family, whose classes no benchmark config uses
  (wsss_jax.pretraining).  Generated once per setting and device count, then
  cached."""
  return ConfigDict(dict(
      # 'segmentation' (cross-entropy on the family's masks) or
      # 'classification' (multi-label, GAP): experiments/RESULTS.md §11.
      task='segmentation',
      num_steps=1000,
      batch_size=32,
      crop_size=96,
      lr=3e-3,                   # Adam, one learning rate for every layer
      image_size=128,
      num_train=4000,
      num_val=300,
      fc6_dilation=4,
      min_pixels=16,             # a class counts as present in a crop from
                                 # this many pixels
      seed=0,
  ))


def crf_config(**overrides: float) -> ConfigDict:
  """A DenseCRF config section (`eval.crf_params`, `bana.label_crf`).

  The fields and defaults are those of `host.crf.CrfParams` (their one
  source: DeepLab-v2's setting, Gaussian weight 3 / sxy 1, bilateral weight 4
  / sxy 67 / srgb 3, 10 iterations); `overrides` change named fields and are
  validated by CrfParams (unknown names raise TypeError).
  """
  return ConfigDict(dataclasses.asdict(CrfParams(**overrides)))


def evaluation() -> ConfigDict:
  return ConfigDict(dict(
      batch_size=8,
      bucket_size=0,             # 0: the dataset's largest side, rounded up to 8
      scales=(1.0,),
      flip=False,
      fusion='mean_probs',       # multi-scale/flip: 'mean_probs', 'mean_logits', 'max_logits'
      align_corners=False,       # bilinear convention for rescaling inputs/logits
      window_size=0,  # 0: whole image; else sliding windows (mmseg 'slide')
      window_stride=0,           # window step in pixels, 0 < stride <= size
      crf=False,
      # DeepLab-v2's DenseCRF (POS_W 3, POS_XY_STD 1, BI_W 4, BI_XY_STD 67,
      # BI_RGB_STD 3; as in LPG's ResNet config and docs/box2seg.md, choice
      # 27): CrfParams' defaults.
      crf_params=crf_config(),
      crf_workers=2,
      worker_count=0,            # grain decoding processes (each start ~3 s)
      max_images=0,              # 0 = the whole split
      save_predictions=True,
  ))


def base_config(name: str, method: str, variant: str = '') -> ConfigDict:
  """Everything a run reads, with defaults for the embedded benchmark."""
  config = ConfigDict()
  config.name = name
  config.variant = variant
  config.method = method
  config.seed = 0
  config.data = shapes_data()
  config.input = input_pipeline(crop_size=96, batch_size=16)
  config.model = tiny_model()
  config.model.init_weights = 'builtin:shapes_pretrain'
  config.pretrain = benchmark_pretraining()
  config.optim = adam_benchmark()
  config.train = training(num_steps=700)
  # EMA 0.99 for validation, export and labels: experiments/RESULTS.md §11.
  config.train.update(eval_every=150, eval_max_images=100,
                      checkpoint_every=100, ema_decay=0.99)
  config.eval = evaluation()
  # Where every DenseCRF runs (evaluation, pseudo-labels): 'pydensecrf' on
  # the host in a process pool, or 'jax' on the device (docs/crf.md).
  config.crf = ConfigDict(dict(backend='pydensecrf'))
  config.mesh = ConfigDict(dict(num_devices=0))   # 0: every device
  config.compute_dtype = 'float32'                # or 'bfloat16' (params fp32)
  config.report = ConfigDict(dict(num_examples=6))
  return config


# ----------------------------------------------------------------------------
# Presets shared by every config file (applied by variant name)
# ----------------------------------------------------------------------------
def tiny_preset(config: ConfigDict) -> ConfigDict:
  """Seconds-long end-to-end runs for tests: 32-px images, 2 steps."""
  config.data.shapes.update(image_size=32, num_train=8, num_val=4)
  config.input.update(crop_size=32, batch_size=4, max_boxes=8,
                      worker_count=0)
  config.model.update(width=0.0625, fc_dim=16)
  config.train.update(num_steps=2, log_every=1, checkpoint_every=1,
                      eval_every=0, eval_max_images=4)
  config.eval.update(batch_size=4)
  config.report.num_examples = 2
  config.pretrain.update(num_steps=2, batch_size=4, crop_size=32,
                         image_size=32, num_train=8, num_val=4, min_pixels=2)
  return config


def voc_preset(config: ConfigDict) -> ConfigDict:
  """The papers' DeepLab-LargeFOV (VGG16) setting on VOC 2012 train_aug/val.

  Batch 20, crop 321, lr 1e-3 with the 1x/2x/10x/20x groups, poly 0.9,
  23,805 iterations (45 epochs; BANA stage 3), scale U(0.5, 1.5), flip,
  caffe normalisation; a local converted vgg16_20M file in
  model.init_weights (none is downloaded).
  """
  config.data = voc_data()
  config.model = largefov_model()
  config.input.update(crop_size=321, batch_size=20, scale_range=(0.5, 1.5),
                      pad_mode='symmetric', max_boxes=64, worker_count=4)
  config.optim = sgd_deeplab(lr=1e-3)
  config.train.update(num_steps=23805, log_every=20, checkpoint_every=1000,
                      eval_every=5000, eval_max_images=300, ema_decay=0.0)
  config.eval.update(batch_size=8, bucket_size=504, crf_workers=8,
                     worker_count=4)
  return config


def voc_resnet_preset(config: ConfigDict) -> ConfigDict:
  """DeepLab-v2 ResNet-101 (MSRA layout, OS 8, frozen BN, ASPP summed):
  batch 10, lr 2.5e-4, 20k iterations, discrete scales 0.5..1.5 (LPG)."""
  voc_preset(config)
  config.model = resnet101_model()
  config.input.update(batch_size=10, scales=(0.5, 0.75, 1.0, 1.25, 1.5),
                      pad_mode='bottom_right')
  config.optim = sgd_deeplab(lr=2.5e-4)
  config.train.num_steps = 20000
  return config


def coco_preset(config: ConfigDict) -> ConfigDict:
  """The LargeFOV setting on COCO 2017 (81 classes with background)."""
  voc_preset(config)
  config.data = coco_data('all')
  config.input.max_boxes = 100
  config.eval.bucket_size = 640
  return config


PRESETS = {
    '': lambda config: config,
    'tiny': tiny_preset,
    'voc': voc_preset,
    'voc_resnet': voc_resnet_preset,
    'coco': coco_preset,
}


def split_config_arg(arg: str | None, config_file: str,
                     **groups: tuple[str, ...]) -> dict[str, str | None]:
  """Splits a config file's 'a,b,c' argument into at most one token per
  group, e.g. `split_config_arg('ce_only,voc', 'bana.py', variant=(...),
  setting=(...))` -> {'variant': 'ce_only', 'setting': 'voc'} (None for a
  group not named).  Unknown tokens, or two of one group, raise ValueError."""
  tokens = [t for t in (arg or '').split(',') if t]
  picked = {name: [t for t in tokens if t in allowed]
            for name, allowed in groups.items()}
  known = {t for allowed in groups.values() for t in allowed}
  if any(t not in known for t in tokens) or any(
      len(found) > 1 for found in picked.values()):
    raise ValueError(f'configs/{config_file}:{arg}: expected at most one of '
                     + ', at most one of '.join(
                         str(tuple(allowed)) for allowed in groups.values())
                     + '.')
  return {name: found[0] if found else None
          for name, found in picked.items()}


def apply_variant(config: ConfigDict, variant: str, allowed=None) -> ConfigDict:
  """Applies the preset named `variant` (clear error for unknown names)."""
  allowed = tuple(allowed if allowed is not None else PRESETS)
  if variant not in allowed or variant not in PRESETS:
    raise ValueError(f'Unknown variant {variant!r} for config '
                     f'{config.name!r}; choose one of '
                     f"{[v for v in allowed if v] or 'none'}.")
  config.variant = variant
  return PRESETS[variant](config)
