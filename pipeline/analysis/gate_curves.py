"""The per-token gates' cost-quality curves: per gate set and metric, mean score and mean cost (layers run per
decode token) over sequences with percentile bootstrap intervals. Pure functions over the gate study's rows
(`gates_task`), and the reader `report` uses."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa

from pipeline.analysis.bootstrap import DEFAULT_LEVEL, DEFAULT_RESAMPLES, resample_indices
from pipeline.generation.scoring import SCORE_COLUMNS
from pipeline.run.location import RunPath, locate, read_parquet

FOLDER = "gates"  # per (sequence, gate set) rows, one file per shard
SUMMARY = "gates.parquet"
SHARD_SCHEMA = pa.schema([
    ("seq_id", pa.string()),
    ("shard", pa.int32()),
    ("gates", pa.string()),  # <input>-lambda<value>
    ("gate_input", pa.string()),  # hidden | fixed
    ("lam", pa.float64()),
    ("kv", pa.string()),
    ("cost", pa.float64()),  # layers run per decode token; NaN for a one-token output
    ("layers_per_token", pa.float64()),  # the engine's accounting: the prefill's first token at L layers
    ("gen_tokens", pa.int32()),
    ("finish_reason", pa.string()),
    ("output", pa.string()),
    *((name, pa.float64()) for name in SCORE_COLUMNS),
])
SUMMARY_SCHEMA = pa.schema([
    ("gates", pa.string()), ("gate_input", pa.string()), ("lam", pa.float64()), ("kv", pa.string()),
    ("metric", pa.string()), ("sequences", pa.int32()),
    ("mean", pa.float64()), ("mean_lo", pa.float64()), ("mean_hi", pa.float64()),
    ("cost", pa.float64()), ("cost_lo", pa.float64()), ("cost_hi", pa.float64()),
])


def summarise(table: pd.DataFrame, resamples: int = DEFAULT_RESAMPLES, seed: int = 0,
              level: float = DEFAULT_LEVEL) -> pd.DataFrame:
    """Per gate set and metric: mean score and mean cost over sequences with percentile bootstrap intervals
    (the same resampled sequences for both; a one-token output's NaN cost is left out of the cost mean)."""
    tail = (1 - level) / 2
    out = []
    for (name, gate_input, lam, kv), group in table.groupby(["gates", "gate_input", "lam", "kv"], sort=True):
        group = group.sort_values("seq_id")
        idx = resample_indices(len(group), resamples, seed)
        cost = group["cost"].to_numpy(float)
        cost_draws = np.nanmean(cost[idx], axis=1)
        for metric in SCORE_COLUMNS:
            values = group[metric].to_numpy(float)
            draws = values[idx].mean(1)
            out.append({"gates": name, "gate_input": gate_input, "lam": lam, "kv": kv, "metric": metric,
                        "sequences": len(group), "mean": values.mean(),
                        "mean_lo": np.quantile(draws, tail), "mean_hi": np.quantile(draws, 1 - tail),
                        "cost": np.nanmean(cost), "cost_lo": np.nanquantile(cost_draws, tail),
                        "cost_hi": np.nanquantile(cost_draws, 1 - tail)})
    return pd.DataFrame(out, columns=SUMMARY_SCHEMA.names)


def read_gates(run_dir: str | RunPath, metric: str) -> pd.DataFrame | None:
    """`gates.parquet`'s rows for `metric` (checksums verified), or None when the run has no gate study."""
    path = locate(run_dir) / SUMMARY
    if not path.is_file():
        return None
    frame = read_parquet(path).to_pandas()
    return frame[frame["metric"] == metric].reset_index(drop=True)
