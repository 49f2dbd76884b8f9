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


# Training scalars that are not terms of the objective.
_NOT_LOSS_TERMS = ('step', 'lr', 'grad_norm')


def plot_history(history: Mapping[str, Any], title: str, path: str) -> bool:
  """Small multiples against the step (PNG): the objective, each logged term
  (those without a '/' in their name), the learning rate, and the validation mIoU on a fixed 0-100 axis (so a
  1-point change looks like one); False when the history has no training
  rows."""
  train = history.get('train', [])
  if not train:
    return False
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  steps = [row['step'] for row in train]
  # Names with a '/' are grouped details (per-class counts), kept for
  # TensorBoard and results.json as in the log line (training/history.py).
  terms = ['loss'] + sorted(k for k in train[-1]
                            if k not in _NOT_LOSS_TERMS and k != 'loss'
                            and '/' not in k)
  panels = [(k, [row.get(k, np.nan) for row in train]) for k in terms]
  if 'lr' in train[-1]:
    panels.append(('learning rate', [row.get('lr', np.nan) for row in train]))
  val = history.get('val', [])
  columns = min(3, len(panels) + bool(val))
  rows = -(-(len(panels) + bool(val)) // columns)
  fig, axes = plt.subplots(rows, columns, figsize=(3.2 * columns, 2.4 * rows),
                           dpi=100, squeeze=False, layout='constrained')
  axes = list(axes.flat)
  for ax, (name, values) in zip(axes, panels):
    ax.plot(steps, values, color='tab:blue' if name != 'learning rate'
            else 'tab:green', linewidth=1)
    ax.set_title('objective' if name == 'loss' else name, fontsize=9)
    ax.tick_params(labelsize=7)
  if val:
    ax = axes[len(panels)]
    ax.plot([row['step'] for row in val], [row['miou'] for row in val],
            'o-', color='tab:orange', markersize=3)
    ax.set_ylim(0, 100)
    ax.set_title('val mIoU (%)', fontsize=9)
    ax.tick_params(labelsize=7)
  for ax in axes[len(panels) + bool(val):]:
    ax.axis('off')
  for ax in axes[-columns:]:
    ax.set_xlabel('step', fontsize=8)
  # The constrained layout leaves room for the title (tight_layout did not).
  fig.suptitle(title, fontsize=10)
  fig.savefig(path)
  plt.close(fig)
  return True


def image_grid(rows: Sequence[Sequence[np.ndarray | None]], cell: int = 160,
               gap: int = 2) -> np.ndarray:
  """uint8 (H, W, 3) grid: each image scaled to fit `cell` x `cell` (aspect
  kept; enlarged by pixel repetition, shrunk bilinearly), centred on white;
  a None cell stays light grey."""
  height = len(rows) * (cell + gap) - gap
  width = max(len(r) for r in rows) * (cell + gap) - gap
  grid = np.full((height, width, 3), 255, np.uint8)
  for i, row in enumerate(rows):
    for j, array in enumerate(row):
      top, left = i * (cell + gap), j * (cell + gap)
      if array is None:
        grid[top:top + cell, left:left + cell] = 230
        continue
      image = Image.fromarray(np.asarray(array)).convert('RGB')
      scale = cell / max(image.height, image.width)
      size = (max(1, round(image.width * scale)),
              max(1, round(image.height * scale)))
      image = image.resize(size, Image.NEAREST if scale > 1
                           else Image.BILINEAR)
      h, w = image.height, image.width
      y, x = top + (cell - h) // 2, left + (cell - w) // 2
      grid[y:y + h, x:x + w] = np.asarray(image)
  return grid


def class_legend(class_names: Sequence[str], palette: np.ndarray,
                 path: str) -> None:
  """A PNG of every class's palette colour with its id and name."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  from matplotlib.patches import Patch  # pylint: disable=g-import-not-at-top
  handles = [Patch(facecolor=np.asarray(palette[i]) / 255.0,
                   edgecolor='black', label=f'{i} {name}')
             for i, name in enumerate(class_names)]
  columns = min(len(handles), 6)
  fig = plt.figure(figsize=(1.6 * columns, 0.3 + 0.3 * -(-len(handles)
                                                          // columns)),
                   dpi=100)
  fig.legend(handles=handles, loc='center', ncol=columns, frameon=False,
             fontsize=8)
  fig.savefig(path, bbox_inches='tight')
  plt.close(fig)


