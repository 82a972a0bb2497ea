"""The multiple-choice task: one shard of questions -> per (question, configuration) its choices' log-likelihoods
and lm-evaluation-harness's metrics. `dynoracle run` executes it for the multiple-choice datasets
(`pipeline.data.choice_tasks`); its files are `choices/shard=NNNNN.parquet` (`rundir.CHOICES_SCHEMA`).
No generation: every log-likelihood is teacher-forced on the engine's routed layers (`loglik`), for every layer
program (repeats and reorderings too). `pair_choice_logliks` and `choice_row` serve the per-sequence search
(`pipeline.search.evaluate.ChoiceEvaluator`), whose rows are built as this task builds its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ClassVar

import numpy as np
import pyarrow as pa

from pipeline.data.choice_tasks import ChoiceExample
from pipeline.generation.configs import SkipConfig
from pipeline.generation.loglik import continuation_logliks, pair_logliks
from pipeline.generation.models import LoadedModel
from pipeline.run.rundir import CHOICES_SCHEMA
from pipeline.run.shard_task import ShardTask


def choice_metrics(logliks: np.ndarray, chars: np.ndarray, num_bytes: np.ndarray, gold: int) -> dict[str, float]:
    """lm-eval 0.4.13's multiple-choice metrics (`ConfigurableTask.process_results`) of one question.

    logliks, chars, num_bytes: (C,) per choice: summed log-likelihood, len() of the choice string, its UTF-8
    bytes. pred = argmax loglik, pred_norm = argmax loglik / chars, pred_bytes = argmax loglik / bytes (numpy's
    argmax: the first maximum on ties); acc, acc_norm, acc_bytes = 1.0 when they are `gold`, else 0.0;
    prob_gold = softmax(logliks)[gold].
    """
    logliks = np.asarray(logliks, dtype=np.float64)
    pred = int(np.argmax(logliks))
    pred_norm = int(np.argmax(logliks / np.asarray(chars, dtype=np.float64)))
    pred_bytes = int(np.argmax(logliks / np.asarray(num_bytes, dtype=np.float64)))
    weights = np.exp(logliks - logliks.max())
    return {"pred": pred, "pred_norm": pred_norm, "acc": float(pred == gold), "acc_norm": float(pred_norm == gold),
            "acc_bytes": float(pred_bytes == gold), "prob_gold": float(weights[gold] / weights.sum())}


def context_groups(ex: ChoiceExample) -> list[tuple[list[int], list[list[int]], list[int]]]:
    """One group per distinct context of a question (all its choices but WinoGrande's share one): (context ids,
    the continuation ids of its choices, those choices' indices)."""
    groups = []
    for ctx in dict.fromkeys(ctx for ctx, _ in ex.requests):
        picks = [t for t, (c, _) in enumerate(ex.requests) if c == ctx]
        groups.append((list(ctx), [list(ex.requests[t][1]) for t in picks], picks))
    return groups


def choice_row(ex: ChoiceExample, shard: int, cfg: SkipConfig, logliks: np.ndarray) -> dict:
    """The CHOICES_SCHEMA row of one (question, configuration): `logliks` (C,) its choices' summed
    log-likelihoods in nats, then lm-eval's metrics of them (`choice_metrics`)."""
    chars = np.array([len(c) for c in ex.choices])
    num_bytes = np.array([len(c.encode("utf-8")) for c in ex.choices])
    return {"seq_id": ex.seq_id, "shard": shard, "config_id": cfg.config_id, "family": cfg.family,
            "cost": cfg.cost, "prompt_tokens": ex.prompt_tokens, "gold": ex.gold,
            "loglik": np.asarray(logliks).tolist(),
            "choice_tokens": [len(cont) for _, cont in ex.requests], "choice_chars": chars.tolist(),
            "choice_bytes": num_bytes.tolist(), **choice_metrics(logliks, chars, num_bytes, ex.gold),
            "layers_per_token": float(cfg.cost)}


def scored_tokens(table: pa.Table) -> int:
    """The choice tokens a table of choice rows scored (every configuration's), for the progress line."""
    return sum(sum(tokens) for tokens in table.column("choice_tokens").to_pylist())


@dataclass(frozen=True)
class ChoiceTask(ShardTask):
    """Score every choice of every question under every configuration, `batch_size` questions per routed pass.

    Choices that share a context (all but WinoGrande's) are scored in one row per configuration."""

    configs: tuple[SkipConfig, ...]
    prefill: str
    batch_size: int

    folder: ClassVar[str] = "choices"
    schema: ClassVar[pa.Schema] = CHOICES_SCHEMA
    key_columns: ClassVar[tuple[str, ...]] = ("seq_id", "config_id")

    def expected_keys(self, examples: list[ChoiceExample]) -> set[tuple]:  # type: ignore[override]
        return {(ex.seq_id, cfg.config_id) for ex in examples for cfg in self.configs}

    def tokens(self, table: pa.Table) -> int:
        """Scored choice tokens (every configuration's), for the progress line's tokens/s."""
        return scored_tokens(table)

    def run(self, lm: LoadedModel, shard: int, examples: list[ChoiceExample],  # type: ignore[override]
            on_tokens: Callable[[int], None] | None = None) -> pa.Table:
        sets = list(dict.fromkeys(cfg.layers for cfg in self.configs))
        logliks = [np.empty((len(sets), len(ex.requests))) for ex in examples]
        for start in range(0, len(examples), self.batch_size):
            batch = examples[start : start + self.batch_size]
            groups, where = [], []  # one group per distinct context of a question: (question, its choices)
            for i, ex in enumerate(batch):
                for ctx, conts, picks in context_groups(ex):
                    groups.append((ctx, conts))
                    where.append((start + i, picks))
            for (i, picks), values in zip(where, continuation_logliks(lm, groups, sets, self.prefill)):
                logliks[i][:, picks] = values
        column = {s: u for u, s in enumerate(sets)}
        rows = [choice_row(ex, shard, cfg, values[column[cfg.layers]]) for ex, values in zip(examples, logliks)
                for cfg in self.configs]
        return pa.Table.from_pylist(rows, schema=CHOICES_SCHEMA)


def pair_choice_logliks(lm: LoadedModel, examples: list[ChoiceExample], pairs: list[tuple[int, SkipConfig]],
                        prefill: str, batch_size: int) -> list[np.ndarray]:
    """Every choice's summed log-likelihood (C,) of chosen (question index, configuration) pairs, not the cross
    product: result[r] is pair r's, the questions of `batch_size` of them per routed pass (`loglik.pair_logliks`)."""
    out: list[np.ndarray] = [np.empty(0)] * len(pairs)
    for start in range(0, len(examples), batch_size):
        chosen = [r for r, (i, _) in enumerate(pairs) if start <= i < start + batch_size]
        groups, span = [], {}  # question -> its groups' range
        for i in sorted({pairs[r][0] for r in chosen}):
            start_of = len(groups)
            groups += context_groups(examples[i])
            span[i] = range(start_of, len(groups))
        rows, where = [], []
        for r in chosen:
            i, cfg = pairs[r]
            out[r] = np.empty(len(examples[i].requests))
            for g in span[i]:
                rows.append((g, cfg.layers))
                where.append((r, groups[g][2]))
        values = pair_logliks(lm, [(ctx, conts) for ctx, conts, _ in groups], rows, prefill) if rows else []
        for (r, picks), value in zip(where, values):
            out[r][picks] = value
    return out
