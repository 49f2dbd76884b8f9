"""Ready-made stages that every method repeats, built on `segmentation`.

A method's pipeline is a list of `Stage`s; most of them are one of these:

    box_fill_stage(rt)                                   box-filled masks B
    label_folder_stage(rt, 'grabcut', fn, workers=4)      any per-image labels
    partial_labels_stage(rt, fraction)                    semi-supervised GT
    train_stage(rt, 'train', loss_fn=...,
                label_folders={'pseudo': label_path('box_labels')})
    model_label_stage(rt, 'labels', 'classifier', model, make_labels, ...)
    prediction_label_stage(rt, 'labels', 'train', eval_config)  two-step
    evaluate_stage(rt, 'train')                           final val scores

Stages refer to each other by stage name (a label stage's folder is
`<workdir>/<name>/labels`, a training stage's weights
`<workdir>/<name>/model.npz`), so a round of stages is the same list built
with prefixed names (`wsss_jax.stages.rounds`).
"""

from __future__ import annotations

import functools
import os
from typing import Any, Callable, Mapping

from wsss_jax import segmentation
from wsss_jax.host import grabcut
from wsss_jax.reporting import figures
from wsss_jax.runtime import Runtime
from wsss_jax.stages import Network, Stage, StageContext
from wsss_jax.training import best as best_lib
from wsss_jax.training import mesh as mesh_lib

LABELS = 'labels'            # the label folder inside a label stage's folder
SEMI_KEY = 'semi_mask'       # batch key of the semi-supervised ground truth


# Config fields no stage reads except evaluations: a change reruns only them.
EVALUATION_FIELDS = ('eval', 'report')
# What label stages ignore besides: the optimiser and training loop (a
# label stage sees a network only through an earlier stage's weights, whose
# change reruns it anyway).
TRAINING_FIELDS = ('train', 'optim')
# What changes the validation curve or the checkpoints kept, not the
# weights a training stage ends with.
MONITORING_FIELDS = ('train.eval_every', 'train.eval_max_images',
                     'train.checkpoint_every', 'train.keep_checkpoints')
LABEL_STAGE_IGNORES = EVALUATION_FIELDS + TRAINING_FIELDS
# No training stage runs a CRF (RRM's will declare its own ignores).
TRAIN_STAGE_IGNORES = EVALUATION_FIELDS + MONITORING_FIELDS + ('crf',)


def label_path(stage: str) -> str:
  """The label folder of label stage `stage`, relative to the workdir."""
  return os.path.join(stage, LABELS)


def model_path(stage: str) -> str:
  """The weights of training stage `stage`, relative to the workdir."""
  return os.path.join(stage, segmentation.MODEL_FILE)


def label_folder_stage(rt: Runtime, name: str,
                       label_fn: Callable[[dict], Any], *, workers: int = 0,
                       description: str = '') -> Stage:
  """`label_fn(example)` for every training image into `<name>/labels`,
  scored against the ground truth ('generation', 'quality').  `label_fn`
  must pickle when `workers` > 0."""
  def run(context, stage_dir):  # pylint: disable=unused-argument
    return segmentation.make_label_folder(
        rt, os.path.join(stage_dir, LABELS), label_fn, workers=workers)
  return Stage(name, run, outputs=(LABELS,), description=description,
               ignores=LABEL_STAGE_IGNORES)


def box_fill_stage(rt: Runtime, name: str = 'box_labels',
                   description: str = 'fill every training box (smaller box '
                   'on top)') -> Stage:
  """Box-filled masks B (smaller box on top).  Inline: filling boxes costs
  less than sending the images to workers."""
  return label_folder_stage(rt, name, grabcut.box_fill_example,
                            description=description)


def partial_labels_stage(rt: Runtime, fraction: float, *, workers: int = 0,
                         name: str = 'semi_labels') -> Stage:
  """Ground truth for the first `fraction` of the training images and
  all-255 maps for the rest (Box2Seg Table 5, BANA Table 4)."""
  def run(context, stage_dir):  # pylint: disable=unused-argument
    return segmentation.make_partial_label_folder(
        rt, os.path.join(stage_dir, LABELS), fraction, workers=workers)
  return Stage(name, run, outputs=(LABELS,), ignores=LABEL_STAGE_IGNORES,
               description='ground truth for the labelled share')


def train_stage(rt: Runtime, name: str, *, loss_fn,
                label_folders: Mapping[str, str] | None = None, model=None,
                init_stage: str | None = None, num_steps: int | None = None,
                frozen_modules: tuple[str, ...] = (), validate: bool = True,
                transform=None, keep_best: bool = False,
                selection_eval=None, model_inputs: tuple[str, ...] = (),
                init_fn=None, description: str = '') -> Stage:
  """Trains a network (`segmentation.train_segmenter`) into
  `<name>/model.npz`.

  Args:
    label_folders: {batch key: label folder relative to the workdir, e.g.
      `label_path('box_labels')`}, joined onto the training split.
    init_stage: start from that training stage's weights.
    transform: a grain transform that replaces `config.input`'s
      augmentation (a method's own sampler, e.g. PMM's multi-crop windows).
    keep_best: also write `<name>/best_model.npz`, the weights of the best
      periodic validation (`best_model_path(name)`); the periodic
      validations then decide an output, so `train.eval_every`,
      `train.eval_max_images`, `eval` and `crf` rerun the stage.
    selection_eval: the validations' protocol (a `config.eval`-like section
      the caller owns; None: single scale without CRF).
    model_inputs: batch keys the model takes besides the images.
    init_fn: `(context, model, rng) -> (variables, record)`, the initial
      variables when the network is assembled from earlier stages' weights
      (read under `context.workdir`).
    Others: as `segmentation.train_segmenter`.
  """
  label_folders = dict(label_folders or {})

  def run(context, stage_dir):
    return segmentation.train_segmenter(
        rt, stage_dir, loss_fn=loss_fn, model=model, name=name,
        label_folders={key: os.path.join(context.workdir, folder)
                       for key, folder in label_folders.items()},
        num_steps=num_steps, frozen_modules=frozen_modules,
        init_from=(os.path.join(context.workdir, model_path(init_stage))
                   if init_stage else None),
        validate=validate, transform=transform, keep_best=keep_best,
        selection_eval=selection_eval, model_inputs=model_inputs,
        init_fn=(functools.partial(init_fn, context) if init_fn else None))
  outputs = (segmentation.MODEL_FILE,)
  ignores = TRAIN_STAGE_IGNORES
  if keep_best:
    outputs += (best_lib.BEST_MODEL_FILE,)
    ignores = ('report', 'train.checkpoint_every', 'train.keep_checkpoints')
  # A raised train.num_steps continues from the last checkpoint; the poly
  # schedule is then that of the new length from the step it resumes at.
  return Stage(name, run, outputs=outputs, description=description,
               network=Network(name, rt, model), ignores=ignores,
               extends=('train.num_steps',) if num_steps is None else ())


def best_model_path(stage: str) -> str:
  """The best-validation weights of training stage `stage` (trained with
  `keep_best=True`), relative to the workdir."""
  return os.path.join(stage, best_lib.BEST_MODEL_FILE)


def model_label_stage(
    rt: Runtime, name: str, model_stage: str, model,
    make_labels: Callable[[StageContext, str, Any], dict[str, Any]], *,
    outputs: tuple[str, ...], description: str = '') -> Stage:
  """Labels made with a trained network: `make_labels(context, stage_dir,
  variables)` with the variables of `<model_stage>/model.npz` loaded into
  `model` (CAMs, BANA's Y_crf / Y_ret, ...)."""
  def run(context, stage_dir):
    _, variables = segmentation.load_trained(
        rt, os.path.join(context.workdir, model_path(model_stage)), model)
    return make_labels(context, stage_dir, variables)
  return Stage(name, run, outputs=outputs, description=description,
               ignores=LABEL_STAGE_IGNORES)


def prediction_label_stage(rt: Runtime, name: str, model_stage: str,
                           eval_config, *, model=None, best: bool = False,
                           description: str = '') -> Stage:
  """The predictions of `<model_stage>/model.npz` on the training split as
  the label folder `<name>/labels` (a two-step method's second-step labels),
  predicted like an evaluation with `eval_config` and scored against the
  ground truth.  `eval_config` must come from the config fields the caller
  owns (a method section), not from `config.eval`, which this stage, like
  every label stage, ignores.  `best`: predict with the stage's
  best-validation weights (`best_model_path`) instead of its last."""
  weights = (best_model_path if best else model_path)(model_stage)

  def run(context, stage_dir):
    net, variables = segmentation.load_trained(
        rt, os.path.join(context.workdir, weights), model)
    return segmentation.predict_label_folder(
        rt, os.path.join(stage_dir, LABELS), net, variables, eval_config)
  return Stage(name, run, outputs=(LABELS,), description=description,
               ignores=LABEL_STAGE_IGNORES)


FiguresFn = Callable[[StageContext, str, Any, Any], dict[str, Any] | None]


def evaluate_stage(rt: Runtime, model_stage: str, *, model=None,
                   name: str = 'evaluate',
                   description: str = 'score the final network on the '
                   'validation split and write its predictions',
                   figures_fn: FiguresFn | None = None) -> Stage:
  """Scores `<model_stage>/model.npz` on the validation split with
  `config.eval` (writing its predictions and those of the first
  `report.num_examples` training images).  `figures_fn(context, stage_dir,
  model, variables)` may add a figure table while the model is loaded."""
  def run(context, stage_dir):
    net, variables = segmentation.load_trained(
        rt, os.path.join(context.workdir, model_path(model_stage)), model)
    scores = segmentation.evaluate_model(
        rt, stage_dir, net, variables,
        num_train_examples=rt.config.report.num_examples)
    if figures_fn is not None and mesh_lib.is_primary():
      table = figures_fn(context, stage_dir, net, variables)
      if table:
        scores[figures.FIGURES_KEY] = table
    return scores
  return Stage(name, run, description=description,
               network=Network(model_stage, rt, model))
