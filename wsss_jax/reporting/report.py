"""report.md: the run's results as tables, curves and example images.

Everything referenced by the report is written under `<workdir>/report/`:
training-curve plots (PNG) and palette overlays of inputs, ground truth,
pseudo-masks and predictions, so the report renders on GitHub or any
markdown viewer.
"""

from __future__ import annotations

import math
import os
from typing import Any

from PIL import Image

from wsss_jax.data import schema
from wsss_jax.data.label_png import LabelFolder, overlay
from wsss_jax.data.pipeline import Subset
from wsss_jax.reporting import figures
from wsss_jax.stages import MethodPipeline
from wsss_jax.runtime import Runtime

REPORT_DIR = 'report'


def _fmt(value: Any, digits: int = 1) -> str:
  if value is None:
    return '–'
  if isinstance(value, float):
    return '–' if math.isnan(value) else f'{value:.{digits}f}'
  return str(value)


def describe_protocol(protocol: dict[str, Any] | None) -> str:
  """'val, bucket 128, scales 1.0, flip, mean_probs, CRF' in words."""
  if not protocol:
    return '–'
  scales = '/'.join(f'{s:g}' for s in protocol.get('scales', []))
  return (f"{protocol.get('split')} split, padded to {protocol.get('bucket_size')}"
          f" px, scales {scales}, {'with' if protocol.get('flip') else 'no'} "
          f"flip, fusion {protocol.get('fusion')}, "
          + (f"windows {protocol['window_size']} px every "
             f"{protocol.get('window_stride')}, "
             if protocol.get('window_size') else '')
          + f"{'with' if protocol.get('crf') else 'no'} CRF")


EXAMPLE_COLUMNS = ('input', 'ground truth', 'pseudo-mask', 'prediction')


def _example_grid(rt: Runtime, workdir: str, pipeline: MethodPipeline,
                  predictions_root: str, split: str, count: int,
                  out_dir: str) -> tuple[str, list[str]]:
  """Writes one grid PNG of the first `count` images of a split (rows:
  images; columns: EXAMPLE_COLUMNS as palette overlays, grey where there
  is none); returns (its path relative to the workdir, the row ids)."""
  source = Subset(rt.dataset.source(split), count)
  predictions = LabelFolder(os.path.join(predictions_root, split))
  pseudo = (LabelFolder(os.path.join(workdir, pipeline.pseudo.folder))
            if pipeline.pseudo and split == rt.train_split else None)
  rows, ids = [], []
  for i in range(len(source)):
    example = source[i]
    image_id = str(example[schema.IMAGE_ID])
    image = example[schema.IMAGE]
    cells = [image, overlay(image, example[schema.MASK])]
    for folder in (pseudo, predictions):
      if folder is not None and os.path.exists(folder.path(image_id)):
        cells.append(overlay(image, folder.read(
            image_id, expected_hw=image.shape[:2])))
      else:
        cells.append(None)
    rows.append(cells)
    ids.append(image_id)
  path = os.path.join(out_dir, f'examples_{split}.png')
  Image.fromarray(figures.image_grid(rows)).save(path)
  return os.path.relpath(path, workdir), ids


def headline(config, dataset_name: str) -> str:
  """'box2seg (variant grabcut) on shapes_hard', plus the config's name
  when it is not the method's."""
  text = config.method
  if config.variant:
    text += f' (variant {config.variant})'
  text += f' on {dataset_name}'
  if config.name != config.method:
    text += f', config {config.name}'
  return text


def _class_table(rt: Runtime, results: dict[str, Any]) -> list[str]:
  val = (results.get('val') or {}).get('per_class_iou', {})
  pseudo = (results.get('pseudo') or {}).get('per_class_iou', {})
  lines = ['| class | val IoU | pseudo-mask IoU (train) |',
           '| --- | --- | --- |']
  for name in rt.class_names:
    lines.append(f'| {name} | {_fmt(val.get(name))} | '
                 f'{_fmt(pseudo.get(name))} |')
  return lines


def write_report(rt: Runtime, workdir: str, pipeline: MethodPipeline,
                 records: list[dict[str, Any]], results: dict[str, Any]
                 ) -> str:
  """Writes `<workdir>/report.md` (and its images); returns its path."""
  out_dir = os.path.join(workdir, REPORT_DIR)
  os.makedirs(out_dir, exist_ok=True)
  config = rt.config
  val = results.get('val') or {}
  pseudo = results.get('pseudo') or {}
  backbone = results['backbone']
  lines = [
      f'# {headline(config, rt.dataset.name)}', '',
      '| | |', '| --- | --- |',
      f"| val mIoU ({rt.val_split}) | **{_fmt(val.get('miou'))}** |",
      f"| val pixel accuracy | {_fmt(val.get('pixel_acc'))} |",
      f"| pseudo-mask mIoU ({rt.train_split}) | {_fmt(pseudo.get('miou'))} |",
      f"| backbone | {backbone['name']} (width {backbone['width']}, head "
      f"{backbone['head']}) |",
      f"| initialisation | {(backbone.get('initialisation') or {}).get('init', '–')} |",
      f"| evaluation | {describe_protocol(val.get('protocol'))} |",
      f"| wall time | {results['wall_s']:.1f} s |",
      f"| devices | {', '.join(results['devices'])} |",
      f"| skipped data files | {len(results['dataset']['skipped_files'])} |",
      '', '## Stages', '', '| stage | status | wall (s) |',
      '| --- | --- | --- |']
  lines += [f"| {r['name']}{' (side)' if r.get('side') else ''} | "
            f"{r['status']} | {r['wall_s']:.1f} |" for r in records]
  lines += ['', '## Per-class IoU (%)', ''] + _class_table(rt, results)
  by_name = {r['name']: r['results'] for r in records}
  lines += ['', '## Training curves', '']
  for stage in pipeline.train_stages:
    history = by_name.get(stage, {}).get('history', {})
    # Round stages ('round2/train') get a flat file name.
    path = os.path.join(out_dir, f"curve_{stage.replace('/', '_')}.png")
    if figures.plot_history(history, f'stage {stage}', path):
      lines.append(f'![{stage}]({os.path.relpath(path, workdir)})')
      summary = by_name.get(stage, {})
      lines.append('')
      lines.append(f"{stage}: {summary.get('steps')} steps, "
                   f"{_fmt(summary.get('images_per_second'))} images/s "
                   f"(steady state), first step (compile) "
                   f"{_fmt(summary.get('first_step_seconds'))} s.")
      lines.append('')
  predictions_root = os.path.join(workdir, pipeline.eval_stage, 'predictions')
  count = int(config.report.num_examples)
  if count:
    legend = os.path.join(out_dir, 'legend.png')
    figures.class_legend(rt.class_names, schema.voc_palette(), legend)
    lines += ['## Examples', '',
              f'Columns: {", ".join(EXAMPLE_COLUMNS)} (VOC palette overlays; '
              'ignore is light grey; a grey cell has no image).', '',
              f'![classes]({os.path.relpath(legend, workdir)})', '']
    for split in (rt.train_split, rt.val_split):
      grid, ids = _example_grid(rt, workdir, pipeline, predictions_root,
                                split, count, out_dir)
      lines += [f'### {split}: {", ".join(ids)}', '', f'![{split}]({grid})',
                '']
  for record in records:
    table = (record['results'] or {}).get(figures.FIGURES_KEY)
    if table:
      lines += [''] + figures.render_table(table)
  if pipeline.report_section is not None:
    lines += [''] + pipeline.report_section(results)
  path = os.path.join(workdir, 'report.md')
  with open(path, 'w') as f:
    f.write('\n'.join(lines) + '\n')
  return path
