"""The tasks a run's rows come from (run.json `task`). Each task's rows have a folder and a schema
(`rundir.SCORED_TABLES`) and metric columns (`pipeline.analysis.metrics`); this module imports nothing, so the
metric registry stays light and the run layer does not import the analysis layer to read a run.json.
"""

from __future__ import annotations

from typing import Any, Mapping

TASKS = ("generate", "choice")


def run_task_name(record: Mapping[str, Any] | None) -> str:
    """The task whose rows a run holds (run.json `task`; runs from before it are generation runs)."""
    return (record or {}).get("task") or "generate"
