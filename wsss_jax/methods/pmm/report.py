"""PMM's report: the pseudo-mask figure (paper Figs. 1–2: CAM, CVS-smoothed
CAM, the per-class CRF masks of Eq. 7 and the PPMG label), each round's
predictions, and a section with Table 2's rows, the CAM threshold curve and
the rounds (Tables 4–5)."""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from wsss_jax.data import schema
from wsss_jax.data.label_png import overlay
from wsss_jax.methods.pmm import masks
from wsss_jax.ops import image as image_ops
from wsss_jax.ops.resize import resize_bilinear
from wsss_jax.reporting import figures

PSEUDO_COLUMNS = ('input', 'CAM', 'CVS-CAM', 'CRF-masks', 'PPMG', 'truth')
_PSEUDO_TITLE = 'Pseudo-masks (PMM Figs. 1-2, Algorithm 1)'
_PSEUDO_CAPTION = (
    'Per training image: the multi-crop CAM after Eq. (1) (the largest value '
    'over the image\'s classes; dark = 0, yellow = 1), the same after CVS '
    '(Eq. 6), the per-class CRF masks X^(m) of Eq. (7) (each class in its '
    'colour; pixels claimed by two classes light grey), the PPMG label '
    '(Eqs. 8-9) and the ground truth.')
PREDICTION_COLUMNS = ('input', 'prediction', 'truth')


def _strongest(cam: np.ndarray) -> np.ndarray:
  return (np.max(cam, axis=-1) if cam.shape[-1]
          else np.zeros(cam.shape[:2], np.float32))


def class_mask_map(foreground: np.ndarray) -> np.ndarray:
  """uint8 (H, W) from per-class masks (H, W, K): k + 1 where only class k
  claims the pixel, 255 where several do, 0 where none does."""
  count = foreground.sum(axis=-1)
  label = np.argmax(foreground, axis=-1) + 1
  return np.where(count == 0, 0, np.where(count == 1, label,
                                          schema.IGNORE_LABEL)).astype(
                                              np.uint8)


def write_pseudo_mask_figures(workdir: str, out_dir: str, items,
                              options) -> dict[str, Any] | None:
  """The figure rows of the given host items ({'image', 'cam' raw
  multi-crop CAM, 'image_labels', 'mask', 'image_id'}); `options` a
  `generate.HostOptions`."""
  rows = []
  for item in items:
    image = np.asarray(item[schema.IMAGE])
    present = np.asarray(item[schema.IMAGE_LABELS]) > 0
    mode = ('eq1' if options.normalisation == 'eq1'
            else 'pmm_code_multicrop')
    cam = masks.normalize_cam(np.asarray(item['cam'], np.float32), present,
                              mode=mode, eps=options.eps)
    parts = masks.ppmg_parts(
        image, cam, present, alpha=options.ppmg_alpha, t=options.t,
        s=options.s, cvs_zero_below_t=options.zero_below_t,
        min_exponent=options.min_exponent,
        fg_threshold=options.fg_threshold, crf_params=options.ppmg_crf,
        crf_backend='pydensecrf', colour_order=options.colour_order)
    cells = {
        'input': image,
        'CAM': figures.heatmap(_strongest(cam)),
        'CVS-CAM': figures.heatmap(_strongest(parts['smoothed'])),
        'CRF-masks': overlay(image, class_mask_map(parts['foreground'])),
        'PPMG': overlay(image, parts['label']),
        'truth': overlay(image, np.asarray(item[schema.MASK], np.uint8)),
    }
    rows.append(figures.save_row(workdir, out_dir, 'pmm',
                                 str(item[schema.IMAGE_ID]), cells,
                                 PSEUDO_COLUMNS))
  if not rows:
    return None
  return figures.figure_table(_PSEUDO_TITLE, _PSEUDO_CAPTION, PSEUDO_COLUMNS,
                              rows)


def _number(value, digits: int = 1) -> str:
  return '–' if value is None else f'{value:.{digits}f}'


def report_section(results: Mapping[str, Any]) -> list[str]:
  """Markdown: Table 2's rows, the CAM threshold curve and the rounds."""
  pmm = results.get('pmm') or {}
  lines = ['## PMM', '']
  masks_row = pmm.get('pseudo_masks') or {}
  if masks_row:
    lines += [
        f"Pseudo-masks on the first {masks_row.get('images')} training "
        'images (mIoU %, the shape of Table 2):', '',
        '| CAM (best τ) | CRF | CRF & CVS | PPMG w/o CVS | PPMG |',
        '| --- | --- | --- | --- | --- |',
        f"| {_number(pmm.get('cam_miou'))} (τ = "
        f"{_number(pmm.get('cam_threshold'), 2)}) | "
        + ' | '.join(_number(masks_row.get(name)) for name in
                     ('crf', 'crf_cvs', 'ppmg_no_cvs', 'ppmg')) + ' |', '']
    if masks_row.get('ppmg_all_images') is not None:
      lines += [f"PPMG on every training image (what the segmenter trains "
                f"on): {_number(masks_row['ppmg_all_images'])}.", '']
  curve = pmm.get('cam_curve') or []
  if curve:
    lines += ['CAM mIoU by background threshold τ: ' + ', '.join(
        f"{row['threshold']:.2f}: {_number(row['miou'])}" for row in curve)
              + '.', '']
  if pmm.get('cam_empty_pct') is not None:
    lines += [f"{_number(pmm['cam_empty_pct'])} % of the (image, class) "
              'pairs of those images have a CAM that is 0 everywhere: the '
              'classifier found the class in no window.', '']
  base = pmm.get('base_mask')
  if base:
    lines += [f"Base mask (multi-crop training's crop labels): mIoU "
              f"{_number(base['miou'])} on its sure pixels, "
              f"{_number(base.get('unlabeled_pct'))} % left unlabelled.", '']
  rows = pmm.get('rounds') or []
  if rows:
    lines += ['| round | PUS | val mIoU (CRF) | without CRF | its labels |',
              '| --- | --- | --- | --- | --- |']
    for row in rows:
      lines.append(f"| {row['round']} | {'yes' if row.get('pus') else 'no'} "
                   f"| {_number(row.get('val_miou'))} | "
                   f"{_number(row.get('val_miou_without_crf'))} | "
                   f"{_number(row.get('label_miou'))} |")
    lines.append('')
  return lines


def write_prediction_figures(rt, workdir: str, out_dir: str, net, variables,
                             count: int, round_no: int
                             ) -> dict[str, Any] | None:
  """Round `round_no`'s network on the first `count` (up to 4) training
  images (single scale, no CRF): the predictions per cycle."""
  count = min(int(count), 4)
  if not count:
    return None

  @jax.jit
  def predict(variables, images):
    x = image_ops.normalize_images(images, rt.normalization)
    logits = net.apply(variables, x, train=False)['logits']
    return jnp.argmax(resize_bilinear(logits, images.shape[1:3]), -1)

  source = rt.dataset.source(rt.train_split)
  rows = []
  for i in range(min(count, len(source))):
    example = source[i]
    image = np.asarray(example[schema.IMAGE])
    prediction = np.asarray(jax.device_get(predict(variables,
                                                   image[None])))[0]
    cells = {'input': image,
             'prediction': overlay(image, prediction.astype(np.uint8)),
             'truth': overlay(image, np.asarray(example[schema.MASK],
                                                np.uint8))}
    rows.append(figures.save_row(workdir, out_dir, f'pmm-round{round_no}',
                                 example[schema.IMAGE_ID], cells,
                                 PREDICTION_COLUMNS))
  return figures.figure_table(
      f'Round {round_no}: predictions on training images',
      f'The segmenter of round {round_no} (single scale, no CRF) on the '
      'first training images, whose labels the next round replaces by such '
      'predictions (cyclic pseudo-masks, Sec. 3.5).', PREDICTION_COLUMNS,
      rows)
