"""The weights of a training stage's best periodic validation score.

Some recipes hand the next stage the checkpoint that scored best on the
validation split rather than the last one (PMM's official cyclic step picks
the best-val checkpoint of the PUS run).  `BestWeights.update` is called
after every validation of a training stage; it keeps one weight file and a
JSON record beside it, both written atomically, and reads the record back on
resume so that a killed run compares against the best score it saw before.
"""

from __future__ import annotations

import json
import logging
import math
import os
from typing import Any

import jax
import numpy as np

from wsss_jax.atomic import write_atomic, write_json_atomic
from wsss_jax.models import weights as weights_lib
from wsss_jax.training import mesh as mesh_lib

log = logging.getLogger(__name__)

BEST_MODEL_FILE = 'best_model.npz'
BEST_RECORD_FILE = 'best_model.json'


class BestWeights:
  """Keeps `<directory>/best_model.npz`: the variables of the validation with
  the highest `metric` so far (ties keep the earlier step), and
  `best_model.json`: {'step', 'metric', 'score', 'scores'}."""

  def __init__(self, directory: str, metric: str = 'miou'):
    self.directory = directory
    self.metric = metric
    self.weights_path = os.path.join(directory, BEST_MODEL_FILE)
    self.record_path = os.path.join(directory, BEST_RECORD_FILE)
    self.record: dict[str, Any] | None = None
    if os.path.exists(self.record_path) and os.path.exists(self.weights_path):
      with open(self.record_path, encoding='utf-8') as f:
        self.record = json.load(f)

  def update(self, step: int, scores: dict[str, Any], variables: Any) -> bool:
    """Records this validation; returns True when it is the new best.

    A missing or non-finite score is logged and never becomes the best.
    """
    score = scores.get(self.metric)
    if score is None or not math.isfinite(float(score)):
      log.warning('Validation at step %d has no finite %r (%r); it cannot '
                  'be the best checkpoint.', step, self.metric, score)
      return False
    score = float(score)
    if self.record is not None and score <= self.record['score']:
      return False
    self.record = {'step': int(step), 'metric': self.metric, 'score': score,
                   'scores': {k: float(v) for k, v in scores.items()
                              if isinstance(v, (int, float))}}
    if mesh_lib.is_primary():
      os.makedirs(self.directory, exist_ok=True)
      flat = {key: np.asarray(value) for key, value in
              weights_lib.flatten_variables(jax.device_get(variables)).items()}
      # The weights first: a record never names weights that are not there.
      write_atomic(self.weights_path, lambda f: np.savez(f, **flat))
      write_json_atomic(self.record_path, self.record)
    return True
