"""LPG's pseudo-masks on a box-labelled split (Sec. 3.3; supplement A).

One device pass per batch: f's probabilities, g on every (image, class)
slot, g's logits back to the image (bilinear, align_corners True, as the
official code), ψ(p) inside the class's boxes, and the multi-class fusion
(`fusion.fuse`: the paper's overlap rate or the code's first-come rule).
The host only writes the maps.

The network of a deployment stage is assembled from two files: the
generator of an E-step stage (trained on the auxiliary set, its `segmenter`
entries are the auxiliary f) and the target set's f of the previous stage
(`assemble_variables`).
"""

from __future__ import annotations

import functools
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from wsss_jax.methods.lpg import classes, fusion
from wsss_jax.models import weights as weights_lib
from wsss_jax.ops import image as image_ops
from wsss_jax.ops.resize import resize_bilinear
from wsss_jax.pseudo import engine
from wsss_jax.training import state as state_lib

LABEL = 'lpg_label'


def assemble_variables(variables: Mapping[str, Any],
                       generator_file: str | None,
                       segmenter_file: str | None) -> dict[str, Any]:
  """`LPGNet` variables (nested, e.g. `init_variables` or its eval_shape)
  with every 'generator' entry replaced from `generator_file` (an E-step
  stage's model.npz) and every 'segmenter' entry from `segmenter_file` (a
  segmentation stage's model.npz, whose keys lack the 'segmenter/' level);
  a None file keeps those entries.  Strict: a missing or mis-shaped array
  raises `weights.WeightsError` naming it."""
  sources = {'generator': (weights_lib.read_weights(generator_file)
                           if generator_file else None),
             'segmenter': (weights_lib.read_weights(segmenter_file)
                           if segmenter_file else None)}
  out, problems = {}, []
  for key, leaf in weights_lib.flatten_variables(variables).items():
    collection, module, rest = key.split('/', 2)
    source = sources.get(module)
    if source is None:
      if module not in sources:
        problems.append(f'{key}: neither generator nor segmenter')
      out[key] = leaf
      continue
    name = key if module == 'generator' else f'{collection}/{rest}'
    if name not in source:
      problems.append(f'{key} (no {name!r})')
      continue
    array = np.asarray(source[name])
    if array.shape != tuple(leaf.shape):
      problems.append(f'{key}: file {array.shape}, model {tuple(leaf.shape)}')
      continue
    out[key] = jnp.asarray(array, leaf.dtype)
  if problems:
    raise weights_lib.WeightsError(
        f'cannot assemble the LPG network from {generator_file} and '
        f'{segmenter_file}: ' + '; '.join(problems[:8])
        + (f' (+{len(problems) - 8} more)' if len(problems) > 8 else ''))
  nested = weights_lib.unflatten_variables(out)
  nested.setdefault('batch_stats', {})
  return nested


def abstract_variables(model) -> dict[str, Any]:
  """The shapes of `model`'s variables (no compute)."""
  return jax.eval_shape(lambda: state_lib.init_variables(
      model, jax.random.PRNGKey(0), (1, 128, 128, 3)))


def label_pass(model, normalization: str, fusion_name: str,
               compute_dtype=jnp.float32):
  """Jitted `first(variables, batch) -> {'lpg_label': (B, H, W) uint8,
  'truncated': (B,) int32}`: `truncated` counts images with more classes
  than the model's slots (the extra classes get no mask)."""
  if fusion_name not in fusion.FUSIONS:
    raise ValueError(f'lpg.fusion={fusion_name!r}; expected one of '
                     f'{fusion.FUSIONS}.')

  @jax.jit
  def first(variables, batch):
    images = image_ops.normalize_images(batch['image'], normalization,
                                        compute_dtype)
    out = model.apply(variables, images, train=False, boxes=batch['boxes'],
                      box_labels=batch['box_labels'])
    height, width = images.shape[1:3]
    logits = out['lpg_logits']                       # (B, M, h, w, 2)
    batch_size, slots, h, w, _ = logits.shape
    # Back to 4x the 1/4 grid (the official code: 128 -> 512, align
    # corners), then cut to the image.
    up = resize_bilinear(logits.reshape(batch_size * slots, h, w, 2),
                         (4 * h, 4 * w), align_corners=True)
    up = up[:, :height, :width].reshape(batch_size, slots, height, width, 2)
    preds = fusion.class_predictions(up, out['box_masks'], out['slot_valid'])
    label = fusion.fuse(fusion_name, preds, out['slot_classes'],
                        out['slot_valid'])
    distinct = classes.num_distinct_classes(batch['box_labels'])
    return {LABEL: label,
            'truncated': (distinct > slots).astype(jnp.int32)}

  return first


def take_label(example: Mapping[str, Any]) -> np.ndarray:
  """The host function of the label job: the device pass's map."""
  return np.asarray(example[LABEL], np.uint8)


def label_job(variables, first, batch_size: int) -> engine.LabelJob:
  """The engine job writing `LABEL` maps (`first` from `label_pass`)."""
  return engine.LabelJob(
      outputs=(LABEL,), host_fn=take_label,
      first_pass=functools.partial(first, variables),
      batch_size=int(batch_size), box_rows=8, counted=('truncated',),
      desc='LPG masks')

