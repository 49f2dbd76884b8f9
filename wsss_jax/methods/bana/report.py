"""BANA's report figures (paper Figs. 4-5): per training image the input, the
normalised CAM u_c, the background attention u_0, Y_crf, Y_ret and the
unreliable region ~S where they disagree."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from wsss_jax.data import boxes as box_rows
from wsss_jax.data import schema
from wsss_jax.data.label_png import LabelFolder, overlay
from wsss_jax.methods.bana import generate as bana_generate
from wsss_jax.methods.bana.generate import Y_CRF, Y_RET
from wsss_jax.methods.bana import labels as bana_labels
from wsss_jax.ops import image as image_ops
from wsss_jax.reporting import figures
from wsss_jax.runtime import Runtime

_COLUMNS = ('input', 'cam', 'background', 'y_crf', 'y_ret', 'unreliable')
_TITLE = 'Pseudo-labels (BANA Figs. 4-5)'
_CAPTION = ('Per training image: the CAM u_c (Eq. 5, max over the box classes), '
            'the background attention u_0 (Eq. 7: 1 outside the boxes, the '
            '0.99·max cut inside), Y_crf, Y_ret, and the unreliable region ~S '
            'where they disagree (white), which the noise-aware loss '
            'down-weights.')


def _fmt(value) -> str:
  return '–' if value is None else f'{value:.1f}'


def label_table(results: dict[str, Any]) -> list[str]:
  """Report section: Table 1 of the run (pseudo-label mIoU on train) and val
  without CRF, from the results.json dict."""
  results = results.get('bana') or {}
  rows = results.get('pseudo_labels', {})
  lines = ['## Pseudo-label quality (BANA Table 1)', '',
           'mIoU on the training images against the ground truth; the '
           'agreement map is scored where Y_crf and Y_ret agree.', '',
           '| Labeler | images | Y_crf | Y_ret | agreement (coverage) |',
           '| --- | --- | --- | --- | --- |']
  names = {'bap': 'BAP', 'bap_on_gap_images': 'BAP (the GAP images)',
           'gap': 'GAP'}
  for key, name in names.items():
    row = rows.get(key)
    if not row:
      continue
    lines.append(
        f"| {name} | {row.get('images', '–')} | {_fmt(row.get('y_crf'))} | "
        f"{_fmt(row.get('y_ret'))} | {_fmt(row.get('agreement'))} "
        f"({_fmt(row.get('agreement_coverage_pct'))} %) |")
  if results.get('val_miou_without_crf') is not None:
    lines += ['', f"Val mIoU without the CRF: "
              f"{results['val_miou_without_crf']:.1f}."]
  return lines + ['']


def write_figures(rt: Runtime, workdir: str, out_dir: str, model, variables,
                  options: bana_generate.LabelOptions,
                  folders: dict[str, LabelFolder], count: int
                  ) -> dict[str, Any] | None:
  """Writes the Figs. 4-5 images of the first `count` training images (up to
  4) under `out_dir`; returns their figure table (None when `count` is 0)."""
  count = min(int(count), 4)
  if not count:
    return None

  @jax.jit
  def maps(variables, image, boxes, labels):
    x = image_ops.normalize_images(image, rt.normalization)
    features = model.apply(variables, x, train=False)['features']
    kernel = variables['params']['head']['classifier']['kernel'][0, 0]
    out = bana_labels.first_pass(
        features, kernel, boxes, labels, image.shape[1:3], per=options.per,
        resolution=options.resolution, threshold=options.threshold)
    return out['cam'], out['background']

  rows = []
  source = rt.dataset.source(rt.train_split)
  for i in range(min(count, len(source))):
    example = source[i]
    image, image_id = example[schema.IMAGE], example[schema.IMAGE_ID]
    if not (folders[Y_CRF].exists(image_id)
            and folders[Y_RET].exists(image_id)):
      continue
    boxes, labels = box_rows.pad_boxes(
        example[schema.BOXES], example[schema.BOX_LABELS], options.max_boxes)
    cam, background = jax.device_get(maps(variables, image[None],
                                          boxes[None], labels[None]))
    y_crf = folders[Y_CRF].read(image_id)
    y_ret = folders[Y_RET].read(image_id)
    unreliable = np.where(y_crf != y_ret, 255, 0).astype(np.uint8)
    cells = {'input': image,
             'cam': figures.heatmap(np.max(cam[0][..., 1:], axis=-1)),
             'background': figures.heatmap(background[0]),
             'y_crf': overlay(image, y_crf), 'y_ret': overlay(image, y_ret),
             'unreliable': np.repeat(unreliable[..., None], 3, axis=-1)}
    rows.append(figures.save_row(workdir, out_dir, 'bana', image_id, cells,
                                 _COLUMNS))
  return figures.figure_table(_TITLE, _CAPTION, _COLUMNS, rows)
