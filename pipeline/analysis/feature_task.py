"""`dynoracle features RUN`: the prompt-feature shard task (contract in `pipeline.analysis.features`).

A shard task on the run's executor (`runner.run_task`): one prefill per sequence, with the run's own model
and dtype, over the run's own shards, resumably.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar

import numpy as np
import pyarrow as pa
import torch

from pipeline.analysis.features import FEATURES_FOLDER, FEATURES_SCHEMA, POOLINGS, check_layers, default_layers
from pipeline.data.adapters import Example
from pipeline.generation.models import LoadedModel
from pipeline.run.shard_task import ExecSummary, ShardTask
from pipeline.run.job import JobSpec
from pipeline.run.runner import run_task


def prompt_features(lm: LoadedModel, prompt_ids: list[int] | tuple[int, ...],
                    layers: tuple[int, ...]) -> dict[tuple[int, str], np.ndarray]:
    """One prefill of one prompt: {(layer, pooling): (hidden size,) float32} for every layer and pooling.

    Runs the decoder stack alone (no LM head), unpadded and without a KV cache, so the states are those
    of a plain Hugging Face forward of this prompt.
    """
    ids = torch.tensor([list(prompt_ids)], dtype=torch.long, device=lm.device)
    with torch.inference_mode():
        states = lm.model.get_decoder()(input_ids=ids, output_hidden_states=True, use_cache=False).hidden_states
    out = {}
    for j in layers:
        h = states[j][0].float()  # (prompt tokens, hidden size)
        out[(j, "last")] = h[-1].cpu().numpy()
        out[(j, "mean")] = h.mean(dim=0).cpu().numpy()
    return out


@dataclass(frozen=True)
class FeatureTask(ShardTask):
    """Prompt features of every example of a shard (see the module docstring)."""

    layers: tuple[int, ...]

    folder: ClassVar[str] = FEATURES_FOLDER
    schema: ClassVar[pa.Schema] = FEATURES_SCHEMA
    key_columns: ClassVar[tuple[str, ...]] = ("seq_id", "layer", "pooling")

    def expected_keys(self, examples: list[Example]) -> set[tuple]:
        return {(ex.seq_id, j, p) for ex in examples for j in self.layers for p in POOLINGS}

    def run(self, lm: LoadedModel, shard: int, examples: list[Example],
            on_tokens: Callable[[int], None] | None = None) -> pa.Table:
        rows: dict[str, list[Any]] = {name: [] for name in FEATURES_SCHEMA.names}
        for ex in examples:
            for (j, pooling), vector in prompt_features(lm, ex.prompt_ids, self.layers).items():
                for name, value in (("seq_id", ex.seq_id), ("shard", shard), ("layer", j), ("pooling", pooling),
                                    ("prompt_tokens", ex.prompt_tokens), ("hidden", vector)):
                    rows[name].append(value)
        return pa.Table.from_pydict(rows, schema=FEATURES_SCHEMA)


def run_features(run_dir: str | Path, layers: tuple[int, ...] | list[int] = (), workers: int | None = None,
                 address: str | None = None) -> ExecSummary:
    """Compute the features of every shard of a finished run whose features file is missing or invalid.

    `layers` empty means `default_layers`. Shard files holding other layers are recomputed whole.
    """
    def make_task(spec: JobSpec, record: dict[str, Any]) -> FeatureTask:
        num_layers = int(record["num_layers"])
        return FeatureTask(check_layers(layers, num_layers) if layers else default_layers(num_layers))

    return run_task(run_dir, make_task, address, workers)
