"""The reducer: from a run's generations to the oracle frontier, allocations and minimal matching budget.

The I/O edge around `pipeline.analysis.oracle`: reads `generations/*.parquet` and `configs.parquet`, pivots one
metric into the sequences x configurations matrix, and writes `oracle/<name>/{frontier.parquet,
allocations.parquet, config_means.parquet, summary.json}` (columns as in DESIGN.md, plus the bootstrap
intervals of pipeline.analysis.bootstrap; the report reads them), where <name> is the metric plus the
options that differ from their defaults (`pipeline.analysis.result_key`). It reads only the
run's own shard files, verified (`pipeline.run.verify`). Everything is checked and computed before the first
file is written, and the folder of three files is replaced as a set, whole or not at all.
The run folder may be a path or an object-store URI (`pipeline.run.location`; there the set is
replaced as closely as an object store allows, see `atomic.replace_folder`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from pipeline.analysis.bootstrap import DEFAULT_LEVEL, DEFAULT_RESAMPLES, BootstrapDraws, bootstrap_oracle
from pipeline.analysis.oracle import Frontier, allocate, build_frontier, min_budget_to_match
from pipeline.analysis.result_key import oracle_name
from pipeline.generation.configs import FULL_ID, KNOWN_FAMILIES
from pipeline.run.atomic import replace_folder, write_json, write_parquet
from pipeline.run.location import RunPath, locate, read_parquet
from pipeline.run.verify import verify_run

METRICS = ("rougeL", "rougeLsum", "rouge1", "rouge2", "fidelity")
COST_MODES = ("nominal", "measured")
GRID_STEP = 0.25  # layers between grid budgets: fine enough to plot the frontier

SHARES_TYPE = pa.list_(pa.struct([("config_id", pa.string()), ("share", pa.float64())]))
FRONTIER_SCHEMA = pa.schema(
    [
        ("budget", pa.float64()),
        ("value", pa.float64()),
        ("value_lo", pa.float64()),  # bootstrap percentile interval of `value`; null without bootstrap
        ("value_hi", pa.float64()),
        ("lp_bound", pa.float64()),
        ("gap", pa.float64()),
        ("kind", pa.string()),
        ("shares", SHARES_TYPE),
    ]
)
ALLOCATIONS_SCHEMA = pa.schema([("budget", pa.float64()), ("seq_id", pa.string()), ("config_id", pa.string())])
CONFIG_MEANS_SCHEMA = pa.schema([("config_id", pa.string()), ("family", pa.string()), ("cost", pa.float64()),
                                 ("mean", pa.float64()), ("mean_lo", pa.float64()), ("mean_hi", pa.float64())])


@dataclass(frozen=True)
class FrontierRow:
    """One budget of frontier.parquet; shares lists only configurations that some sequence uses."""

    budget: float
    value: float
    lp_bound: float
    gap: float
    kind: str  # "grid", "requested" or "match_full"
    shares: list[tuple[str, float]]
    value_lo: float | None = None  # bootstrap interval of `value`
    value_hi: float | None = None


@dataclass(frozen=True)
class ReduceResult:
    out_dir: RunPath
    summary: dict
    rows: list[FrontierRow]


@dataclass(frozen=True)
class Matrix:
    """One metric pivoted to sequences x configurations, with each configuration's cost."""

    seq_ids: np.ndarray  # (N,) str
    config_ids: list[str]  # (K,), `full` first
    config_families: list[str]  # (K,) family of each configuration
    families: list[str]
    scores: np.ndarray  # (N, K)
    costs: np.ndarray  # (K,)
    num_layers: int  # nominal depth L (cost of `full` in configs.parquet)


def reduce_run(
    run_dir: str | RunPath,
    metric: str = "rougeL",
    families: tuple[str, ...] | list[str] | None = None,
    budgets: tuple[float, ...] | list[float] = (),
    match_full: bool = True,
    cost: str = "nominal",
    tolerance: float = 0.0,
    partial: bool = False,
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
    level: float = DEFAULT_LEVEL,
) -> ReduceResult:
    """Solve the oracle for one metric of a run and write its four files; returns what was written.

    `resamples` > 0 adds paired-bootstrap percentile intervals at `level` (pipeline.analysis.bootstrap, seeded by
    `seed`) to every configuration's mean, each frontier value, the full mean and the matching budget.

    `partial` allows a run with shard files missing (still running or interrupted): the oracle is then over
    the sequences present, and summary["missing_shards"] says how many shard files were absent.
    """
    if metric not in METRICS:
        raise ValueError(f"unknown metric '{metric}'; choose from {', '.join(METRICS)}")
    if cost not in COST_MODES:
        raise ValueError(f"unknown cost mode '{cost}'; choose from {', '.join(COST_MODES)}")
    if not (math.isfinite(tolerance) and tolerance >= 0):
        raise ValueError(f"tolerance must be a finite number >= 0, got {tolerance}")
    if resamples < 0:
        raise ValueError(f"bootstrap resamples must be >= 0 (0 turns it off), got {resamples}")
    if resamples and not 0.0 < level < 1.0:
        raise ValueError(f"confidence level must lie strictly between 0 and 1, got {level}")
    run_dir = locate(run_dir)
    matrix, missing = load_matrix(run_dir, metric, families, cost, partial)
    frontier = build_frontier(matrix.scores, matrix.costs)
    full_mean = float(matrix.scores[:, 0].mean())
    full_cost = float(matrix.costs[0])

    requested = list(dict.fromkeys(float(b) for b in budgets))  # once each, in the order asked
    for b in requested:
        if not math.isfinite(b):
            raise ValueError(f"budget {b} is not a finite number")
    match = min_budget_to_match(frontier, matrix.scores[:, 0], tolerance) if match_full else None  # exact at ties

    planned = [(b, "grid") for b in budget_grid(frontier.min_budget, float(matrix.costs.max()))]
    planned += [(b, "requested") for b in requested]
    planned += [(match, "match_full")] if match is not None else []
    planned.sort(key=lambda item: item[0])  # stable: equal budgets keep grid, requested, match_full order
    rows = [frontier_row(frontier, matrix.config_ids, b, kind) for b, kind in planned]
    draws = None
    if resamples:
        draws = bootstrap_oracle(matrix.scores, matrix.costs, np.array([r.budget for r in rows]), resamples, seed,
                                 level, match is not None, tolerance)
        bounds = draws.interval(draws.values)
        rows = [replace(r, value_lo=float(lo), value_hi=float(hi)) for r, (lo, hi) in zip(rows, bounds)]

    integers = [float(b) for b in range(1, matrix.num_layers + 1) if b >= frontier.min_budget]
    allocation_budgets = sorted({*requested, *integers, *([match] if match is not None else [])})
    name = oracle_name(metric, families, run_families(run_dir), cost)  # the folder: what this oracle is over
    summary = {
        "metric": metric,
        "result": name,
        "families": matrix.families,
        "cost_mode": cost,
        "num_sequences": int(matrix.scores.shape[0]),
        "num_configs": int(matrix.scores.shape[1]),
        "num_layers": full_cost,
        "full_mean": full_mean,
        "match_full": match_full,
        "min_budget_to_match": match,
        "min_budget_fraction": None if match is None else match / full_cost,
        "tolerance": tolerance,
        "missing_shards": missing,
        "bootstrap": None if draws is None else {"resamples": resamples, "seed": seed, "level": level},
        "full_mean_interval": None if draws is None else _pair(draws.interval(draws.config_means[:, 0])),
        "min_budget_interval": None if draws is None or draws.match is None else _pair(draws.interval(draws.match)),
        "budgets": [
            {"budget": r.budget, "value": r.value, "value_lo": r.value_lo, "value_hi": r.value_hi,
             "lp_bound": r.lp_bound, "gap": r.gap}
            for r in rows
            if r.kind == "requested"
        ],
    }
    tables = {
        "frontier.parquet": frontier_table(rows),
        "allocations.parquet": allocations_table(frontier, matrix, allocation_budgets),
        "config_means.parquet": config_means_table(matrix, draws),
    }

    def write(folder: Path) -> None:
        for name, table in tables.items():
            write_parquet(table, folder / name)
        write_json(summary, folder / "summary.json")

    out_dir = run_dir / "oracle" / name
    replace_folder(out_dir, write)
    return ReduceResult(out_dir, summary, rows)


def run_families(run_dir: RunPath) -> list[str]:
    """The families a run's configs.parquet lists (`full` included)."""
    return read_parquet(run_dir / "configs.parquet", columns=["family"]).column("family").unique().to_pylist()


def _pair(bounds: np.ndarray) -> list[float]:
    return [float(bounds[0]), float(bounds[1])]


def load_matrix(run_dir: RunPath, metric: str, families: tuple[str, ...] | list[str] | None, cost: str,
                partial: bool = False) -> tuple[Matrix, int]:
    """Read configs and the verified generations, keep `full` plus the chosen families, pivot one metric to N x K.

    Also returns how many shard files are missing (0 unless `partial`).
    """
    run = verify_run(run_dir, partial)
    configs_path, shards = run_dir / "configs.parquet", run.shards

    configs = read_parquet(configs_path, columns=["config_id", "family", "cost"]).to_pandas()
    present = [f for f in KNOWN_FAMILIES if f in set(configs["family"])]
    chosen = present if families is None else [f for f in families if f != FULL_ID]
    unknown = sorted(set(chosen) - set(KNOWN_FAMILIES))
    if unknown:
        raise ValueError(f"unknown family {', '.join(unknown)}; choose from {', '.join(KNOWN_FAMILIES)}")
    absent = [f for f in chosen if f not in present]
    if absent:
        raise ValueError(f"this run has no configurations of family {', '.join(absent)}")
    full = configs[configs["config_id"] == FULL_ID]
    if len(full) != 1:
        raise ValueError(f"{configs_path} must list the '{FULL_ID}' configuration exactly once")
    selected = pd.concat([full, configs[configs["family"].isin(chosen)]])
    config_ids = selected["config_id"].tolist()

    wanted = ["seq_id", "config_id", metric, "gen_tokens", "layers_per_token"]
    gens = pa.concat_tables([read_parquet(p, columns=wanted) for p in shards]).to_pandas()
    gens = gens[gens["config_id"].isin(config_ids)]
    seq_codes, seq_ids = pd.factorize(gens["seq_id"].astype(str), sort=True)
    cfg_codes = pd.Categorical(gens["config_id"], categories=config_ids).codes.astype(np.intp)
    n, k = len(seq_ids), len(config_ids)
    if n == 0:
        raise ValueError(f"no generations of the selected configurations in {run_dir / 'generations'}")
    cell = seq_codes * k + cfg_codes
    counts = np.bincount(cell, minlength=n * k)
    if (counts > 1).any():
        raise ValueError(
            f"{int((counts > 1).sum())} of {n} x {k} (sequence, configuration) pairs appear more than once"
        )
    if (counts == 0).any():
        raise ValueError(f"{int((counts == 0).sum())} of {n} x {k} (sequence, configuration) pairs are missing")
    values = gens[metric].to_numpy(dtype=np.float64, na_value=np.nan)
    if np.isnan(values).any():
        raise ValueError(f"{int(np.isnan(values).sum())} generations have no {metric} score")
    scores = np.empty(n * k)
    scores[cell] = values

    if cost == "nominal":
        costs = selected["cost"].to_numpy(dtype=np.float64)
    else:
        costs = measured_costs(gens, cfg_codes, k)
    return Matrix(
        seq_ids=np.asarray(seq_ids, dtype=object),
        config_ids=config_ids,
        config_families=selected["family"].tolist(),
        families=[FULL_ID, *chosen],
        scores=scores.reshape(n, k),
        costs=costs,
        num_layers=int(full["cost"].iloc[0]),
    ), len(run.missing)


def measured_costs(gens: pd.DataFrame, cfg_codes: np.ndarray, k: int) -> np.ndarray:
    """Mean executed layers per generated token of each configuration, over all its tokens."""
    per_token = gens["layers_per_token"].to_numpy(dtype=np.float64, na_value=np.nan)
    tokens = gens["gen_tokens"].to_numpy(dtype=np.float64, na_value=np.nan)
    if np.isnan(per_token).any() or np.isnan(tokens).any():
        raise ValueError("measured cost needs layers_per_token and gen_tokens on every generation")
    weight = np.bincount(cfg_codes, weights=tokens, minlength=k)
    weighted = np.bincount(cfg_codes, weights=per_token * tokens, minlength=k)
    plain = np.bincount(cfg_codes, weights=per_token, minlength=k) / np.bincount(cfg_codes, minlength=k)
    return np.where(weight > 0, weighted / np.where(weight > 0, weight, 1.0), plain)


def budget_grid(cheapest: float, dearest: float) -> list[float]:
    """Budgets every GRID_STEP layers from the cheapest configuration's cost up to the dearest's."""
    steps = int(math.floor((dearest - cheapest) / GRID_STEP + 1e-9))
    grid = [cheapest + GRID_STEP * i for i in range(steps + 1)]
    return grid + ([dearest] if grid[-1] < dearest else [])


def frontier_row(frontier: Frontier, config_ids: list[str], budget: float, kind: str) -> FrontierRow:
    a = allocate(frontier, budget)
    shares = [(config_ids[i], float(a.shares[i])) for i in np.flatnonzero(a.shares)]
    return FrontierRow(a.budget, a.value, a.lp_bound, a.gap, kind, shares)


def frontier_table(rows: list[FrontierRow]) -> pa.Table:
    return pa.table(
        {
            "budget": [r.budget for r in rows],
            "value": [r.value for r in rows],
            "value_lo": [r.value_lo for r in rows],
            "value_hi": [r.value_hi for r in rows],
            "lp_bound": [r.lp_bound for r in rows],
            "gap": [r.gap for r in rows],
            "kind": [r.kind for r in rows],
            "shares": [[{"config_id": c, "share": s} for c, s in r.shares] for r in rows],
        },
        schema=FRONTIER_SCHEMA,
    )


def config_means_table(matrix: Matrix, draws: BootstrapDraws | None) -> pa.Table:
    """Each configuration's mean score with its bootstrap interval (null without bootstrap), `full` first."""
    k = len(matrix.config_ids)
    bounds = np.full((k, 2), np.nan) if draws is None else draws.interval(draws.config_means)
    return pa.table(
        {
            "config_id": matrix.config_ids,
            "family": matrix.config_families,
            "cost": matrix.costs,
            "mean": matrix.scores.mean(axis=0),
            "mean_lo": pa.array(bounds[:, 0], from_pandas=True),
            "mean_hi": pa.array(bounds[:, 1], from_pandas=True),
        },
        schema=CONFIG_MEANS_SCHEMA,
    )


def allocations_table(frontier: Frontier, matrix: Matrix, budgets: list[float]) -> pa.Table:
    """Every sequence's configuration at each budget, one row per (budget, sequence)."""
    n = len(matrix.seq_ids)
    ids = np.asarray(matrix.config_ids, dtype=object)
    choices = [allocate(frontier, b).choice for b in budgets]
    return pa.table(
        {
            "budget": np.repeat(np.asarray(budgets, dtype=np.float64), n),
            "seq_id": np.tile(matrix.seq_ids, len(budgets)),
            "config_id": ids[np.concatenate(choices)] if choices else np.zeros(0, dtype=object),
        },
        schema=ALLOCATIONS_SCHEMA,
    )
