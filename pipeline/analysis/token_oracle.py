"""The per-token oracle: for every generated token, the cheapest configuration of each family that would have
produced it. Pure functions over arrays; the teacher-forced passes are `token_oracle_task`'s.

Definition (DESIGN.md, per-token decisions): teacher-forced on the full model's own output r_1..r_n, at every
token r_t (t >= 2; r_1 is the prefill's, the full model's under either policy of the per-sequence oracle's
nominal costs) a configuration *matches* when its greedy next token, computed with the full model's states for
every earlier token (the prompt and r_1..r_{t-1}: their K/V in every layer are the full model's), equals the
full model's. The token's cost in a family is the least cost among the family's matching configurations, the
full model (cost L) always matching. This is an optimistic bound on any per-token controller: a real decoder
that skipped layers at earlier tokens would attend to its own, different states, and the oracle sees the answer.

LayerSkip (Elhoushi et al., 2024) reports a per-token early-exit oracle of 23.45 of 32 layers on Llama2-7B: the
earliest exit whose prediction equals the last layer's, per token, averaged. Early exit with the full model's
states for earlier tokens is exactly this family `ee` here (an exit at layer c uses the full model's K/V of
layers < c, which earlier tokens computed anyway).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa

from pipeline.analysis.bootstrap import DEFAULT_LEVEL, DEFAULT_RESAMPLES, resample_indices
from pipeline.run.location import RunPath, read_parquet

FOLDER = "token-oracle"  # per (sequence, token, family) rows, one file per shard
SUMMARY = "token-oracle.parquet"  # per family: mean cost per token with its interval
POSITIONS = "token-oracle-positions.parquet"  # per family and position bucket
SHARD_SCHEMA = pa.schema([
    ("seq_id", pa.string()),
    ("shard", pa.int32()),
    ("position", pa.int32()),  # index of the generated token (1 = the second; 0, the prefill's, is no decision)
    ("token", pa.int64()),  # the full model's greedy token there (teacher-forced)
    ("family", pa.string()),
    ("cost", pa.int16()),  # least cost of a matching configuration of the family (L when only `full` matches)
    ("config_id", pa.string()),  # that configuration
    ("num_layers", pa.int16()),
])


def cheapest_matching(matches: np.ndarray, costs: np.ndarray, families: np.ndarray, family_names: list[str],
                      num_layers: int) -> np.ndarray:
    """Per token and family, the least cost of a matching configuration (the full model's L when none does).

    matches: (T, K) bool, token t's greedy token under configuration k equals the full model's; costs: (K,)
    layers; families: (K,) each configuration's family. Returns (T, F) float in family_names' order.
    """
    matches, costs, families = np.asarray(matches, bool), np.asarray(costs, float), np.asarray(families)
    out = np.full((matches.shape[0], len(family_names)), float(num_layers))
    for f, family in enumerate(family_names):
        in_family = families == family
        priced = np.where(matches[:, in_family], costs[in_family][None, :], np.inf)
        if priced.shape[1]:
            out[:, f] = np.minimum(priced.min(1), num_layers)
    return out


def summarise(tokens: pd.DataFrame, resamples: int = DEFAULT_RESAMPLES, seed: int = 0,
              level: float = DEFAULT_LEVEL) -> pd.DataFrame:
    """Per family: mean cost per token over all tokens (each sequence weighted by its token count), with a
    percentile bootstrap interval over sequences, and the number of sequences and tokens.

    tokens: rows of `token_oracle_task.SHARD_SCHEMA` (seq_id, family, cost, ...)."""
    tail = (1 - level) / 2
    out = []
    for family, group in tokens.groupby("family", sort=True):
        per_seq = group.groupby("seq_id")["cost"].agg(["sum", "count"])
        sums, counts = per_seq["sum"].to_numpy(float), per_seq["count"].to_numpy(float)
        idx = resample_indices(len(per_seq), resamples, seed)
        draws = sums[idx].sum(1) / counts[idx].sum(1)
        out.append({"family": family, "sequences": len(per_seq), "tokens": int(counts.sum()),
                    "mean_cost": sums.sum() / counts.sum(), "mean_cost_lo": float(np.quantile(draws, tail)),
                    "mean_cost_hi": float(np.quantile(draws, 1 - tail))})
    return pd.DataFrame(out)


def by_position(tokens: pd.DataFrame, bins: int = 8) -> pd.DataFrame:
    """Per family and position bucket (equal-width buckets of the token index): tokens, mean cost, and the
    shares of tokens at cost 1 and at the full depth."""
    top = int(tokens["position"].max()) + 1
    edges = np.linspace(0, top, bins + 1).round().astype(int)
    frame = tokens.assign(bucket=np.searchsorted(edges, tokens["position"].to_numpy(), side="right") - 1)
    num_layers = tokens["num_layers"].iloc[0]
    grouped = frame.groupby(["family", "bucket"])
    table = grouped["cost"].agg(tokens="count", mean_cost="mean").reset_index()
    table["share_one_layer"] = grouped["cost"].apply(lambda c: float((c <= 1).mean())).to_numpy()
    table["share_full"] = grouped["cost"].apply(lambda c: float((c >= num_layers).mean())).to_numpy()
    table["first_position"] = edges[table["bucket"]]
    table["last_position"] = edges[table["bucket"] + 1] - 1
    return table


def read_token_oracle(run_dir: RunPath) -> tuple[pd.DataFrame, pd.DataFrame] | None:
    """The per-token oracle's two summary tables (checksums verified), or None when it has not run."""
    if not (run_dir / SUMMARY).is_file() or not (run_dir / POSITIONS).is_file():
        return None
    return read_parquet(run_dir / SUMMARY).to_pandas(), read_parquet(run_dir / POSITIONS).to_pandas()
