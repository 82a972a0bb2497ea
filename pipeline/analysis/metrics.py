"""The metric registry: which score columns a run's scored rows carry, by task, and which one readers default to.

Every task writes "scored rows", one per (sequence, configuration), in its own folder (`rundir.SCORED_TABLES`):
generation rows (`generations/`) and multiple-choice rows (`choices/`). Their metric columns depend on the
task; `reduce --metric`, `query`, `report` and `controller` take any metric the run has, checked here. A new
metric column is one `register(...)` line beside the code that writes it; a run may also name extra metric
columns of its own in run.json (`"metrics": [...]`, e.g. a user's scorer).

0/1 metrics (`binary`) make ties the rule: when several configurations answer a question right, the
oracle gives it the cheapest of them (the hull walk takes a more expensive point only for a strictly higher
score), and the least budget matching the full model is decided exactly (`math.fsum`, see the README).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from pipeline.run.tasks import TASKS, run_task_name


@dataclass(frozen=True)
class Metric:
    name: str
    task: str  # which task's rows carry it (TASKS)
    binary: bool  # 0/1 per row
    description: str


REGISTRY: dict[str, Metric] = {}


def register(name: str, task: str, description: str, binary: bool = False) -> Metric:
    """Add a metric column of `task`'s scored rows (its first registered metric is the task's default)."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose from {', '.join(TASKS)}")
    REGISTRY[name] = Metric(name, task, binary, description)
    return REGISTRY[name]


register("rougeL", "generate", "ROUGE-L F-measure against the reference")
register("rougeLsum", "generate", "summary-level ROUGE-L (one sentence per line)")
register("rouge1", "generate", "ROUGE-1 F-measure")
register("rouge2", "generate", "ROUGE-2 F-measure")
register("fidelity", "generate", "ROUGE-L against the full model's output")
register("acc", "choice", "1 when the choice of highest log-likelihood is right (lm-eval's acc)", binary=True)
register("acc_norm", "choice", "1 when the choice of highest log-likelihood per character is right "
                               "(lm-eval 0.4.13's acc_norm: len() of the choice string)", binary=True)
register("acc_bytes", "choice", "1 when the choice of highest log-likelihood per UTF-8 byte is right "
                                "(lm-eval's acc_bytes)", binary=True)
register("prob_gold", "choice", "softmax probability of the right choice over the choices' log-likelihoods")


def run_metrics(record: Mapping[str, Any] | None) -> list[str]:
    """Every metric column of a run: its task's registered metrics, then the run's own (run.json
    `metric_columns`)."""
    task = run_task_name(record)
    own = [m for m in (record or {}).get("metric_columns") or [] if isinstance(m, str)]
    return list(dict.fromkeys([*(m.name for m in REGISTRY.values() if m.task == task), *own]))


def check_metric(record: Mapping[str, Any] | None, metric: str | None, where: str) -> str:
    """`metric`, or the run's default when None; ValueError in one line when the run `where` has no such column."""
    names = run_metrics(record)
    if record is None:  # no run here: the reader's own check of the folder says so
        return metric or names[0]
    if metric is None:
        return names[0]
    if metric not in names:
        raise ValueError(f"unknown metric {metric!r} for {where} (a {run_task_name(record)} run); "
                         f"choose from {', '.join(names)}")
    return metric
