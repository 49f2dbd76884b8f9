"""Training history: TensorBoard events, log lines and a JSON record.

The JSON history (train losses and periodic validation scores by step) travels
inside every checkpoint, so a resumed run keeps the curves of the part it ran
before being killed; reports plot it.
"""

from __future__ import annotations

import logging
import math
import os
from typing import Any

import jax
import numpy as np

log = logging.getLogger(__name__)


class History:
  """Train/val scalars by step, mirrored to TensorBoard on process 0."""

  def __init__(self, log_dir: str, stage: str,
               state: dict[str, Any] | None = None, config_text: str = ''):
    self.stage = stage
    self.train: list[dict[str, float]] = list((state or {}).get('train', []))
    self.val: list[dict[str, float]] = list((state or {}).get('val', []))
    self._writer = None
    if jax.process_index() == 0:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      self._writer = SummaryWriter(log_dir=os.path.join(log_dir, 'tb'))
      if config_text and state is None:       # once, when the stage starts
        self._writer.add_text('config', config_text, 0)

  def state(self) -> dict[str, Any]:
    return {'train': self.train, 'val': self.val}

  def add_train(self, step: int, scalars: dict[str, float]) -> None:
    self.train.append(dict(step=int(step), **scalars))
    self._write('train', step, scalars)

  def add_val(self, step: int, scalars: dict[str, float]) -> None:
    self.val.append(dict(step=int(step), **scalars))
    self._write('val', step, scalars)

  def add_image(self, step: int, image: np.ndarray,
                tag: str = 'val/predictions') -> None:
    """A uint8 (H, W, 3) image (e.g. inputs next to predictions)."""
    if self._writer is not None:
      self._writer.add_image(tag, image, step, dataformats='HWC')
      self._writer.flush()

  def _write(self, prefix: str, step: int, scalars: dict[str, float]) -> None:
    if self._writer is None:
      return
    for name, value in scalars.items():
      self._writer.add_scalar(tensorboard_tag(prefix, name), value, step)
    self._writer.flush()

  def close(self) -> None:
    if self._writer is not None:
      self._writer.close()


def tensorboard_tag(prefix: str, name: str) -> str:
  """The TensorBoard tag of a scalar (each stage writes its own events file,
  so tags carry no stage name): 'val/miou', 'lr', 'loss/total' for the
  objective, 'loss/<term>' for its terms and diagnostics, 'optim/grad_norm'."""
  if prefix == 'val':
    return f'val/{name}'
  if name == 'lr':
    return 'lr'
  if name == 'grad_norm':
    return 'optim/grad_norm'
  return 'loss/total' if name == 'loss' else f'loss/{name}'


def mean_scalars(metrics: list[dict[str, Any]]) -> dict[str, float]:
  """Host means of a list of per-step scalar dicts (already on the host)."""
  keys = metrics[0].keys()
  return {k: float(np.mean([float(m[k]) for m in metrics])) for k in keys}


def first_non_finite(metrics: list[tuple[int, dict[str, Any]]]
                     ) -> tuple[int, str, float] | None:
  """(step, name, value) of the first non-finite scalar, or None."""
  for step, values in metrics:
    for name, value in values.items():
      if not math.isfinite(float(value)):
        return step, name, float(value)
  return None


def format_scalars(scalars: dict[str, float]) -> str:
  """'ce=0.41 loss=0.5 lr=0.001' (sorted, 4 significant digits).  Names
  with a '/' (grouped details, e.g. per-class counts) are left to the
  history and TensorBoard."""
  return ' '.join(f'{k}={v:.4g}' for k, v in sorted(scalars.items())
                  if '/' not in k)


def describe(step: int, scalars: dict[str, float]) -> str:
  return f'step {step}: ' + format_scalars(scalars)


def log_line(stage: str, step: int, scalars: dict[str, float]) -> None:
  log.info('[%s] %s', stage, describe(step, scalars))
