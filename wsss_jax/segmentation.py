"""Shared stages: make a label folder, train a segmenter, evaluate a model.

These know nothing of any method: a method composes them (or its own stages)
into a pipeline, choosing the labels, the loss and the model.

    label_stats = make_label_folder(rt, folder, grabcut.box_fill_example)
    summary = train_segmenter(rt, stage_dir, loss_fn=cross_entropy_on('pseudo'),
                              label_folders={'pseudo': folder})
    scores = evaluate_model(rt, eval_dir, model_file=...)
"""

from __future__ import annotations

import functools
import json
import logging
import os
import time
from typing import Any, Callable, Iterator, Mapping

import jax
import numpy as np

from wsss_jax import losses
from wsss_jax.atomic import json_safe
from wsss_jax.data import label_png, pipeline, schema, transforms
from wsss_jax.data.label_png import LabelFolder
from wsss_jax.evaluation import inference, metrics
from wsss_jax.pseudo import engine as label_engine
from wsss_jax.models import build as model_build
from wsss_jax.models import weights as weights_lib
from wsss_jax.runtime import Runtime
from wsss_jax.training import loop, optim, state as state_lib, step as step_lib
from wsss_jax.training import best as best_lib
from wsss_jax.training import mesh as mesh_lib

log = logging.getLogger(__name__)

MODEL_FILE = 'model.npz'


# ----------------------------------------------------------------------------
# Labels
# ----------------------------------------------------------------------------
def make_label_folder(rt: Runtime, folder: str,
                      label_fn: Callable[[dict], np.ndarray],
                      workers: int = 0) -> dict[str, Any]:
  """Writes `label_fn(example)` for every training image as `<id>.png`.

  `workers` processes compute the maps (0: inline, the right choice for
  cheap functions such as box filling, whose cost is decoding and writing).

  Resumable (existing files are skipped); returns generation stats plus the
  pseudo-mask scores against the ground truth of the training split
  ('quality'; pixels a label map leaves at 255 are not scored).
  """
  source = rt.dataset.source(rt.train_split)
  stats = {}
  if mesh_lib.is_primary():          # one writer; the others wait below
    stats = label_engine.generate_label_folder(
        source, LabelFolder(folder), label_fn, workers=workers,
        image_ids=rt.dataset.index(rt.train_split).image_ids)
  mesh_lib.barrier(f'labels-{folder}')
  return {'generation': json_safe(stats),
          'quality': label_quality(rt, folder, progress=True)}


def label_quality(rt: Runtime, folder: str, max_images: int = 0,
                  progress: bool = False) -> dict[str, Any]:
  """Scores of a label folder against the training split's ground truth
  (its first `max_images` images; 0: all).  Pseudo-labels may leave pixels
  unlabelled (255): they are scored on the rest, with the unlabelled share
  reported as 'unlabeled_pct'."""
  quality = metrics.evaluate_label_folder(
      folder, rt.dataset.source(rt.train_split, decode_images=False),
      rt.class_names, pred_ignore_label=schema.IGNORE_LABEL,
      max_images=max_images, progress=progress)
  quality.pop('confusion', None)
  return quality


def predict_label_folder(rt: Runtime, folder: str, model, variables,
                         eval_config) -> dict[str, Any]:
  """Writes a trained network's prediction of every training image as
  `<folder>/<id>.png` (a two-step method's labels), predicted like an
  evaluation with `eval_config` (a `config.eval`-like section: scales, flip,
  the CRF on `config.crf.backend`).

  Returns 'generation' (count and time) and 'quality' (the labels scored
  against the training split's ground truth, as `label_quality`; with the
  CRF also 'without_crf', its input's argmax).  Not resumable image by
  image: a rerun predicts every image again (one evaluation pass).
  """
  start = time.monotonic()
  scores = {}
  if mesh_lib.is_primary():
    evaluator = inference.Evaluator(
        model, rt.dataset, rt.train_split, eval_config, rt.normalization,
        rt.mesh, rt.compute_dtype, rt.config.eval.worker_count,
        crf_backend=rt.config.crf.backend)
    scores = evaluator(variables, out_dir=folder)
  mesh_lib.barrier(f'predicted-labels-{folder}')
  quality = label_quality(rt, folder)
  if 'without_crf' in scores:
    quality['without_crf'] = scores['without_crf']
  return {'generation': {'total': scores.get('num_images'),
                         'seconds': time.monotonic() - start},
          'quality': json_safe(quality)}


def _partial_ground_truth(example: dict[str, Any],
                          labelled_ids: frozenset[str]) -> np.ndarray:
  """Ground truth for the labelled share, all-ignore for the rest."""
  mask = example[schema.MASK]
  if example[schema.IMAGE_ID] in labelled_ids:
    return mask
  return np.full_like(mask, schema.IGNORE_LABEL)


def make_partial_label_folder(rt: Runtime, folder: str, fraction: float,
                              workers: int = 0) -> dict[str, Any]:
  """Ground-truth masks for the first `fraction` of the training images (in
  split order) and all-255 maps for the others: the pixel labels of the
  semi-supervised variants (Box2Seg Table 5, BANA Table 4).  Returns
  `make_label_folder`'s results plus 'labelled_images'."""
  ids = rt.dataset.index(rt.train_split).image_ids
  count = int(round(float(fraction) * len(ids)))
  fn = functools.partial(_partial_ground_truth,
                         labelled_ids=frozenset(ids[:count]))
  result = make_label_folder(rt, folder, fn, workers=workers)
  result['labelled_images'] = count
  return result


# ----------------------------------------------------------------------------
# Models and weights
# ----------------------------------------------------------------------------
def build_segmenter(rt: Runtime):
  return model_build.build_model(rt.config.model, rt.num_classes,
                                 rt.compute_dtype)


def initial_variables(rt: Runtime, model, rng: jax.Array
                      ) -> tuple[dict[str, Any], dict[str, Any]]:
  """Random init, with `model.init_weights` merged in when given.

  Returns (variables as host arrays, a record of the initialisation for
  results.json).  The classifier head is not loaded from ImageNet/COCO files
  whose class count differs (`dont_load`).
  """
  crop = rt.config.input.crop_size
  variables = jax.device_get(state_lib.random_variables(model, rng,
                                                        (1, crop, crop, 3)))
  path = rt.config.model.init_weights
  if not path:
    if rt.dataset.name.startswith('shapes'):
      log.info('No model.init_weights given: training from scratch.')
    else:
      log.warning('No model.init_weights given: training %s on %s from '
                  'SCRATCH; the papers start from ImageNet/COCO weights '
                  '(convert them with `python -m wsss_jax.tools.'
                  'convert_weights`).', rt.config.model.backbone,
                  rt.dataset.name)
    return variables, {'init': 'scratch'}
  if weights_lib.is_builtin(path):
    if rt.builtin_weights is None:
      raise ValueError(
          f'model.init_weights={path!r} names built-in weights, but this '
          'runtime cannot make them: build it with make_runtime(config, '
          'builtin_weights=pretraining.builtin_weights), as wsss_jax.run does.')
    file, info = rt.builtin_weights(rt, path)
    variables, report = weights_lib.load_weights(
        variables, file, allow_missing=weights_lib.NOT_BACKBONE)
    log.info('Initialised the backbone from %s (%s; pretraining scores on '
             'its val split: %s).', path, file, info['val'])
    return variables, {'init': path, 'pretraining': info,
                       **json_safe(report)}
  if not os.path.exists(path):
    raise FileNotFoundError(
        f'model.init_weights={path!r} does not exist. Convert a PyTorch file '
        'with `python -m wsss_jax.tools.convert_weights` or pass an empty '
        'string to train from scratch.')
  variables, report = weights_lib.load_weights(
      variables, path, dont_load=tuple(rt.config.model.dont_load),
      allow_missing=tuple(rt.config.model.allow_missing))
  log.info('Initialised from %s (sha256 %s): %d arrays loaded.', path,
               report.get('sha256'), report.get('loaded'))
  return variables, {'init': os.path.abspath(path), **json_safe(report)}


# ----------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------
def cross_entropy_on(label_key: str) -> step_lib.LossFn:
  """Plain segmentation cross-entropy against `batch[label_key]` (255 ignored)."""
  def loss_fn(outputs, batch, context):  # pylint: disable=unused-argument
    loss = losses.segmentation_cross_entropy(outputs['logits'],
                                             batch[label_key])
    return loss, {'ce': loss}
  return loss_fn


def training_batches(rt: Runtime,
                     label_folders: Mapping[str, str] | None = None,
                     transform=None) -> Iterator[dict[str, Any]]:
  """The training stages' batches (`config.input`, `config.seed`): the
  training split with `label_folders` ({batch key: PNG folder}) joined on,
  augmented, cropped and batched; an endless host iterator (checkpointable
  by the training loop).  `transform` (a grain transform with the
  `transforms.finalize` layout, e.g. a method's own sampler) replaces
  `TrainTransform.from_config(config.input, ...)` when given."""
  config = rt.config
  label_folders = dict(label_folders or {})
  index = rt.dataset.index(rt.train_split)
  source = pipeline.cached(
      pipeline.with_label_folders(rt.dataset.source(rt.train_split),
                                  label_folders, index.image_ids),
      config.input.get('cache_mb', 0))
  if transform is None:
    transform = pipeline.TrainTransform.from_config(
        config.input, num_foreground=rt.num_classes - 1,
        image_pad_value=rt.pad_color, label_keys=tuple(label_folders))
  return iter(pipeline.train_loader(source, transform,
                                    config.input.batch_size, config.seed,
                                    config.input.worker_count))


def train_segmenter(rt: Runtime, stage_dir: str, *, loss_fn: step_lib.LossFn,
                    label_folders: Mapping[str, str] | None = None,
                    model=None, name: str = 'train',
                    num_steps: int | None = None,
                    init_from: str | None = None,
                    frozen_modules: tuple[str, ...] = (),
                    validate: bool = True,
                    transform=None, keep_best: bool = False,
                    selection_eval=None, model_inputs: tuple[str, ...] = (),
                    init_fn=None) -> dict[str, Any]:
  """Trains (or resumes) a segmentation network; writes `<stage_dir>/model.npz`.

  Args:
    rt: the run's runtime.
    stage_dir: the stage folder (checkpoints, TensorBoard, model file).
    loss_fn: (outputs, batch, context) -> (loss, metrics).
    label_folders: {batch key: PNG folder} joined onto the training split.
    model: the Flax module (default: `config.model` with the dataset's
      classes).
    name: the stage name for logs.
    num_steps: training steps (default `config.train.num_steps`).
    init_from: a previous stage's `model.npz` to start from (every array
      must match); otherwise `model.init_weights` or a random init.
    frozen_modules: top-level modules that receive no update.
    validate: score the val split periodically and at the end (off for
      stages whose 'logits' are not trained, e.g. Box2Seg's phase 1).
    transform: the training sampler (see `training_batches`); None:
      `TrainTransform.from_config(config.input, ...)`.
    keep_best: also keep the variables of the best periodic validation
      mIoU as `<stage_dir>/best_model.npz` (`training.best`); the summary's
      'best' says which step and score (needs `validate`).
    selection_eval: the `config.eval`-like protocol of the periodic
      validations (scales, flip, CRF on `config.crf.backend`); None: single
      scale without CRF, a cheap progress signal.
    model_inputs: batch keys the model takes besides the images
      (`step.make_train_step`).
    init_fn: `(model, rng) -> (variables, record)`: the initial variables of
      a network assembled from parts (e.g. a trained network inside a new
      one); default `initial_variables` (`model.init_weights`).
  Returns:
    The training summary (steps, throughput, history, initialisation).
  """
  if keep_best and not validate:
    raise ValueError('keep_best selects among validations: validate must be '
                     'True.')
  config = rt.config
  label_folders = dict(label_folders or {})
  model = model or build_segmenter(rt)
  batch_size = config.input.batch_size
  mesh_lib.check_batch_size(batch_size, rt.mesh, 'input.batch_size')
  num_steps = int(num_steps or config.train.num_steps)
  rng = jax.random.PRNGKey(config.seed)
  init_record: dict[str, Any] = {}

  make_tx = functools.partial(optim.make_optimizer, config.optim,
                              num_steps=num_steps,
                              frozen_modules=tuple(frozen_modules))
  crop = config.input.crop_size
  image_shape = (1, crop, crop, 3)

  def init_state():
    if init_from:
      _, variables = load_trained(rt, init_from, model)
      record = {'init': os.path.abspath(init_from),
                'sha256': weights_lib.file_sha256(init_from)}
    elif init_fn is not None:
      variables, record = init_fn(model, rng)
    else:
      variables, record = initial_variables(rt, model, rng)
    init_record.update(record)
    return state_lib.create_train_state(model, make_tx, rng, image_shape,
                                        rt.mesh, variables=variables,
                                        ema_decay=config.train.ema_decay)

  # Periodic validation is a cheap progress signal (single scale, no CRF)
  # unless it selects a checkpoint under a named protocol.
  evaluator = inference.Evaluator(
      model, rt.dataset, rt.val_split,
      selection_eval if selection_eval is not None
      else _single_scale(config.eval),
      rt.normalization, rt.mesh, rt.compute_dtype, config.eval.worker_count,
      crf_backend=config.crf.backend)
  best = best_lib.BestWeights(stage_dir) if keep_best else None
  job = loop.TrainingJob(
      name=name, stage_dir=stage_dir, init_state=init_state,
      abstract_state=lambda: state_lib.abstract_train_state(
          model, make_tx, rng, image_shape, rt.mesh,
          ema_decay=config.train.ema_decay),
      make_data_iter=lambda: training_batches(rt, label_folders, transform),
      train_step=step_lib.make_train_step(model, loss_fn, rt.normalization,
                                          rt.mesh, rt.compute_dtype,
                                          model_inputs=tuple(model_inputs)),
      mesh=rt.mesh, num_steps=num_steps, log_every=config.train.log_every,
      checkpoint_every=config.train.checkpoint_every,
      keep_checkpoints=config.train.keep_checkpoints,
      eval_every=config.train.eval_every,
      evaluate=(lambda variables: _val_scalars(evaluator(
          variables, max_images=config.train.eval_max_images,
          progress=False))) if validate else None,
      images_per_step=batch_size,
      learning_rate=optim.make_schedule(config.optim, num_steps),
      preview=(validation_preview(rt, model)
               if validate and jax.process_count() == 1 else None),
      config_text=_config_markdown(config),
      after_validation=best.update if best is not None else None)
  state, summary = loop.train(job)
  if best is not None:
    summary['best'] = dict(best.record or {}, protocol=evaluator.describe(),
                           max_images=int(config.train.eval_max_images))
  if mesh_lib.is_primary():
    weights_lib.save_weights(
        os.path.join(stage_dir, MODEL_FILE),
        weights_lib.flatten_variables(jax.device_get(state.variables)))
  mesh_lib.barrier(f'model-{stage_dir}')
  summary['initialisation'] = init_record or {'init': 'resumed'}
  return summary


def _config_markdown(config) -> str:
  """The config as a JSON code block (TensorBoard renders text as markdown)."""
  text = json.dumps(json.loads(config.to_json_best_effort()), indent=2)
  return '```\n' + text + '\n```'


def validation_preview(rt: Runtime, model, count: int = 4
                       ) -> Callable[[Any], np.ndarray]:
  """`(variables) -> uint8 image`: rows of [image | ground truth |
  prediction] for the first `count` validation images (single scale), for
  TensorBoard.  The images are padded once to one square size, so the
  predictor compiles once."""
  source = rt.dataset.source(rt.val_split)
  examples = [source[i] for i in range(min(count, len(source)))]
  side = int(np.ceil(max(max(e[schema.IMAGE].shape[:2]) for e in examples)
                     / 8) * 8)
  devices = rt.mesh.devices.size
  images = transforms.pad_image_batch(
      [e[schema.IMAGE] for e in examples], side,
      -(-len(examples) // devices) * devices, rt.pad_color)
  predict = inference.make_predictor(model, rt.normalization,
                                     compute_dtype=rt.compute_dtype,
                                     mesh=rt.mesh)
  device_images = mesh_lib.device_batch({schema.IMAGE: images},
                                        rt.mesh)[schema.IMAGE]

  def preview(variables) -> np.ndarray:
    labels = np.asarray(predict(variables, device_images))
    rows = []
    for i, example in enumerate(examples):
      image = images[i]
      truth = np.zeros((side, side), np.uint8)
      height, width = example[schema.MASK].shape
      truth[:height, :width] = example[schema.MASK]
      rows.append(np.concatenate(
          [image, label_png.overlay(image, truth),
           label_png.overlay(image, labels[i])], axis=1))
    return np.concatenate(rows, axis=0)
  return preview


def _val_scalars(scores: dict[str, Any]) -> dict[str, float]:
  return {'miou': scores['miou'], 'pixel_acc': scores['pixel_acc']}


# ----------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------
def load_trained(rt: Runtime, model_file: str, model=None):
  """(model, variables) of a finished training stage's `model.npz`."""
  model = model or build_segmenter(rt)
  crop = rt.config.input.crop_size
  variables = jax.eval_shape(lambda: state_lib.init_variables(
      model, jax.random.PRNGKey(0), (1, crop, crop, 3)))
  variables, _ = weights_lib.load_weights(variables, model_file)
  return model, variables


def evaluate_model(rt: Runtime, stage_dir: str, model, variables,
                   num_train_examples: int = 0) -> dict[str, Any]:
  """Scores `variables` on the validation split, writing every prediction.

  Predictions go to `<stage_dir>/predictions/<val split>/<id>.png`; with
  `num_train_examples` > 0 the first training images are predicted too (for
  the report's example grid).
  """
  config = rt.config
  evaluator = inference.Evaluator(model, rt.dataset, rt.val_split,
                                  config.eval, rt.normalization, rt.mesh,
                                  rt.compute_dtype, config.eval.worker_count,
                                  crf_backend=config.crf.backend)
  out_dir = os.path.join(stage_dir, 'predictions', rt.val_split)
  scores = evaluator(variables, max_images=config.eval.max_images,
                     out_dir=out_dir if config.eval.save_predictions
                     else None)
  scores['protocol'] = evaluator.describe()
  scores['predictions_dir'] = out_dir
  if num_train_examples:
    train_eval = inference.Evaluator(model, rt.dataset, rt.train_split,
                                     _single_scale(config.eval),
                                     rt.normalization, rt.mesh,
                                     rt.compute_dtype)
    train_eval(variables, max_images=num_train_examples,
               out_dir=os.path.join(stage_dir, 'predictions',
                                    rt.train_split), progress=False)
  return scores


def _single_scale(eval_config):
  """`eval_config` with one scale, no flip and no CRF."""
  config = eval_config.copy_and_resolve_references()
  config.update(scales=(1.0,), flip=False, crf=False)
  return config
