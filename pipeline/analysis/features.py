"""Prompt features: what a deployed controller could see of a sequence before generating anything.

For each chosen layer j, a sequence's features are the hidden state after decoder layers 0..j-1 (Hugging
Face's `hidden_states[j]` of a forward with `output_hidden_states=True`; j = L is the final one, after the
model's final norm, what the LM head sees) at the prompt's last token (`last`) and averaged over the
prompt's tokens (`mean`), and the prompt length. Layer 1 (the always-executed first layer) is what a cheap
controller can afford; layer L is an "oracle-ish" reference point that costs a full prefill.

This module holds the files' contract and their reader (light: no torch, no Ray); `pipeline.analysis.feature_task`
computes them. Files: `features/shard=NNNNN.parquet`, one row per (sequence, layer, pooling), float32.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

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
