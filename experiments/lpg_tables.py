"""LPG Tables 2 and 9 and the fusion rule on the embedded benchmark, over
seeds.

  python experiments/lpg_tables.py [--seeds=0,1,2] [--override=field=value]

Per seed: the default run (`configs/lpg.py`: stage-wise EM, overlap-rate
fusion) in experiments/out/lpg/lpg-seed<k>, then `:fixed` in fixed-seed<k>
with the auxiliary EM, D's references and stage0 copied from it.  Table 2's
rows are the val mIoU of stages 1..S; Table 9's the masks' mIoU on D's
training split, with the box fill and Box + DenseCRF references (all on the
first `lpg.reference_images` training images).  The
fusion rule is compared on the same generator outputs: every training image
of D with overlapping boxes of different classes is labelled by the default
run's stage-s network with both rules (`fusion_rows`).  Writes
experiments/out/lpg/tables.{md,json} and checks the paper's claims seed by
seed.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any, Sequence

import numpy as np
from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import sweep  # pylint: disable=g-import-not-at-top,wrong-import-position
from wsss_jax import pretraining, run, runtime  # pylint: disable=g-import-not-at-top,wrong-import-position
from wsss_jax import common_stages as cs  # pylint: disable=g-import-not-at-top,wrong-import-position
from wsss_jax.data import schema  # pylint: disable=g-import-not-at-top,wrong-import-position
from wsss_jax.evaluation import metrics  # pylint: disable=g-import-not-at-top,wrong-import-position
from wsss_jax.methods.lpg import generate, objective  # pylint: disable=g-import-not-at-top,wrong-import-position
from wsss_jax.methods.lpg import model as lpg_model  # pylint: disable=g-import-not-at-top,wrong-import-position


def _define_flags() -> None:
  """Defined only when run as a script (tests import the functions)."""
  flags.DEFINE_list('seeds', ['0', '1', '2'], 'Training seeds.')
  flags.DEFINE_multi_string(
      'override', [], 'field=value config overrides applied to every run.')
  flags.DEFINE_string('out', 'experiments/out', 'Output root.')
  flags.DEFINE_integer('fusion_images', 300,
                       'At most this many overlap images per seed.')


FLAGS = flags.FLAGS
# Paper values (VOC val mIoU, LargeFOV; Table 9: pseudo-masks on VOC).
TABLE2 = {'stagewise': (66.8, 68.3, 68.4), 'fixed': (64.6, 66.4, 67.5)}
TABLE9 = (78.2, 81.7, 82.2)
TABLE9_DENSE_CRF = 69.7


def shared_stages(stages: int) -> list[str]:
  """What `:fixed` takes from the default run: the auxiliary EM, D's
  references and stage0."""
  names = ['aux/box_labels', 'aux/stage0', 'box_labels', 'dense_crf',
           'stage0']
  return names + [f'aux/stage{s}' for s in range(1, stages + 1)]


def run_rows(seed: int, results: dict[str, Any], schedule: str
             ) -> list[dict[str, Any]]:
  """Table 2 and 9 rows of one run's results.json."""
  lpg = results['lpg']
  rows = []
  for row in lpg['stages']:
    rows.append({'table': 2, 'row': schedule, 'stage': row['stage'],
                 'seed': seed, 'miou': row['val_miou'],
                 'without_crf': row.get('val_miou_without_crf')})
    if schedule == 'stagewise':
      # On the references' images when the run compared a subset.
      masks = row.get('pseudo_miou_compared')
      rows.append({'table': 9, 'row': f"stage {row['stage']}",
                   'stage': row['stage'], 'seed': seed,
                   'miou': row['pseudo_miou'] if masks is None else masks})
  if schedule == 'stagewise':
    for name in ('box_fill', 'dense_crf'):
      rows.append({'table': 9, 'row': name, 'seed': seed,
                   'miou': lpg['references'][name]})
  return rows


def overlapping_classes(boxes: np.ndarray, labels: np.ndarray) -> bool:
  """Whether two boxes of different classes share a pixel (half-open
  boxes; padding rows have labels < 1)."""
  boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
  labels = np.asarray(labels).reshape(-1)
  keep = labels >= 1
  boxes, labels = boxes[keep], labels[keep]
  x0 = np.maximum(boxes[:, None, 0], boxes[None, :, 0])
  y0 = np.maximum(boxes[:, None, 1], boxes[None, :, 1])
  x1 = np.minimum(boxes[:, None, 2], boxes[None, :, 2])
  y1 = np.minimum(boxes[:, None, 3], boxes[None, :, 3])
  overlap = (x1 > x0) & (y1 > y0) & (labels[:, None] != labels[None, :])
  return bool(overlap.any())


def fusion_rows(config, workdir: str, seed: int, max_images: int
                ) -> list[dict[str, Any]]:
  """Both fusion rules on the same generator outputs: for every stage of
  the finished run in `workdir`, the masks' mIoU on the training images
  with overlapping boxes of different classes, and the share of their
  pixels the two rules label differently."""
  rt = runtime.make_runtime(config,
                            builtin_weights=pretraining.builtin_weights)
  options = objective.LPGOptions.from_config(config.lpg)
  source = rt.dataset.source(rt.train_split)
  examples = []
  for i in range(len(source)):
    example = source[i]
    if overlapping_classes(example[schema.BOXES], example[schema.BOX_LABELS]):
      examples.append(example)
    if len(examples) >= max_images:
      break
  rows = []
  batch = int(config.eval.batch_size)
  for s in range(1, options.stages + 1):
    g = options.generator_stage(s)
    with_seg = options.uses_segmentation(g)
    net = lpg_model.build_lpg_model(config, rt.num_classes, rt.compute_dtype,
                                    with_segmentation=with_seg)
    variables = generate.assemble_variables(
        generate.abstract_variables(net),
        os.path.join(workdir, cs.model_path(f'aux/stage{g}/generator')),
        (os.path.join(workdir, cs.model_path(f'stage{s - 1}/train'))
         if with_seg else None))
    conf = {name: np.zeros((rt.num_classes,) * 2, np.int64)
            for name in ('overlap_rate', 'first_come')}
    differ = total = 0
    for name in conf:
      first = generate.label_pass(net, rt.normalization, name,
                                  rt.compute_dtype)
      labels = _label(first, variables, examples, batch)
      for example, label in zip(examples, labels):
        conf[name] += metrics.confusion_matrix(example[schema.MASK], label,
                                               rt.num_classes)
      if name == 'overlap_rate':
        reference = labels
      else:
        differ = sum(int((a != b).sum()) for a, b in zip(reference, labels))
        total = sum(a.size for a in labels)
    for name, matrix in conf.items():
      rows.append({'table': 'fusion', 'row': name, 'stage': s, 'seed': seed,
                   'images': len(examples),
                   'miou': metrics.scores(matrix)['miou'],
                   'differ_pct': 100.0 * differ / max(total, 1)})
  return rows


def _label(first, variables, examples, batch: int) -> list[np.ndarray]:
  """`first`'s label maps of same-size examples, `batch` at a time (the
  last batch padded by repetition)."""
  out = []
  for start in range(0, len(examples), batch):
    chunk = examples[start:start + batch]
    padded = chunk + [chunk[-1]] * (batch - len(chunk))
    rows = max(len(e[schema.BOX_LABELS]) for e in padded)
    boxes = np.zeros((batch, rows, 4), np.float32)
    labels = np.full((batch, rows), -1, np.int32)
    for i, e in enumerate(padded):
      n = len(e[schema.BOX_LABELS])
      boxes[i, :n], labels[i, :n] = e[schema.BOXES], e[schema.BOX_LABELS]
    result = first(variables, {
        'image': np.stack([e[schema.IMAGE] for e in padded]),
        'boxes': boxes, 'box_labels': labels})
    out += list(np.asarray(result[generate.LABEL])[:len(chunk)])
  return out


def claims(rows: Sequence[dict[str, Any]], stages: int
           ) -> list[dict[str, Any]]:
  """The paper's claims, seed by seed."""
  def by_seed(table, row, stage=None):
    return {r['seed']: r['miou'] for r in rows
            if r['table'] == table and r['row'] == row
            and (stage is None or r.get('stage') == stage)
            and r['miou'] is not None}

  def claim(text, high, low):
    seeds = sorted(set(high) & set(low))
    return {'claim': text, 'holds_in': sum(high[s] > low[s] for s in seeds),
            'seeds': len(seeds),
            'difference': [round(high[s] - low[s], 2) for s in seeds]}

  last = stages
  out = [
      claim(f'val: stage {last} > stage 1 (Table 2)',
            by_seed(2, 'stagewise', last), by_seed(2, 'stagewise', 1)),
      claim(f'masks: stage {last} > stage 1 (Table 9)',
            by_seed(9, f'stage {last}'), by_seed(9, 'stage 1')),
      claim('stage-wise EM > fixed LPG, last stage (Table 2)',
            by_seed(2, 'stagewise', last), by_seed(2, 'fixed', last)),
      claim('LPG masks > box fill (Table 9)', by_seed(9, f'stage {last}'),
            by_seed(9, 'box_fill')),
      claim('LPG masks > DenseCRF masks (Table 9)',
            by_seed(9, f'stage {last}'), by_seed(9, 'dense_crf')),
      claim('overlap rate > first come (overlap images, last stage)',
            by_seed('fusion', 'overlap_rate', last),
            by_seed('fusion', 'first_come', last))]
  return out


def markdown(rows: Sequence[dict[str, Any]], stages: int) -> str:
  seeds = sorted({r['seed'] for r in rows})
  head = ('| row | paper | ' + ' | '.join(f'seed {s}' for s in seeds)
          + ' | mean ± s.d. |')
  rule = '| --- | --- | ' + ' | '.join('---' for _ in seeds) + ' | --- |'

  def line(label, paper, table, row, stage=None):
    values = {r['seed']: r['miou'] for r in rows
              if r['table'] == table and r['row'] == row
              and (stage is None or r.get('stage') == stage)
              and r['miou'] is not None}
    cells = ' | '.join(f'{values[s]:.1f}' if s in values else '–'
                       for s in seeds)
    return (f'| {label} | {paper} | {cells} | '
            f'{sweep.mean_sd_cell(values)} |')

  lines = ['# LPG on the embedded benchmark', '',
           '## Table 2 (val mIoU, test CRF)', '', head, rule]
  for schedule in ('stagewise', 'fixed'):
    for s in range(1, stages + 1):
      paper = TABLE2[schedule][s - 1] if s <= 3 else '–'
      lines.append(line(f'{schedule} stage {s}', paper, 2, schedule, s))
  lines += ['', "## Table 9 (masks' mIoU on D's training split)", '', head,
            rule]
  for s in range(1, stages + 1):
    paper = TABLE9[s - 1] if s <= 3 else '–'
    lines.append(line(f'stage {s}', paper, 9, f'stage {s}'))
  lines.append(line('box fill', '–', 9, 'box_fill'))
  lines.append(line('Box + DenseCRF', TABLE9_DENSE_CRF, 9, 'dense_crf'))
  lines += ['', '## Fusion on images with overlapping boxes of different '
            'classes (same generator outputs)', '', head, rule]
  for s in range(1, stages + 1):
    for name in ('overlap_rate', 'first_come'):
      lines.append(line(f'{name} stage {s}', '–', 'fusion', name, s))
  lines += ['', '## Claims', '', '| claim | holds in | differences |',
            '| --- | --- | --- |']
  for c in claims(rows, stages):
    lines.append(f"| {c['claim']} | {c['holds_in']}/{c['seeds']} | "
                 + ', '.join(f'{d:+.1f}' for d in c['difference']) + ' |')
  return '\n'.join(lines)


def main(argv):
  del argv
  root = os.path.join(FLAGS.out, 'lpg')
  rows, stages = [], 3
  for seed in [int(s) for s in FLAGS.seeds]:
    default_dir = os.path.join(root, f'lpg-seed{seed}')
    config = sweep.sweep_config('configs/lpg.py', '', seed,
                                list(FLAGS.override))
    stages = int(config.lpg.stages)
    results = run.train_and_evaluate(config, default_dir)
    rows += run_rows(seed, results, 'stagewise')
    rows += fusion_rows(config, default_dir, seed, FLAGS.fusion_images)
    fixed_dir = os.path.join(root, f'fixed-seed{seed}')
    sweep.copy_shared_stages(default_dir, fixed_dir, shared_stages(stages))
    fixed = run.train_and_evaluate(
        sweep.sweep_config('configs/lpg.py', 'fixed', seed,
                           list(FLAGS.override)), fixed_dir)
    rows += run_rows(seed, fixed, 'fixed')
    print(json.dumps(rows[-1]), flush=True)
  text = markdown(rows, stages)
  sweep.write_outputs(root, 'tables', text,
                      {'rows': rows, 'claims': claims(rows, stages)})
  print(text)


if __name__ == '__main__':
  _define_flags()
  app.run(main)
