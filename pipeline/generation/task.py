"""The generation task: one shard of examples -> its scored rows, for every configuration (DESIGN.md).

This is the shard task `dynoracle run` executes; its files are `generations/shard=NNNNN.parquet`, one row
per (sequence, configuration) in the Parquet contract's columns.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, ClassVar

import pyarrow as pa

from pipeline.data.adapters import Example
from pipeline.generation.answer_scoring import AnswerScoring
from pipeline.generation.checkpoints import model_groups
from pipeline.generation.configs import FULL_ID, SAMPLE, SkipConfig
from pipeline.generation.engine import Generation, generate
from pipeline.generation.models import LoadedModel
from pipeline.generation.sampling import Sampling, row_seed
from pipeline.generation.scoring import ScoringOptions, score
from pipeline.generation.stops import StopStrings, cut_at_stops
from pipeline.run.shard_task import ShardTask
from pipeline.run.rundir import generations_schema, shard_table


@dataclass(frozen=True)
class GenerateTask(ShardTask):
    """Generate every example under every configuration, then score against references and `full`.

    A configuration named in `checkpoints` runs on that model (loaded once per worker process), the
    others on the worker's model; each model's configurations are decoded together, the greedy ones in
    one engine call and the `sample` family's in another (each row seeded by `row_seed`). `answers` adds
    stop strings (a row stops once its text holds one, and is cut there: finish_reason "stop") and the
    task's metric columns (exact match, an lm_eval task's metrics, a user scorer) beside ROUGE.
    """

    configs: tuple[SkipConfig, ...]
    max_new_tokens: int
    prefill: str
    batch_size: int
    max_rows: int
    scoring: ScoringOptions = ScoringOptions()
    checkpoints: tuple[tuple[str, str], ...] = ()  # (config id, model) pairs of the job's checkpoint table
    answers: AnswerScoring = AnswerScoring()
    sampling: Sampling = Sampling()  # how the `sample` family's configurations decode (the others are greedy)

    folder: ClassVar[str] = "generations"
    key_columns: ClassVar[tuple[str, ...]] = ("seq_id", "config_id")

    @property
    def schema(self) -> pa.Schema:  # type: ignore[override]  # the run's metric columns decide it
        return generations_schema(self.answers.columns)

    def expected_keys(self, examples: list[Example]) -> set[tuple]:
        return {(ex.seq_id, cfg.config_id) for ex in examples for cfg in self.configs}

    def tokens(self, table: pa.Table) -> int:
        return int(table.column("gen_tokens").to_numpy().sum())

    def run(self, lm: LoadedModel, shard: int, examples: list[Example],
            on_tokens: Callable[[int], None] | None = None) -> pa.Table:
        configs = list(self.configs)
        # Batches of similar prompt length waste less compute on left padding; the order is deterministic.
        order = sorted(range(len(examples)), key=lambda i: (examples[i].prompt_tokens, i))
        generations: list[list[Generation]] = [[] for _ in examples]
        groups = model_groups(lm, dict(self.checkpoints), configs)  # configurations sharing weights
        stop = StopStrings(lm.tokenizer, self.answers.stop) if self.answers.stop else None
        for start in range(0, len(order), self.batch_size):
            batch = order[start : start + self.batch_size]
            prompts = [list(examples[i].prompt_ids) for i in batch]
            per_prompt: list[list[Generation | None]] = [[None] * len(configs) for _ in batch]
            for model, group in groups:
                sampled = [k for k in group if configs[k].family == SAMPLE]
                for indices, settings in (([k for k in group if k not in sampled], {}), (sampled, self._sample(
                        [examples[i].seq_id for i in batch], [configs[k] for k in sampled]))):
                    if not indices:
                        continue
                    outputs = generate(model, prompts, [configs[k] for k in indices], self.max_new_tokens,
                                       prefill=self.prefill, max_rows=self.max_rows, on_group_done=on_tokens,
                                       stop=stop, **settings)
                    for row, per_config in zip(per_prompt, outputs):
                        for k, gen in zip(indices, per_config):
                            row[k] = gen
            for i, row in zip(batch, per_prompt):
                generations[i] = [self._cut(gen) for gen in row]
        full = next(k for k, cfg in enumerate(configs) if cfg.config_id == FULL_ID)
        scores = score(
            outputs=[gen.text for per_config in generations for gen in per_config],
            references=[ex.references for ex in examples for _ in configs],
            full_outputs=[per_config[full].text for per_config in generations for _ in configs],
            summary=[ex.summary for ex in examples for _ in configs],
            options=self.scoring,
        )
        scores.update(self.answers.score(examples, [[gen.text for gen in per_config] for per_config in generations],
                                         [cfg.config_id for cfg in configs]))
        return shard_table(shard, examples, configs, generations, scores, self.answers.columns)

    def _cut(self, gen: Generation) -> Generation:
        """The output before its first stop string (finish_reason "stop" when there was one)."""
        text, found = cut_at_stops(gen.text, self.answers.stop)
        return replace(gen, text=text, finish_reason="stop") if found else gen

    def _sample(self, seq_ids: list[str], configs: list[SkipConfig]) -> dict:
        """The engine's sampling arguments for these sequences under these `sample` configurations."""
        seeds = [[row_seed(self.sampling.seed, seq_id, cfg.config_id) for cfg in configs] for seq_id in seq_ids]
        return {"temperature": self.sampling.temperature, "top_p": self.sampling.top_p, "seeds": seeds}
