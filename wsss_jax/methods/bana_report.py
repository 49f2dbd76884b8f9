"""BANA's report figures (paper Figs. 4-5): per training image the input, the
normalised CAM u_c, the background attention u_0, Y_crf, Y_ret and the
unreliable region ~S where they disagree."""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import numpy as np

from wsss_jax import segmentation
from wsss_jax.data import schema
from wsss_jax.data.label_png import LabelFolder, overlay
from wsss_jax.methods import bana_generate, bana_labels
from wsss_jax.ops import image as image_ops
from wsss_jax.runtime import Runtime

_COLUMNS = ('input', 'cam', 'background', 'y_crf', 'y_ret', 'unreliable')


def _heatmap(values: np.ndarray) -> np.ndarray:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  from matplotlib import cm  # pylint: disable=g-import-not-at-top
  return (cm.viridis(np.clip(values, 0, 1))[..., :3] * 255).astype(np.uint8)


def _fmt(value) -> str:
  return '–' if value is None else f'{value:.1f}'


def _label_table(workdir: str) -> list[str]:
  """Table 1 of the run (pseudo-label mIoU on train) and val without CRF,
  from `<workdir>/results.json`."""
  path = os.path.join(workdir, 'results.json')
  if not os.path.exists(path):
    return []
  with open(path) as f:
    results = json.load(f).get('bana', {})
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


def report_section(rt: Runtime, workdir: str) -> list[str]:
  """Markdown lines with the figure table; images under `<workdir>/report/`."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from wsss_jax.methods import bana  # pylint: disable=g-import-not-at-top

  lines = _label_table(workdir)
  count = min(int(rt.config.report.num_examples), 4)
  model_file = os.path.join(workdir, 'classifier', segmentation.MODEL_FILE)
  if not count or not os.path.exists(model_file):
    return lines
  config = bana.classifier_config(rt.config, rt.config.bana.pooling)
  rt1 = dataclasses.replace(rt, config=config)
  model, variables = segmentation.load_trained(rt1, model_file)
  options = bana_generate.LabelOptions.from_config(config)

  @jax.jit
  def maps(variables, image, boxes, labels):
    x = image_ops.normalize_images(image, rt.normalization)
    features = model.apply(variables, x, train=False)['features']
    kernel = variables['params']['head']['classifier']['kernel'][0, 0]
    out = bana_labels.first_pass(
        features, kernel, boxes, labels, image.shape[1:3], per=options.per,
        resolution=options.resolution, threshold=options.threshold)
    return out['cam'], out['background']

  folders = {key: LabelFolder(os.path.join(workdir, 'labels', key))
             for key in (bana_generate.Y_CRF, bana_generate.Y_RET)}
  out_dir = os.path.join(workdir, 'report')
  os.makedirs(out_dir, exist_ok=True)
  lines += ['## Pseudo-labels (BANA Figs. 4-5)', '',
           'Per training image: the CAM u_c (Eq. 5, max over the box '
           'classes), the background attention u_0 (Eq. 7: 1 outside the '
           'boxes, the 0.99·max cut inside), Y_crf, Y_ret, and the unreliable '
           'region ~S where they disagree (white), which the noise-aware '
           'loss down-weights.', '',
           '| image | ' + ' | '.join(_COLUMNS) + ' |',
           '| --- ' * (len(_COLUMNS) + 1) + '|']
  source = rt.dataset.source(rt.train_split)
  for i in range(min(count, len(source))):
    example = source[i]
    image, image_id = example[schema.IMAGE], example[schema.IMAGE_ID]
    if not all(f.exists(image_id) for f in folders.values()):
      continue
    boxes, labels = bana_generate._pad_boxes(  # pylint: disable=protected-access
        example[schema.BOXES], example[schema.BOX_LABELS],
        options.max_boxes)
    cam, background = jax.device_get(maps(variables, image[None],
                                          boxes[None], labels[None]))
    y_crf = folders[bana_generate.Y_CRF].read(image_id)
    y_ret = folders[bana_generate.Y_RET].read(image_id)
    unreliable = np.where(y_crf != y_ret, 255, 0).astype(np.uint8)
    cells = {'input': image,
             'cam': _heatmap(np.max(cam[0][..., 1:], axis=-1)),
             'background': _heatmap(background[0]),
             'y_crf': overlay(image, y_crf), 'y_ret': overlay(image, y_ret),
             'unreliable': np.repeat(unreliable[..., None], 3, axis=-1)}
    row = [image_id]
    for name in _COLUMNS:
      path = os.path.join(out_dir, f'bana_{image_id}_{name}.png')
      Image.fromarray(cells[name]).save(path)
      row.append(f'![]({os.path.relpath(path, workdir)})')
    lines.append('| ' + ' | '.join(row) + ' |')
  return lines
