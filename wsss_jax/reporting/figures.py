"""Figures for report.md, written by the stages that have the data.

A stage that holds a model and images (a label stage, an evaluation) writes
its figure images while it runs and returns a *figure table* among its
results:

    results['figures'] = figure_table(
        'Pseudo-labels (BANA Figs. 4-5)', caption, columns, rows)

where each row is `[image_id, path | None, ...]` with paths relative to the
workdir.  The report renders every figure table of every stage, in pipeline
order, without knowing which method wrote it; a rerun that skips the stage
finds the table in its `stage.json`.
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

import numpy as np
from PIL import Image

FIGURES_KEY = 'figures'


def heatmap(values: np.ndarray) -> np.ndarray:
  """uint8 (H, W, 3) viridis colours of `values` (H, W) clipped to [0, 1]."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  from matplotlib import cm  # pylint: disable=g-import-not-at-top
  return (cm.viridis(np.clip(values, 0, 1))[..., :3] * 255).astype(np.uint8)


def save_row(workdir: str, out_dir: str, prefix: str, image_id: str,
             cells: Mapping[str, np.ndarray | None],
             columns: Sequence[str]) -> list[str | None]:
  """Writes one figure row as PNGs `<out_dir>/<prefix>_<image_id>_<column>.png`.

  Args:
    workdir: the run's workdir (paths are returned relative to it).
    out_dir: where the images go (created).
    prefix: file-name prefix, e.g. the method's name.
    image_id: the row's image.
    cells: {column: uint8 (H, W, 3) or (H, W) image}; a missing or None
      column is an empty cell.
    columns: the table's columns, in order.
  Returns:
    `[image_id, relative path or None per column]`.
  """
  os.makedirs(out_dir, exist_ok=True)
  row: list[str | None] = [str(image_id)]
  for name in columns:
    array = cells.get(name)
    if array is None:
      row.append(None)
      continue
    path = os.path.join(out_dir, f'{prefix}_{image_id}_{name}.png')
    Image.fromarray(np.asarray(array)).save(path)
    row.append(os.path.relpath(path, workdir))
  return row


def figure_table(title: str, caption: str, columns: Sequence[str],
                 rows: Sequence[Sequence[str | None]]) -> dict[str, Any]:
  """The JSON record a stage returns under `results['figures']`."""
  return {'title': title, 'caption': caption, 'columns': list(columns),
          'rows': [list(row) for row in rows]}


def render_table(table: Mapping[str, Any]) -> list[str]:
  """Markdown lines of one figure table (images as `![](path)`, '–' for an
  empty cell)."""
  columns = list(table['columns'])
  lines = [f"## {table['title']}", '']
  if table.get('caption'):
    lines += [table['caption'], '']
  lines += ['| image | ' + ' | '.join(columns) + ' |',
            '| --- ' * (len(columns) + 1) + '|']
  for image_id, *cells in table['rows']:
    rendered = [f'![]({c})' if c else '–' for c in cells]
    lines.append(f'| {image_id} | ' + ' | '.join(rendered) + ' |')
  return lines + ['']


def plot_history(history: Mapping[str, Any], title: str, path: str) -> bool:
  """Training loss and periodic validation mIoU against the step (PNG);
  False when the history has no training rows."""
  train = history.get('train', [])
  if not train:
    return False
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
  steps = [row['step'] for row in train]
  ax.plot(steps, [row['loss'] for row in train], color='tab:blue',
          label='train loss')
  ax.set_xlabel('step')
  ax.set_ylabel('loss', color='tab:blue')
  val = history.get('val', [])
  if val:
    ax2 = ax.twinx()
    ax2.plot([row['step'] for row in val], [row['miou'] for row in val],
             'o-', color='tab:orange', label='val mIoU')
    ax2.set_ylabel('val mIoU (%)', color='tab:orange')
  ax.set_title(title)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)
  return True
