"""RRM's report figure (paper Fig. 3): per training image the multi-scale
CAM, the CRF label I_crf, the CAM label I_cam, the reliable label I_final
and the final prediction, written by the evaluation stage while it holds the
model.  The labels are those the training step would make for the whole
image with the final network (`objective.online_labels`, same rule and CRF).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from wsss_jax.data import schema
from wsss_jax.data.label_png import overlay
from wsss_jax.methods.rrm import objective
from wsss_jax.ops import image as image_ops
from wsss_jax.ops.resize import resize_bilinear
from wsss_jax.reporting import figures
from wsss_jax.runtime import Runtime

COLUMNS = ('input', 'CAM', 'I_crf', 'I_cam', 'I_final', 'prediction')
_TITLE = 'Reliable labels (RRM Fig. 3)'
_CAPTION = ('Per training image, with the final network: the multi-scale CAM '
            '(the largest P_fg of the image\'s classes; dark = 0, yellow = 1), '
            'the CRF label I_crf (Eq. 5), the top-ratio CAM label I_cam '
            '(Eq. 6), the reliable label I_final (Eq. 7; the official rule '
            'when `reliable_label_rule` is `official`) and the prediction of '
            'the segmentation branch.  Unlabelled pixels are light grey.')


def strongest_cam(probs: np.ndarray) -> np.ndarray:
  """The CAM column: max over the foreground channels of [P_bg, P_fg].

  Args:
    probs: (H, W, K + 1), channel 0 the background.
  Returns:
    (H, W) float in [0, 1].
  """
  return np.max(probs[..., 1:], axis=-1) if probs.shape[-1] > 1 else (
      np.zeros(probs.shape[:2], probs.dtype))


def write_figures(rt: Runtime, workdir: str, out_dir: str, model, variables,
                  options: objective.RRMOptions, count: int
                  ) -> dict[str, Any] | None:
  """Writes the Fig. 3 rows of the first `count` (up to 4) training images
  under `out_dir`; returns their figure table (None when `count` is 0)."""
  count = min(int(count), 4)
  if not count:
    return None
  # The in-step CRF's host path, in this process: a few images need no
  # pool, and the 'jax' backend would need a lattice capacity.
  backend = 'pydensecrf'

  @jax.jit
  def labels_and_prediction(variables, batch):
    images = batch[schema.IMAGE]
    x = image_ops.normalize_images(images, rt.normalization)
    cam = model.apply(variables, x, method='multiscale_cam')
    made = objective.online_labels({'multiscale_cam': cam}, batch, options,
                                   backend, None, 0)
    logits = model.apply(variables, x, train=False)['logits']
    prediction = jnp.argmax(resize_bilinear(logits, images.shape[1:3]), -1)
    return {'cam': made['probs'], 'I_crf': made['i_crf'],
            'I_cam': made['i_cam'], 'I_final': made['labels'],
            'prediction': prediction}

  source = rt.dataset.source(rt.train_split)
  rows = []
  for i in range(min(count, len(source))):
    example = source[i]
    image = np.asarray(example[schema.IMAGE])
    batch = {schema.IMAGE: image[None],
             schema.VALID: np.ones((1,) + image.shape[:2], bool),
             schema.IMAGE_LABELS: np.asarray(
                 example[schema.IMAGE_LABELS])[None]}
    out = jax.device_get(labels_and_prediction(variables, batch))
    cells = {'input': image,
             'CAM': figures.heatmap(strongest_cam(out['cam'][0]))}
    for name in COLUMNS[2:]:
      cells[name] = overlay(image, out[name][0].astype(np.uint8))
    rows.append(figures.save_row(workdir, out_dir, 'rrm',
                                 example[schema.IMAGE_ID], cells, COLUMNS))
  return figures.figure_table(_TITLE, _CAPTION, COLUMNS, rows)
