"""The multiple-choice task: one shard of questions -> per (question, configuration) its choices' log-likelihoods
and lm-evaluation-harness's metrics. `dynoracle run` executes it for the multiple-choice datasets
(`pipeline.data.choice_tasks`); its files are `choices/shard=NNNNN.parquet` (`rundir.CHOICES_SCHEMA`).
No generation: every log-likelihood is teacher-forced on the engine's routed layers (`loglik`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ClassVar

import numpy as np
import pyarrow as pa

from pipeline.data.choice_tasks import ChoiceExample
from pipeline.generation.configs import SkipConfig
from pipeline.generation.loglik import continuation_logliks
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
        return sum(sum(tokens) for tokens in table.column("choice_tokens").to_pylist())

    def run(self, lm: LoadedModel, shard: int, examples: list[ChoiceExample],  # type: ignore[override]
            on_tokens: Callable[[int], None] | None = None) -> pa.Table:
        sets = list(dict.fromkeys(cfg.layers for cfg in self.configs))
        logliks = [np.empty((len(sets), len(ex.requests))) for ex in examples]
        for start in range(0, len(examples), self.batch_size):
            batch = examples[start : start + self.batch_size]
            groups, where = [], []  # one group per distinct context of a question: (question, its choices)
            for i, ex in enumerate(batch):
                contexts = list(dict.fromkeys(ctx for ctx, _ in ex.requests))
                for ctx in contexts:
                    picks = [t for t, (c, _) in enumerate(ex.requests) if c == ctx]
                    groups.append((list(ctx), [list(ex.requests[t][1]) for t in picks]))
                    where.append((start + i, picks))
            for (i, picks), values in zip(where, continuation_logliks(lm, groups, sets, self.prefill)):
                logliks[i][:, picks] = values
        column = {s: u for u, s in enumerate(sets)}
        rows = []
        for ex, values in zip(examples, logliks):
            chars = np.array([len(c) for c in ex.choices])
            num_bytes = np.array([len(c.encode("utf-8")) for c in ex.choices])
            tokens = [len(cont) for _, cont in ex.requests]
            for cfg in self.configs:
                lls = values[column[cfg.layers]]
                rows.append({"seq_id": ex.seq_id, "shard": shard, "config_id": cfg.config_id, "family": cfg.family,
                             "cost": cfg.cost, "prompt_tokens": ex.prompt_tokens, "gold": ex.gold,
                             "loglik": lls.tolist(), "choice_tokens": tokens, "choice_chars": chars.tolist(),
                             "choice_bytes": num_bytes.tolist(), **choice_metrics(lls, chars, num_bytes, ex.gold),
                             "layers_per_token": float(cfg.cost)})
        return pa.Table.from_pylist(rows, schema=CHOICES_SCHEMA)
