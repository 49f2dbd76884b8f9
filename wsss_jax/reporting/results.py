"""results.json: one machine-readable record of a run."""

from __future__ import annotations

from typing import Any

import jax

from wsss_jax import config_checks
from wsss_jax.reporting import provenance
from wsss_jax.stages import MethodPipeline
from wsss_jax.runtime import Runtime

_SCORE_FIELDS = ('miou', 'per_class_iou', 'pixel_acc', 'mean_acc', 'fw_iou',
                 'num_images')


def _scores(result: dict[str, Any] | None) -> dict[str, Any] | None:
  if not result:
    return None
  return {k: result[k] for k in _SCORE_FIELDS if k in result}


def assemble(rt: Runtime, pipeline: MethodPipeline,
             records: list[dict[str, Any]], wall_s: float,
             session_s: float | None = None) -> dict[str, Any]:
  """The results.json dict of a finished run.

  `wall_s` is the time the results cost (stages timed when they ran, so it
  survives reruns that skip them); `session_s` is this invocation's time.
  """
  config = rt.config
  by_name = {record['name']: record['results'] for record in records}
  evaluation = by_name.get(pipeline.eval_stage, {})
  pseudo = None
  if pipeline.pseudo:
    quality = by_name.get(pipeline.pseudo.stage, {}).get('quality') or {}
    if pipeline.pseudo.key:
      quality = quality.get(pipeline.pseudo.key)
    pseudo = _scores(quality)
    if pseudo is not None:
      pseudo['split'] = rt.train_split
  val = _scores(evaluation)
  if val is not None:
    val['split'] = rt.val_split
    val['protocol'] = evaluation.get('protocol')
  # The backbone's initialisation is that of the first training stage (later
  # stages start from earlier ones; their records say so under 'training').
  initialisation = next(
      (by_name[name]['initialisation'] for name in pipeline.train_stages
       if 'initialisation' in by_name.get(name, {})), None)
  results = {
      'config': {'name': config.name, 'variant': config.variant},
      'method': config.method,
      'dataset': {
          'name': rt.dataset.name,
          'train_split': rt.train_split,
          'val_split': rt.val_split,
          'num_classes': rt.num_classes,
          'class_names': list(rt.class_names),
          'skipped_files': rt.dataset.skipped,
      },
      'backbone': {'name': config.model.backbone,
                   'width': config.model.width,
                   'head': config.model.head,
                   'initialisation': initialisation},
      'val': val,
      'pseudo': pseudo,
      'wall_s': round(wall_s, 2),
      'session_wall_s': round(wall_s if session_s is None else session_s, 2),
      'stages': [{'name': r['name'], 'wall_s': r['wall_s'],
                  'status': r['status'], 'side': bool(r.get('side'))}
                 for r in records],
      'training': {name: {k: v for k, v in by_name.get(name, {}).items()
                          if k != 'history'}
                   for name in pipeline.train_stages},
      'provenance': provenance.provenance(),
      'versions': provenance.versions(),
      'devices': [str(d) for d in jax.devices()],
      'process_count': jax.process_count(),
      'full_config': config_checks.config_as_dict(config),
  }
  if pipeline.extra_results is not None:
    results[config.method] = pipeline.extra_results(by_name)
  return results
