"""How a search scores its candidates: the pluggable step between proposals and rows.

An `Evaluator` turns chosen (sequence, program) pairs into ordinary rows of the run's table and the score
the search maximises. `GenerationEvaluator` decodes every pair of a round in one routed batch on the engine
(`generate_pairs`) and scores it like `dynoracle run` (ROUGE against the references, fidelity against the
full model's output). `ChoiceEvaluator` scores every pair's answer choices by teacher-forced log-likelihood
under its program in one routed pass (`choice_task.pair_choice_logliks`) and builds its rows as `ChoiceTask`
does (`choice_task.choice_row`). `EVALUATORS` maps a run's task (run.json `task`) to its evaluator.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Mapping

import pyarrow as pa

from pipeline.analysis.metrics import check_metric
from pipeline.data.adapters import Example
from pipeline.data.choice_tasks import ChoiceExample
from pipeline.generation.choice_task import choice_row, pair_choice_logliks, scored_tokens
from pipeline.generation.configs import FULL_ID, SkipConfig
from pipeline.generation.engine import generate_pairs
from pipeline.generation.models import LoadedModel
from pipeline.generation.scoring import ScoringOptions, score
from pipeline.run.rundir import CHOICES_SCHEMA, GENERATIONS_SCHEMA, shard_table
from pipeline.run.tasks import run_task_name


class Evaluator(ABC):
    """Scores (sequence, program) pairs. `folder` and `schema` are the rows' task folder and table schema, those
    of the run it extends; `default_metric` the score a search maximises unless told another."""

    folder: ClassVar[str]
    schema: ClassVar[pa.Schema]
    default_metric: ClassVar[str]

    @abstractmethod
    def tokens(self, table: pa.Table) -> int:
        """Tokens its rows generated or scored, for the progress line's tokens/s."""

    @abstractmethod
    def evaluate(self, lm: LoadedModel, shard: int, examples: list[Example], source: pa.Table,
                 pairs: list[tuple[int, SkipConfig]], metric: str,
                 on_tokens: Callable[[int], None] | None = None) -> tuple[list[float], pa.Table]:
        """(score of each pair under `metric`, one row per pair in order). `source`: the run's own rows of the
        shard (e.g. the full model's outputs); pairs index `examples`."""


@dataclass(frozen=True)
class GenerationEvaluator(Evaluator):
    """Greedy generation under the run's settings, scored as `dynoracle run` scores (GenerateTask)."""

    max_new_tokens: int
    prefill: str
    max_rows: int
    scoring: ScoringOptions = ScoringOptions()
    folder: ClassVar[str] = "generations"
    schema: ClassVar[pa.Schema] = GENERATIONS_SCHEMA
    default_metric: ClassVar[str] = "rougeL"

    def tokens(self, table: pa.Table) -> int:
        return int(table.column("gen_tokens").to_numpy().sum())

    def evaluate(self, lm: LoadedModel, shard: int, examples: list[Example], source: pa.Table,
                 pairs: list[tuple[int, SkipConfig]], metric: str,
                 on_tokens: Callable[[int], None] | None = None) -> tuple[list[float], pa.Table]:
        prompts = [list(ex.prompt_ids) for ex in examples]
        gens = generate_pairs(lm, prompts, pairs, self.max_new_tokens, self.prefill, max_rows=self.max_rows,
                              on_group_done=on_tokens)
        full = {seq: out for seq, config, out in zip(source["seq_id"].to_pylist(), source["config_id"].to_pylist(),
                                                      source["output"].to_pylist()) if config == FULL_ID}
        scores = score(outputs=[g.text for g in gens], references=[examples[i].references for i, _ in pairs],
                       full_outputs=[full[examples[i].seq_id] for i, _ in pairs],
                       summary=[examples[i].summary for i, _ in pairs], options=self.scoring)
        tables = [shard_table(shard, [examples[i]], [cfg], [[gen]], {k: [v[r]] for k, v in scores.items()})
                  for r, ((i, cfg), gen) in enumerate(zip(pairs, gens))]
        return list(scores[metric]), pa.concat_tables(tables) if tables else self.schema.empty_table()


@dataclass(frozen=True)
class ChoiceEvaluator(Evaluator):
    """Multiple choice by log-likelihood under the run's prefill, `batch_size` questions per routed pass, scored
    as `dynoracle run` scores (ChoiceTask). Default metric prob_gold: continuous, so a search can climb it where
    acc is flat."""

    prefill: str
    batch_size: int
    folder: ClassVar[str] = "choices"
    schema: ClassVar[pa.Schema] = CHOICES_SCHEMA
    default_metric: ClassVar[str] = "prob_gold"

    def tokens(self, table: pa.Table) -> int:
        return scored_tokens(table)

    def evaluate(self, lm: LoadedModel, shard: int, examples: list[Example], source: pa.Table,
                 pairs: list[tuple[int, SkipConfig]], metric: str,
                 on_tokens: Callable[[int], None] | None = None) -> tuple[list[float], pa.Table]:
        questions: list[ChoiceExample] = examples  # type: ignore[assignment]  # a choice run's examples
        logliks = pair_choice_logliks(lm, questions, pairs, self.prefill, self.batch_size)
        rows = [choice_row(questions[i], shard, cfg, values) for (i, cfg), values in zip(pairs, logliks)]
        table = pa.Table.from_pylist(rows, schema=self.schema)
        if on_tokens is not None:
            on_tokens(self.tokens(table))
        return [float(row[metric]) for row in rows], table


EVALUATORS: dict[str, type[Evaluator]] = {"generate": GenerationEvaluator, "choice": ChoiceEvaluator}


def search_metric(record: Mapping[str, Any], metric: str | None, where: str) -> str:
    """The score a search of the run `record` maximises: `metric`, or its task's evaluator's default (rougeL for
    generation, prob_gold for multiple choice). Raises ValueError (one line) for a metric the run has no column
    for (`metrics.check_metric`)."""
    return check_metric(record, metric or EVALUATORS[run_task_name(record)].default_metric, where)
