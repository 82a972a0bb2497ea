"""Prompt features: what a deployed controller could see of a sequence before generating anything.

`dynoracle features RUN` is a shard task on the run's executor (`runner.run_task`): one prefill per
sequence, with the run's own model and dtype, over the run's own shards, resumably. For each chosen layer
j it stores the hidden state after decoder layers 0..j-1 (Hugging Face's `hidden_states[j]` of a forward
with `output_hidden_states=True`; j = L is the final one, after the model's final norm, what the LM head
sees) at the prompt's last token (`last`) and averaged over the prompt's tokens (`mean`), with the prompt
length. Layer 1 (the always-executed first layer) is what a cheap controller can afford; layer L is an
"oracle-ish" reference point that costs a full prefill.

Files: `features/shard=NNNNN.parquet`, one row per (sequence, layer, pooling), the vector as float32.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from pipeline.data import Example
from pipeline.executor import ExecSummary, ShardTask
from pipeline.job import JobSpec
from pipeline.models import LoadedModel

POOLINGS = ("last", "mean")
FEATURES_FOLDER = "features"
FEATURES_SCHEMA = pa.schema([
    ("seq_id", pa.string()),
    ("shard", pa.int32()),
    ("layer", pa.int16()),  # hidden_states index: after `layer` decoder layers; L = final (after the final norm)
    ("pooling", pa.string()),  # last (the prompt's last token) or mean (over the prompt's tokens)
    ("prompt_tokens", pa.int32()),
    ("hidden", pa.list_(pa.float32())),  # (hidden size,)
])


def default_layers(num_layers: int) -> tuple[int, ...]:
    """The first layer (deployable: every configuration runs it) and the final one (the reference point)."""
    return tuple(sorted({1, num_layers}))


def check_layers(layers: tuple[int, ...] | list[int], num_layers: int) -> tuple[int, ...]:
    """Sorted, deduplicated layers; ValueError for one outside 1..L."""
    bad = [j for j in layers if not 1 <= j <= num_layers]
    if bad:
        raise ValueError(f"feature layer {bad[0]} is outside 1..{num_layers} (the model's layers)")
    return tuple(sorted(set(layers)))


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

    def run(self, lm: LoadedModel, shard: int, examples: list[Example]) -> pa.Table:
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
    from pipeline.runner import run_task

    def make_task(spec: JobSpec, record: dict[str, Any]) -> FeatureTask:
        num_layers = int(record["num_layers"])
        return FeatureTask(check_layers(layers, num_layers) if layers else default_layers(num_layers))

    return run_task(run_dir, make_task, address, workers)


def load_features(run_dir: str | Path, seq_ids: np.ndarray, layer: int) -> np.ndarray:
    """The controller's input for one layer: [last, mean, log prompt length] per sequence, (N, 2H + 1) float64.

    Rows follow `seq_ids`. FileNotFoundError / ValueError (one line) when the run has no features, or none
    of this layer for some sequence.
    """
    folder = Path(run_dir) / FEATURES_FOLDER
    files = sorted(folder.glob("shard=*.parquet"))
    if not files:
        raise FileNotFoundError(f"no prompt features in {folder}; run `dynoracle features {run_dir}` first")
    table = pa.concat_tables([pq.read_table(p, filters=[("layer", "=", layer)]) for p in files])
    frame = table.to_pandas().set_index(["seq_id", "pooling"])
    wanted = [str(s) for s in seq_ids]
    blocks = []
    for pooling in POOLINGS:
        index = [(s, pooling) for s in wanted]
        missing = [s for s, key in zip(wanted, index) if key not in frame.index]
        if missing:
            raise ValueError(f"{len(missing)} sequences (e.g. {missing[0]}) have no layer-{layer} features in "
                             f"{folder}; run `dynoracle features {run_dir} --layer {layer}`")
        blocks.append(np.stack(frame.loc[index, "hidden"].to_numpy()))
    length = np.log(frame.loc[[(s, POOLINGS[0]) for s in wanted], "prompt_tokens"].to_numpy(dtype=np.float64))
    return np.hstack([*blocks, length[:, None]]).astype(np.float64)


def stored_layers(run_dir: str | Path) -> list[int]:
    """Layers with features in the run folder (any sequence), ascending."""
    files = sorted((Path(run_dir) / FEATURES_FOLDER).glob("shard=*.parquet"))
    return sorted({int(j) for p in files for j in pq.read_table(p, columns=["layer"]).column("layer").to_pylist()})
