"""Hidden-state similarity to the full model: the study's evidence that layer skipping keeps the model's states
closer to the full model's than early exit does (Glavas et al. 2024, figures 1a, 4 and 5).

For each sequence of a finished run and each configuration, one teacher-forced pass over the prompt and a
response (the dataset's reference, as the study did, or the full model's own output from the run), under
the run's prefill policy. For every response token it computes the cosine similarity to the full model's
state at the same token of
- the final hidden state: the LM head's input, after the final norm, for every configuration alike; early
  exit's final state is the state after its last layer *with* the final norm applied (the study's code
  compares early exit's state without the norm against the full model's with it; here both have it);
- the hidden state after each layer l (0-based), carried through unchanged where l is skipped.

The pass runs on the engine's layer-skipping machinery: every configuration of a batch of prompts is a
row of one batch, and each decoder layer runs only on the rows that keep it (`pipeline.generation.engine`). Under
the `full` prefill the prompts run once through all layers (the engine's shared prefill) and every row's
response attends to its prompt's full-model KV; under `skip` the whole sequence runs through the kept layers.
Configurations with the same layers are computed once.

Output: the shard task `SimilarityTask` (pipeline.analysis.similarity_task) writes one row per (sequence, configuration) into
`similarity-<response>/shard=NNNNN.parquet`; `summarise` reduces those rows to
`similarity-<response>.parquet`: per configuration and layer (layer L is the final state), the mean over
tokens and sequences with a paired-bootstrap percentile interval over sequences (`pipeline.analysis.bootstrap`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa

from pipeline.analysis.bootstrap import DEFAULT_LEVEL, DEFAULT_RESAMPLES, resample_indices
from pipeline.generation.configs import FULL_ID
from pipeline.run.location import RunPath, locate

RESPONSES = ("reference", "full")

SHARD_SCHEMA = pa.schema([
    ("seq_id", pa.string()),
    ("shard", pa.int32()),
    ("config_id", pa.string()),
    ("family", pa.string()),
    ("cost", pa.int16()),
    ("tokens", pa.int32()),  # response tokens compared; 0 leaves the similarities null
    ("final_similarity", pa.float64()),  # mean over the tokens of the final (normed) state's cosine similarity
    ("layer_similarity", pa.list_(pa.float64())),  # (L,) the same after each layer
])
SUMMARY_SCHEMA = pa.schema([
    ("config_id", pa.string()),
    ("family", pa.string()),
    ("cost", pa.int16()),
    ("layer", pa.int16()),  # 0..L-1: after that layer; L: the final state, after the final norm
    ("similarity", pa.float64()),  # mean over every response token of every sequence
    ("lo", pa.float64()),
    ("hi", pa.float64()),
])


def folder_name(response: str) -> str:
    """The run folder's subfolder of shard files (and stem of the summary file) for a response kind."""
    if response not in RESPONSES:
        raise ValueError(f"unknown response {response!r}; choose from {', '.join(RESPONSES)}")
    return f"similarity-{response}"


def summarise(table: pa.Table, resamples: int = DEFAULT_RESAMPLES, seed: int = 0,
              level: float = DEFAULT_LEVEL) -> pa.Table:
    """Per configuration and layer (layer L = the final state): the token-weighted mean over all sequences of
    the per-sequence means, with a paired bootstrap percentile interval over sequences (same resamples for
    every configuration and layer). table: the shard rows (SHARD_SCHEMA), every sequence x configuration.
    """
    frame = table.select(["seq_id", "config_id", "family", "cost", "tokens", "final_similarity",
                          "layer_similarity"]).to_pandas()
    seq_codes, seq_ids = frame["seq_id"].factorize(sort=True)
    configs = frame.drop_duplicates("config_id")[["config_id", "family", "cost"]]
    configs = configs.assign(rank=configs["config_id"] != FULL_ID).sort_values(["rank", "family", "cost", "config_id"])
    cfg_codes = frame["config_id"].map({c: k for k, c in enumerate(configs["config_id"])}).to_numpy()
    num_layers = max(len(v) for v in frame["layer_similarity"] if v is not None)
    n, k = len(seq_ids), len(configs)
    weight = np.zeros((n, k))
    sums = np.zeros((n, k, num_layers + 1))  # token-weighted sums of the per-sequence means
    tokens = frame["tokens"].to_numpy(dtype=np.float64)
    values = np.zeros((len(frame), num_layers + 1))
    usable = tokens > 0
    if usable.any():  # rows without tokens keep zero weight and zero sums
        values[usable, :num_layers] = np.stack([v for v, u in zip(frame["layer_similarity"], usable) if u])
        values[usable, num_layers] = frame["final_similarity"].to_numpy(dtype=np.float64)[usable]
    weight[seq_codes, cfg_codes] = tokens
    sums[seq_codes, cfg_codes] = values * tokens[:, None]
    mean = sums.sum(0) / weight.sum(0)[:, None]  # (K, L + 1)
    counts = _resample_counts(n, resamples, seed)  # (R, N)
    draws = np.einsum("rn,nkl->rkl", counts, sums) / (counts @ weight)[..., None]
    tail = (1.0 - level) / 2.0
    lo, hi = np.quantile(draws, [tail, 1.0 - tail], axis=0)
    layer = np.tile(np.arange(num_layers + 1), k)
    return pa.table({
        "config_id": np.repeat(configs["config_id"].to_numpy(), num_layers + 1),
        "family": np.repeat(configs["family"].to_numpy(), num_layers + 1),
        "cost": np.repeat(configs["cost"].to_numpy(), num_layers + 1),
        "layer": layer,
        "similarity": mean.ravel(),
        "lo": lo.ravel(),
        "hi": hi.ravel(),
    }, schema=SUMMARY_SCHEMA)


def _resample_counts(n: int, resamples: int, seed: int) -> np.ndarray:
    """(R, N) how often each sequence appears in each resample of `resample_indices` (the same draws)."""
    indices = resample_indices(n, resamples, seed)
    offsets = indices + np.arange(resamples)[:, None] * n
    return np.bincount(offsets.ravel(), minlength=resamples * n).reshape(resamples, n).astype(np.float64)


def summary_path(run_dir: str | Path, response: str) -> RunPath:
    """Where `dynoracle similarity` writes the per configuration x layer summary of a response kind."""
    return locate(run_dir) / f"{folder_name(response)}.parquet"
