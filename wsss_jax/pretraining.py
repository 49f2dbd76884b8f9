"""The embedded benchmark's "ImageNet": a backbone pretrained once, cached.

The papers start every network from ImageNet weights; a from-scratch network
on the small benchmark trains unstably and slowly (experiments/RESULTS.md
§11).  `model.init_weights = 'builtin:shapes_pretrain'` (the benchmark
configs' default) starts a run from a backbone pretrained here instead:

* the data is the `shapes_pretrain` family (six shapes with textures of
  their own, shared with no benchmark class; docs/data.md), so no class of a
  target dataset is seen in pretraining;
* the task (`pretrain.task`) is 'segmentation' (cross-entropy on the
  family's masks; the default, RESULTS.md §11) or 'classification' (a
  bias-free 1x1 classifier whose maps are averaged over the image, the CAM
  form, trained with the multi-label soft margin on the classes each crop
  shows);
* the result, `backbone.npz` (the backbone's variables only), is generated
  on first use under `<data dir>/pretrained/<name>-<hash>/` and reused by
  every later run; the hash covers the pretraining settings
  (`config.pretrain`), the backbone's structure, the compute dtype and the
  device count (a different float rounding order gives different weights,
  so the rounding-order test of experiments/stability.py perturbs this too).

Pretraining is an ordinary resumable training stage (checkpoints in
`work/`): a killed first run resumes it.  Nothing is downloaded.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from wsss_jax import defaults
from wsss_jax import losses
from wsss_jax import segmentation
from wsss_jax.atomic import json_safe, write_json_atomic
from wsss_jax.data import registry, schema
from wsss_jax.evaluation import inference
from wsss_jax.models import build as model_build
from wsss_jax.models import weights as weights_lib
from wsss_jax.runtime import Runtime
from wsss_jax.training import mesh as mesh_lib
from wsss_jax.training import step as step_lib

log = logging.getLogger(__name__)

BUILTIN_PREFIX = weights_lib.BUILTIN_PREFIX
SHAPES_PRETRAIN = 'shapes_pretrain'
BUILTIN_NAMES = (SHAPES_PRETRAIN,)
TASKS = ('classification', 'segmentation')
BACKBONE_FILE = 'backbone.npz'
INFO_FILE = 'pretraining.json'
# Model fields that fix the backbone's parameter shapes (fc6's dilation does
# not: the weights serve any dilation, as ImageNet VGG16 serves LargeFOV).
_STRUCTURE_FIELDS = ('backbone', 'width', 'fc_dim', 'batch_norm',
                     'resnet_blocks', 'resnet_stride_in_1x1', 'frozen_bn')


def builtin_name(init_weights: str) -> str:
  """'builtin:NAME' -> NAME, checked against `BUILTIN_NAMES`."""
  name = str(init_weights)[len(BUILTIN_PREFIX):]
  if name not in BUILTIN_NAMES:
    raise ValueError(f'model.init_weights={init_weights!r}: unknown built-in '
                     f'weights; expected one of '
                     f'{[BUILTIN_PREFIX + n for n in BUILTIN_NAMES]}, a local '
                     '.npz file or an empty string (random init).')
  return name


# ----------------------------------------------------------------------------
# The classification objective
# ----------------------------------------------------------------------------
def classes_in_crop(mask: jax.Array, num_classes: int,
                    min_pixels: int) -> jax.Array:
  """Which foreground classes a crop shows: (B, H, W) labels -> (B, K) 0/1.

  Class k (1..K) is present when at least `min_pixels` pixels carry label k
  (the ignore label 255 and background count for nothing), so an object the
  crop cut down to a sliver is not a positive.
  """
  classes = jnp.arange(1, num_classes + 1, dtype=jnp.int32)
  counts = jnp.sum(mask.astype(jnp.int32)[..., None] == classes,
                   axis=(1, 2))
  return (counts >= min_pixels).astype(jnp.float32)


def image_scores(logits: jax.Array) -> jax.Array:
  """(B, h, w, K) class maps -> (B, K) image scores by global average pooling."""
  return jnp.mean(logits.astype(jnp.float32), axis=(1, 2))


def classification_loss(num_classes: int, min_pixels: int) -> step_lib.LossFn:
  """The pretraining loss: soft margin on GAP scores vs the crop's classes."""
  def loss_fn(outputs, batch, context):  # pylint: disable=unused-argument
    targets = classes_in_crop(batch[schema.MASK], num_classes, min_pixels)
    loss = losses.multilabel_soft_margin(image_scores(outputs['logits']),
                                         targets)
    return loss, {'soft_margin': loss}
  return loss_fn


# ----------------------------------------------------------------------------
# Settings and cache
# ----------------------------------------------------------------------------
def pretraining_config(config) -> ml_collections.ConfigDict:
  """The config the pretraining stage runs with, from a run's config: its
  `pretrain` section, its backbone and its mesh/dtype; everything else is
  the pretraining's own (Adam, no parameter groups, no EMA, no periodic
  evaluation)."""
  p = config.pretrain
  out = defaults.base_config(SHAPES_PRETRAIN, method='pretrain')
  out.seed = int(p.seed)
  out.data = defaults.shapes_data('pretrain')
  out.data.shapes.update(image_size=int(p.image_size),
                         num_train=int(p.num_train), num_val=int(p.num_val))
  if config.data.name.startswith('shapes'):
    out.data.data_dir = config.data.data_dir
  out.model = config.model.copy_and_resolve_references()
  out.model.update(init_weights='', head='linear', head_bias=False,
                   fc6_dilation=int(p.fc6_dilation))
  out.input.update(crop_size=int(p.crop_size), batch_size=int(p.batch_size),
                   worker_count=int(config.input.worker_count))
  out.optim = defaults.adam_benchmark(float(p.lr))
  out.optim.lr_mult.update(head_weight=1.0, head_bias=1.0)
  out.train.update(num_steps=int(p.num_steps), eval_every=0, ema_decay=0.0,
                   checkpoint_every=max(1, min(100, int(p.num_steps))),
                   log_every=config.train.log_every)
  out.mesh = config.mesh.copy_and_resolve_references()
  out.compute_dtype = config.compute_dtype
  return out


def cache_key(config, num_devices: int) -> str:
  """'<name>-<hash>': the hash of everything that changes the weights."""
  structure = {f: config.model[f] for f in _STRUCTURE_FIELDS
               if f in config.model}
  payload = json.dumps(json_safe(dict(
      pretrain=config.pretrain.to_dict(), structure=structure,
      compute_dtype=config.compute_dtype, num_devices=int(num_devices))),
                       sort_keys=True)
  return f'{SHAPES_PRETRAIN}-{hashlib.sha256(payload.encode()).hexdigest()[:12]}'


# Where pretrained backbones are cached, under the data folder.
CACHE_DIR = 'pretrained'


def cache_dir(config, num_devices: int) -> str:
  root = (config.data.data_dir if config.data.name.startswith('shapes')
          and config.data.data_dir else registry.default_data_dir())
  return os.path.join(root, CACHE_DIR, cache_key(config, num_devices))


@contextlib.contextmanager
def _build_lock(directory: str) -> Iterator[None]:
  """Serialises concurrent single-host runs that would build the same file
  (the second waits, then finds it); multi-host runs train together and
  rely on the barrier instead."""
  if jax.process_count() > 1:
    yield
    return
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, '.lock'), 'w') as handle:
    fcntl.flock(handle, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(handle, fcntl.LOCK_UN)


# ----------------------------------------------------------------------------
# Building and loading
# ----------------------------------------------------------------------------
def builtin_weights(rt: Runtime, init_weights: str) -> tuple[str, dict]:
  """(path of the backbone file, its pretraining record), pretraining first
  when the cache does not hold it yet (`Runtime.builtin_weights`)."""
  builtin_name(init_weights)
  directory = cache_dir(rt.config, rt.mesh.size)
  path = os.path.join(directory, BACKBONE_FILE)
  info_path = os.path.join(directory, INFO_FILE)
  with _build_lock(directory):
    if not os.path.exists(path):
      log.info('Pretraining the benchmark backbone once (%s); later runs '
               'reuse %s.', init_weights, path)
      _pretrain(rt, directory)
  mesh_lib.barrier(f'pretrained-{directory}')
  with open(info_path) as f:
    info = json.load(f)
  return path, info


def _pretrain(rt: Runtime, directory: str) -> None:
  config = pretraining_config(rt.config)
  prt = rt.with_data(config.data).with_config(config)
  p = rt.config.pretrain
  if p.task == 'classification':
    num_outputs = prt.num_classes - 1
    loss_fn = classification_loss(num_outputs, int(p.min_pixels))
  else:
    num_outputs = prt.num_classes
    loss_fn = segmentation.cross_entropy_on(schema.MASK)
  model = model_build.build_model(config.model, num_outputs,
                                  prt.compute_dtype)
  summary = segmentation.train_segmenter(
      prt, os.path.join(directory, 'work'), loss_fn=loss_fn, model=model,
      name='backbone_pretraining', validate=False)
  variables = segmentation.load_trained(
      prt, os.path.join(directory, 'work', segmentation.MODEL_FILE), model)[1]
  scores = validation_scores(prt, model, variables, p.task,
                             int(p.min_pixels))
  log.info('Pretrained backbone (%s): %s on the val split.', p.task,
           ', '.join(f'{k} {v:.1f}' for k, v in scores.items()
                     if k != 'images'))
  if mesh_lib.is_primary():
    flat = weights_lib.flatten_variables(jax.device_get(variables))
    backbone = {k: v for k, v in flat.items()
                if k.split('/')[1:2] == ['backbone']}
    sha256 = weights_lib.save_weights(
        os.path.join(directory, BACKBONE_FILE + '.tmp.npz'), backbone)
    write_json_atomic(os.path.join(directory, INFO_FILE), json_safe(dict(
        settings=rt.config.pretrain.to_dict(), sha256=sha256,
        steps=summary['steps'], session_seconds=summary['session_seconds'],
        images_per_second=summary['images_per_second'],
        val=scores, classes=list(prt.class_names[1:]))))
    # Last: the backbone file's presence means the cache entry is complete.
    os.replace(os.path.join(directory, BACKBONE_FILE + '.tmp.npz'),
               os.path.join(directory, BACKBONE_FILE))


def validation_scores(rt: Runtime, model, variables: Any, task: str,
                      min_pixels: int) -> dict[str, float]:
  """Scores of the pretrained network on the full val images, in percent.

  segmentation: 'miou' and 'pixel_acc' (the shared evaluator, single scale);
  classification (threshold σ(s) = 0.5): 'exact_match', 'mean_class_accuracy'
  and 'mean_f1' over the classes.
  """
  if task == 'segmentation':
    scores = inference.Evaluator(
        model, rt.dataset, rt.val_split, rt.config.eval, rt.normalization,
        rt.mesh, rt.compute_dtype)(variables, progress=False)
    return dict(miou=scores['miou'], pixel_acc=scores['pixel_acc'],
                images=scores['num_images'])
  source = rt.dataset.source(rt.val_split)
  forward = step_lib.make_forward(model, rt.normalization, rt.compute_dtype)
  num_foreground = rt.num_classes - 1
  predicted, actual = [], []
  batch = 16
  for start in range(0, len(source), batch):
    examples = [source[i] for i in range(start, min(start + batch,
                                                    len(source)))]
    images = np.stack([e[schema.IMAGE] for e in examples])
    masks = np.stack([e[schema.MASK] for e in examples])
    logits = forward(variables, images)['logits']
    predicted.append(np.asarray(image_scores(logits)) > 0)
    actual.append(np.asarray(classes_in_crop(
        jnp.asarray(masks), num_foreground, min_pixels)) > 0)
  predicted, actual = np.concatenate(predicted), np.concatenate(actual)
  true_pos = np.sum(predicted & actual, axis=0)
  f1 = 2 * true_pos / np.maximum(predicted.sum(0) + actual.sum(0), 1)
  return dict(exact_match=100 * float(np.mean(np.all(predicted == actual, 1))),
              mean_class_accuracy=100 * float(np.mean(predicted == actual)),
              mean_f1=100 * float(np.mean(f1)), images=int(len(actual)))
