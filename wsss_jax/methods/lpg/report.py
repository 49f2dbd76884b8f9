"""LPG's section of report.md: the EM curve on D (the shape of Tables 2
and 9) and the references."""

from __future__ import annotations

from typing import Any, Mapping


def _number(value: Any, digits: int = 1) -> str:
  return '–' if value is None else f'{float(value):.{digits}f}'


def report_section(results: Mapping[str, Any]) -> list[str]:
  """Markdown lines: per deployment stage the masks' and f's mIoU, the box
  fill and Box + DenseCRF references, the auxiliary EM's masks."""
  lpg = results.get('lpg') or {}
  lines = ['## LPG', '']
  refs = lpg.get('references') or {}
  lines += [f"Fusion `{lpg.get('fusion')}`, schedule `{lpg.get('schedule')}`"
            f", stage-1 input `{lpg.get('round1_input')}`.", '',
            '| stage | generator | masks mIoU (train) | val mIoU (CRF) | '
            'without CRF | images over the class slots |',
            '| --- | --- | --- | --- | --- | --- |']
  for row in lpg.get('stages') or []:
    lines.append(
        f"| {row['stage']} | g_{row.get('generator')} | "
        f"{_number(row.get('pseudo_miou'))} | {_number(row.get('val_miou'))} "
        f"| {_number(row.get('val_miou_without_crf'))} | "
        f"{row.get('truncated_images', '–')} |")
  lines += ['', f"References on the same images: box fill "
            f"{_number(refs.get('box_fill'))}, Box + DenseCRF "
            f"{_number(refs.get('dense_crf'))}.", '']
  aux = lpg.get('aux') or []
  if aux:
    lines += ['EM on the auxiliary set (masks mIoU on its training split): '
              f"box fill {_number(lpg.get('aux_box_fill'))}, " + ', '.join(
                  f"g_{row['stage']} {_number(row.get('pseudo_miou'))}"
                  for row in aux) + '.', '']
  return lines
