"""What a method hands to the runner: its stages and where its results are."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from wsss_jax.stages import Stage


@dataclasses.dataclass(frozen=True)
class MethodPipeline:
  """A method's stages plus the names the report and results.json need.

  Attributes:
    stages: run in order by `wsss_jax.stages.run_stages`.
    eval_stage: the stage whose results are the final validation scores.
    train_stages: stages whose results hold a training 'history' (plots).
    pseudo_stage: the stage whose results hold the 'quality' of the
      pseudo-masks the final network trained on (None: no pseudo-masks).
    pseudo_folder: that label folder, relative to the workdir.
    pseudo_quality_key: when that stage scores several folders
      ('quality' = {name: scores}), the one `pseudo_folder` holds.
    extra_results: optional `(results by stage name) -> dict`, stored under
      results.json[method] (method-specific numbers).
    report_section: optional `(workdir) -> list of markdown lines` appended
      to report.md (method-specific figures); may write images under
      `<workdir>/report/`.
  """
  stages: list[Stage]
  eval_stage: str
  train_stages: tuple[str, ...]
  pseudo_stage: str | None = None
  pseudo_folder: str | None = None
  pseudo_quality_key: str | None = None
  extra_results: Callable[[dict[str, Any]], dict[str, Any]] | None = None
  report_section: Callable[[str], list[str]] | None = None
