"""How a search scores its candidates: the pluggable step between proposals and rows.

An `Evaluator` turns chosen (sequence, program) pairs into ordinary rows of the run's table and the score
the search maximises. `GenerationEvaluator` decodes every pair of a round in one routed batch on the engine
(`generate_pairs`) and scores it like `dynoracle run` (ROUGE against the references, fidelity against the
full model's output). A task that scores answer choices by log-likelihood plugs in the same way.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable

import pyarrow as pa

from pipeline.data.adapters import Example
from pipeline.generation.configs import FULL_ID, SkipConfig
from pipeline.generation.engine import generate_pairs
from pipeline.generation.models import LoadedModel
from pipeline.generation.scoring import ScoringOptions, score
from pipeline.run.rundir import GENERATIONS_SCHEMA, shard_table


class Evaluator(ABC):
    """Scores (sequence, program) pairs. `schema` is the rows' table schema, that of the run it extends."""

    schema: pa.Schema

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
    schema = GENERATIONS_SCHEMA

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
