"""Per-row rounding spread of a method table measured in two rounding orders.

  python experiments/box2seg_ablation.py --seeds=0,1,2 --tag=hard
  XLA_FLAGS=--xla_force_host_platform_device_count=2 \\
      python experiments/box2seg_ablation.py --seeds=0,1,2 --tag=hard-two_devices
  python experiments/rounding_spread.py \\
      --first=experiments/out/box2seg-hard/ablation.json \\
      --second=experiments/out/box2seg-hard-two_devices/ablation.json

Reads the `rows` ([{variant, seed, val_miou, ...}]) of two sweep outputs
(`box2seg_ablation.py`'s ablation.json, `bana_tables.py`'s tables.json) made
with the same seeds in two rounding orders (experiments/stability.py explains
the orders), and prints, per variant, the mean ± s.d. over seeds in each and
the rounding spread: the largest |difference| between the two orders over the
seeds both ran.  Writes the table next to `--first` as rounding_spread.md.
"""

from __future__ import annotations

import json
import os
import statistics
from typing import Any, Sequence

from absl import app, flags

_FIRST = flags.DEFINE_string('first', None, 'Sweep JSON, first order.')
_SECOND = flags.DEFINE_string('second', None, 'Sweep JSON, second order.')
_KEY = flags.DEFINE_string('key', 'val_miou', 'Row field to compare.')
_ROWS = flags.DEFINE_string(
    'rows', 'rows', "The JSON list of rows: 'rows', or 'label_rows' "
    "(bana_tables.py's Table 1 over seeds, with --key=miou).")


def _mean_sd(values: Sequence[float]) -> str:
  if not values:
    return '–'
  sd = f' ± {statistics.stdev(values):.2f}' if len(values) > 1 else ''
  return f'{statistics.mean(values):.2f}{sd}'


def spread_rows(first: Sequence[dict[str, Any]],
                second: Sequence[dict[str, Any]],
                key: str = 'val_miou') -> list[dict[str, Any]]:
  """[{variant, first: [values], second: [values], seeds: [paired seeds],
  spread: max |first - second| over paired seeds (None if none)}], in the
  first sweep's variant order."""
  def by_variant(rows):
    table: dict[str, dict[int, float]] = {}
    for row in rows:
      if row.get(key) is not None:
        table.setdefault(row['variant'], {})[int(row['seed'])] = row[key]
    return table
  a, b = by_variant(first), by_variant(second)
  out = []
  for variant, values in a.items():
    other = b.get(variant, {})
    seeds = sorted(set(values) & set(other))
    out.append(dict(
        variant=variant, seeds=seeds,
        first=[values[s] for s in sorted(values)],
        second=[other[s] for s in sorted(other)],
        spread=(max(abs(values[s] - other[s]) for s in seeds)
                if seeds else None)))
  return out


def markdown(rows: Sequence[dict[str, Any]], key: str) -> str:
  """The table; 'all runs' pools both orders (seeds x orders runs)."""
  lines = [f'| variant | {key}, first order | second order | all runs | '
           'rounding spread | paired seeds |',
           '| --- | --- | --- | --- | --- | --- |']
  for row in rows:
    spread = '–' if row['spread'] is None else f"{row['spread']:.2f}"
    lines.append(f"| {row['variant']} | {_mean_sd(row['first'])} | "
                 f"{_mean_sd(row['second'])} | "
                 f"{_mean_sd(row['first'] + row['second'])} | {spread} | "
                 f"{', '.join(str(s) for s in row['seeds'])} |")
  return '\n'.join(lines)


def main(argv):
  del argv
  with open(_FIRST.value) as f:
    first = json.load(f)[_ROWS.value]
  with open(_SECOND.value) as f:
    second = json.load(f)[_ROWS.value]
  table = markdown(spread_rows(first, second, _KEY.value), _KEY.value)
  print(table)
  name = 'rounding_spread' + ('' if _ROWS.value == 'rows'
                               else f'_{_ROWS.value}')
  with open(os.path.join(os.path.dirname(_FIRST.value), f'{name}.md'),
            'w') as f:
    f.write(table + '\n')


if __name__ == '__main__':
  flags.mark_flags_as_required(['first', 'second'])
  app.run(main)
