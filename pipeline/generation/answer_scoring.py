"""What a generation run scores besides ROUGE: stop strings, and the metric columns of its task.

One home for the generation rows' task-dependent metric columns (until the metric registry holds them):
- `gsm8k`: exact match under lm-evaluation-harness's two filters (`exact_match.EXACT_MATCH_COLUMNS`);
- `lm_eval:NAME`: every (filter, metric) of the task, computed by lm-eval itself on the workers;
- a user scorer (`module:function`): its own columns.
The plan is resolved on the driver (`plan_answers`), recorded in run.json (`answers`, part of the run's
identity, and `metric_columns`), and carried by the generation task to the workers.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from pipeline.data.adapters import DatasetSpec, Example
from pipeline.generation.exact_match import EXACT_MATCH_COLUMNS, GSM8K_UNTIL, gsm8k_exact_match
from pipeline.generation.scoring import SCORE_COLUMNS
from pipeline.generation.user_scorer import ScorerError, call_scorer, load_scorer, scorer_columns


@dataclass(frozen=True)
class AnswerScoring:
    """Stop strings and metric columns of a generation run; the default is a plain ROUGE run."""

    stop: tuple[str, ...] = ()
    exact_match: bool = False  # gsm8k's strict-match and flexible-extract exact match
    lm_eval_task: str | None = None  # score with this lm-eval task's filters and metrics
    scorer: str | None = None  # module:function
    columns: tuple[str, ...] = ()  # the metric columns all of the above add, in order

    def record(self) -> dict[str, Any]:
        """As run.json stores it (lists, not tuples), so that a resume compares equal."""
        return {key: list(value) if isinstance(value, tuple) else value for key, value in asdict(self).items()}

    def score(self, examples: Sequence[Example], outputs: Sequence[Sequence[str]],
              config_ids: Sequence[str]) -> dict[str, list[float]]:
        """Every column for outputs[i][k] (example i, configuration k), flat example-major."""
        columns: dict[str, list[float]] = {}
        flat = [out for per_config in outputs for out in per_config]
        if self.exact_match:
            columns.update(gsm8k_exact_match(flat, [ex.reference for ex in examples for _ in config_ids]))
        if self.lm_eval_task:
            from pipeline.data.lm_eval_tasks import lm_eval_scores

            columns.update(lm_eval_scores(self.lm_eval_task, [ex.row for ex in examples], outputs))
        if self.scorer:
            function = load_scorer(self.scorer)
            names = [c for c in self.columns if c not in columns]
            columns.update({name: [] for name in names})
            for ex, per_config in zip(examples, outputs):
                row = json.loads(ex.row or "{}")
                for config_id, out in zip(config_ids, per_config):
                    where = f"row {ex.seq_id} (config {config_id})"
                    values = call_scorer(function, self.scorer, out, ex.reference, row, where)
                    if sorted(values) != sorted(names):
                        raise ScorerError(f"scorer {self.scorer} returned {', '.join(values)} on {where}, "
                                          f"not its columns {', '.join(names)}")
                    for name in names:
                        columns[name].append(values[name])
        return {name: columns[name] for name in self.columns}


def plan_answers(dataset: DatasetSpec, scorer: str | None, stop: Sequence[str], examples: Sequence[Example]
                 ) -> AnswerScoring:
    """The run's plan: the job's stop strings, else its task's (gsm8k's, an lm_eval task's `until`); its columns.

    Raises ValueError (one line) for a scorer that cannot be imported, fails on the first row, or names a
    column the run already has.
    """
    exact = dataset.name == "gsm8k"
    columns: tuple[str, ...] = EXACT_MATCH_COLUMNS if exact else ()
    task_stop: tuple[str, ...] = GSM8K_UNTIL if exact else ()
    task = dataset.task if dataset.name == "lm_eval" else None
    if task:
        from pipeline.data.lm_eval_tasks import lm_eval_columns, lm_eval_until

        columns, task_stop = lm_eval_columns(task), lm_eval_until(task)
    if scorer:
        first = examples[0]
        columns += scorer_columns(scorer, first.reference, first.row, first.seq_id, (*SCORE_COLUMNS, *columns))
    return AnswerScoring(tuple(stop) or task_stop, exact, task, scorer, columns)
