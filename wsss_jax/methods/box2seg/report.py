"""Box2Seg's report figures (paper Fig. 4): per training image the box tensor
B, the GrabCut masks M, the attention α of the box class and the final
prediction, written by the evaluation stage while it holds the model."""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from wsss_jax.data import schema
from wsss_jax.data.label_png import LabelFolder, overlay
from wsss_jax.ops import image as image_ops
from wsss_jax.ops.resize import resize_bilinear
from wsss_jax.reporting import figures
from wsss_jax.runtime import Runtime

_COLUMNS = ('input', 'B', 'M', 'attention', 'prediction')
_TITLE = 'Attention maps (Box2Seg Fig. 4)'
_CAPTION = ('Per training image: the box tensor B, the GrabCut masks M, the '
            'attention α of the box class at every pixel inside a box (dark = '
            '0, yellow = 1), and the final prediction.')


def box_class_attention(attention: np.ndarray,
                        box_map: np.ndarray) -> np.ndarray:
  """α of each pixel's box class, 0 outside the boxes.

  Args:
    attention: (H, W, L) per-class attention in [0, 1] (foreground classes
      1..L in channels 0..L-1).
    box_map: (H, W) box-filled label map B (0 background).
  Returns:
    (H, W) float.
  """
  index = np.clip(box_map.astype(np.int64) - 1, 0, attention.shape[-1] - 1)
  alpha = np.take_along_axis(attention, index[..., None], -1)[..., 0]
  return np.where(box_map > 0, alpha, 0.0)


def write_figures(rt: Runtime, workdir: str, out_dir: str, model, variables,
                  count: int) -> dict[str, Any] | None:
  """Writes the figure images of the first `count` (up to 4) training images
  under `out_dir`; returns their figure table (None when `count` is 0)."""
  count = min(int(count), 4)
  if not count:
    return None

  @jax.jit
  def forward(variables, images):
    x = image_ops.normalize_images(images, rt.normalization)
    out = model.apply(variables, x, train=False)
    size = images.shape[1:3]
    return (jnp.argmax(resize_bilinear(out['logits'], size), -1),
            resize_bilinear(jax.nn.sigmoid(out['attention_logits']), size))

  folders = {'B': LabelFolder(os.path.join(workdir, 'box_labels', 'labels')),
             'M': LabelFolder(os.path.join(workdir, 'grabcut', 'labels'))}
  source = rt.dataset.source(rt.train_split)
  rows = []
  for i in range(min(count, len(source))):
    example = source[i]
    image, image_id = example[schema.IMAGE], example[schema.IMAGE_ID]
    prediction, attention = jax.device_get(forward(variables, image[None]))
    cells = {'input': image,
             'prediction': overlay(image, prediction[0].astype(np.uint8))}
    for name, folder in folders.items():
      if folder.exists(image_id):
        cells[name] = overlay(image, folder.read(image_id))
    if folders['B'].exists(image_id):
      cells['attention'] = figures.heatmap(
          box_class_attention(attention[0], folders['B'].read(image_id)))
    rows.append(figures.save_row(workdir, out_dir, 'box2seg', image_id, cells,
                                 _COLUMNS))
  return figures.figure_table(_TITLE, _CAPTION, _COLUMNS, rows)
