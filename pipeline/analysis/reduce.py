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
from pipeline.analysis.metrics import REGISTRY, check_metric
from pipeline.analysis.costs import total_cost
from pipeline.analysis.degenerate import DEFAULT_MODE, apply_mode, degenerate_flags
from pipeline.analysis.noise_ceiling import best_of_k, ceiling_summary
from pipeline.analysis.oracle import Frontier, allocate, build_frontier, min_budget_to_match
from pipeline.analysis.oracle_null import DEFAULT_DRAWS, NullDraws, oracle_null
from pipeline.analysis.result_key import check_oracle_options, oracle_name
from pipeline.analysis.shares import cola_shares, null_shares
from pipeline.analysis.small_sample import reduce_warning
from pipeline.generation.configs import FULL_ID, KNOWN_FAMILIES, SAMPLE
from pipeline.run.atomic import replace_folder, write_json, write_parquet
from pipeline.run.location import RunPath, locate, read_parquet
from pipeline.run.rundir import RunDir
from pipeline.run.verify import verify_run

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
NULL_SCHEMA = pa.schema([("budget", pa.float64()), ("value", pa.float64()), ("value_lo", pa.float64()),
                         ("value_hi", pa.float64())])  # the oracle on the null: median and percentile interval
DEGENERATE_SCHEMA = pa.schema([("seq_id", pa.string()), ("config_id", pa.string()), ("degenerate", pa.bool_())])
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
    null: np.ndarray | None = None  # (len(rows), 3) the null's median, lower and upper bound at each row's budget


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
    metric: str | None = None,
    families: tuple[str, ...] | list[str] | None = None,
    budgets: tuple[float, ...] | list[float] = (),
    match_full: bool = True,
    cost: str = "nominal",
    tolerance: float = 0.0,
    partial: bool = False,
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
    level: float = DEFAULT_LEVEL,
    degenerate: str = DEFAULT_MODE,
    null_draws: int = DEFAULT_DRAWS,
) -> ReduceResult:
    """Solve the oracle for one metric of a run (None: its task's first, rougeL or acc) and write its files;
    returns what was written.

    `degenerate` (keep, zero, exclude; `pipeline.analysis.degenerate`) decides what degenerate rows score.
    `null_draws` > 0 adds the residual-permutation null (`pipeline.analysis.oracle_null`, seeded by `seed`)
    at every budget: `null.parquet` and summary["oracle_null"]. A run with a `sample` family gets the full
    model's noise ceiling (summary["noise_ceiling"], `pipeline.analysis.noise_ceiling`). `cost`: nominal
    (executed layers per generated token after the first), measured (executed layers per generated token,
    as run) or total (layer-tokens per sequence, prompt pass included, `pipeline.analysis.costs`).

    For a 0/1 metric (acc, acc_norm, ...) the summary also holds CoLa's two shares (`shares.cola_shares`, at most
    half the layers for `shorter`) with their intervals, and the same under the permutation null
    (`shares.null_shares`, 200 permutations), as `cola_shares`.

    `resamples` > 0 adds paired-bootstrap percentile intervals at `level` (pipeline.analysis.bootstrap, seeded by
    `seed`) to every configuration's mean, each frontier value, the full mean and the matching budget.

    `partial` allows a run with shard files missing (still running or interrupted): the oracle is then over
    the sequences present, and summary["missing_shards"] says how many shard files were absent.
    """
    run_dir = locate(run_dir)
    metric = check_metric(RunDir(run_dir).read_run_json(), metric, run_dir)
    check_oracle_options(cost, degenerate)
    if not (math.isfinite(tolerance) and tolerance >= 0):
        raise ValueError(f"tolerance must be a finite number >= 0, got {tolerance}")
    if resamples < 0:
        raise ValueError(f"bootstrap resamples must be >= 0 (0 turns it off), got {resamples}")
    if resamples and not 0.0 < level < 1.0:
        raise ValueError(f"confidence level must lie strictly between 0 and 1, got {level}")
    if null_draws < 0:
        raise ValueError(f"null draws must be >= 0 (0 turns the null off), got {null_draws}")
    run_dir = locate(run_dir)
    matrix, missing = load_matrix(run_dir, metric, families, cost, partial)
    side = load_side_rows(run_dir, matrix, metric, partial)
    matrix = replace(matrix, scores=apply_mode(matrix.scores, side.degenerate, degenerate, reference=0),
                     costs=side.total.mean(axis=0) if cost == "total" else matrix.costs)
    samples = None if side.samples is None else apply_mode(side.samples, side.sample_degenerate, degenerate)
    frontier = build_frontier(matrix.scores, matrix.costs)
    full_mean = float(matrix.scores[:, 0].mean())
    full_cost = float(matrix.costs[0])

    requested = list(dict.fromkeys(float(b) for b in budgets))  # once each, in the order asked
    for b in requested:
        if not math.isfinite(b):
            raise ValueError(f"budget {b} is not a finite number")
    match = min_budget_to_match(frontier, matrix.scores[:, 0], tolerance) if match_full else None  # exact at ties

    planned = [(b, "grid") for b in budget_grid(frontier.min_budget, float(matrix.costs.max()),
                                                GRID_STEP * float(matrix.costs[0]) / matrix.num_layers)]
    planned += [(b, "requested") for b in requested]
    planned += [(match, "match_full")] if match is not None else []
    planned.sort(key=lambda item: item[0])  # stable: equal budgets keep grid, requested, match_full order
    rows = [frontier_row(frontier, matrix.config_ids, b, kind) for b, kind in planned]
    draws = None
    if resamples:
        draws = bootstrap_oracle(matrix.scores, matrix.costs, np.array([r.budget for r in rows]), resamples, seed,
                                 level, match is not None, tolerance,
                                 None if samples is None else best_of_k(samples)[None, :])
        bounds = draws.interval(draws.values)
        rows = [replace(r, value_lo=float(lo), value_hi=float(hi)) for r, (lo, hi) in zip(rows, bounds)]

    integers = [float(b) for b in range(1, matrix.num_layers + 1) if b >= frontier.min_budget]
    allocation_budgets = sorted({*requested, *integers, *([match] if match is not None else [])})
    name = oracle_name(metric, families, run_families(run_dir), cost, degenerate)  # the folder: what this oracle is over
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
    if REGISTRY.get(metric) is not None and REGISTRY[metric].binary:
        half = full_cost / 2
        summary["cola_shares"] = {
            "max_cost": half,
            "real": cola_shares(matrix.scores > 0.5, matrix.costs, 0, half, resamples or DEFAULT_RESAMPLES, seed,
                                level).as_dict(),
            "null": null_shares(matrix.scores > 0.5, matrix.costs, 0, half, seed=seed, level=level),
        }
    null = None
    binary = bool(np.isin(matrix.scores, (0.0, 1.0)).all())  # acc, exact match: the null's draws stay 0/1
    if null_draws:
        null = oracle_null(matrix.scores, matrix.costs, np.array([r.budget for r in rows]), null_draws, seed, level,
                           match is not None, tolerance, binary)
    summary |= {
        "degenerate": degenerate_summary(frontier, side, degenerate, match),
        "total_cost": total_cost_summary(frontier, side, match),
        "noise_ceiling": None if samples is None else noise_ceiling_summary(frontier, matrix, rows, samples, draws,
                                                                            match_full, tolerance, resamples, seed,
                                                                            level),
        "oracle_null": None if null is None else null_summary(null, rows, null_draws, seed, binary),
    }
    summary["warning"] = reduce_warning(summary["num_sequences"], full_cost, summary["min_budget_interval"],
                                        side.empty_share)
    tables = {
        "frontier.parquet": frontier_table(rows),
        "allocations.parquet": allocations_table(frontier, matrix, allocation_budgets),
        "config_means.parquet": config_means_table(matrix, draws),
        "degenerate.parquet": side.table,
        **({} if null is None else {"null.parquet": null_table(rows, null)}),
    }

    def write(folder: Path) -> None:
        for name, table in tables.items():
            write_parquet(table, folder / name)
        write_json(summary, folder / "summary.json")

    out_dir = run_dir / "oracle" / name
    replace_folder(out_dir, write)
    return ReduceResult(out_dir, summary, rows, None if null is None else null.value_summary())


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
    metric = check_metric(run.record, metric, run_dir)
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

    wanted = ["seq_id", "config_id", metric, "layers_per_token", *(["gen_tokens"] if run.table == "generations" else [])]
    gens = pa.concat_tables([read_parquet(p, columns=wanted) for p in shards]).to_pandas()
    gens = gens[gens["config_id"].isin(config_ids)]
    seq_codes, seq_ids = pd.factorize(gens["seq_id"].astype(str), sort=True)
    cfg_codes = pd.Categorical(gens["config_id"], categories=config_ids).codes.astype(np.intp)
    n, k = len(seq_ids), len(config_ids)
    if n == 0:
        raise ValueError(f"no rows of the selected configurations in {run_dir / run.table}")
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
        raise ValueError(f"{int(np.isnan(values).sum())} rows of {run_dir / run.table} have no {metric} score")
    scores = np.empty(n * k)
    scores[cell] = values

    if cost != "measured":  # total: replaced by reduce_run from the side rows
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
    """Mean executed layers per generated token of each configuration, over all its tokens (rows without
    `gen_tokens`, such as multiple-choice rows, weigh equally)."""
    per_token = gens["layers_per_token"].to_numpy(dtype=np.float64, na_value=np.nan)
    tokens = (gens["gen_tokens"] if "gen_tokens" in gens else pd.Series(1.0, index=gens.index)).to_numpy(
        dtype=np.float64, na_value=np.nan)
    if np.isnan(per_token).any() or np.isnan(tokens).any():
        raise ValueError("measured cost needs layers_per_token and gen_tokens on every generation")
    weight = np.bincount(cfg_codes, weights=tokens, minlength=k)
    weighted = np.bincount(cfg_codes, weights=per_token * tokens, minlength=k)
    plain = np.bincount(cfg_codes, weights=per_token, minlength=k) / np.bincount(cfg_codes, minlength=k)
    return np.where(weight > 0, weighted / np.where(weight > 0, weight, 1.0), plain)


def budget_grid(cheapest: float, dearest: float, step: float = GRID_STEP) -> list[float]:
    """Budgets every `step` (GRID_STEP layers, scaled to the cost unit) from the cheapest cost up to the dearest."""
    steps = int(math.floor((dearest - cheapest) / step + 1e-9))
    grid = [cheapest + step * i for i in range(steps + 1)]
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


@dataclass(frozen=True)
class SideRows:
    """What the reducer reads beside the score matrix, aligned with it: degenerate flags, total cost per row
    and the `sample` family's scores (the noise ceiling)."""

    degenerate: np.ndarray  # (N, K) bool, the rule of pipeline.analysis.degenerate
    total: np.ndarray  # (N, K) layer-tokens per sequence (pipeline.analysis.costs)
    samples: np.ndarray | None  # (N, S) the metric of sample-0 .. sample-{S-1}; None without a sample family
    sample_degenerate: np.ndarray | None  # (N, S)
    table: pa.Table  # degenerate.parquet: every row of the run (samples included), seq_id, config_id, degenerate
    empty_share: float  # share of the matrix's rows with an empty (whitespace) output


def load_side_rows(run_dir: RunPath, matrix: Matrix, metric: str, partial: bool = False) -> SideRows:
    """Read outputs, token counts and the `sample` rows of the verified run, aligned with `matrix`.

    A multiple-choice run has no outputs (nothing is degenerate or empty, there are no samples); its rows'
    decode steps are the choices' tokens after the first of each (teacher-forced), for the total cost."""
    run = verify_run(run_dir, partial)
    prefill = (run.record.get("job") or {}).get("prefill", "full")
    if run.table == "generations":
        columns = ["seq_id", "config_id", "family", "cost", "output", "prompt_tokens", "gen_tokens", metric]
        gens = pa.concat_tables([read_parquet(p, columns=columns) for p in run.shards]).to_pandas()
    else:
        columns = ["seq_id", "config_id", "family", "cost", "prompt_tokens", "choice_tokens", metric]
        gens = pa.concat_tables([read_parquet(p, columns=columns) for p in run.shards]).to_pandas()
        gens["output"] = "(choice)"  # never degenerate, never empty
        gens["gen_tokens"] = [1 + sum(n - 1 for n in tokens) for tokens in gens.pop("choice_tokens")]
    gens["seq_id"] = gens["seq_id"].astype(str)
    gens = gens[gens["seq_id"].isin(set(matrix.seq_ids))]
    flags = degenerate_flags(gens["output"].tolist())
    table = pa.table({"seq_id": gens["seq_id"].tolist(), "config_id": gens["config_id"].tolist(),
                      "degenerate": flags}, schema=DEGENERATE_SCHEMA)
    row = pd.Index(matrix.seq_ids).get_indexer(gens["seq_id"])
    totals = total_cost(gens["prompt_tokens"].to_numpy(), gens["gen_tokens"].to_numpy(), gens["cost"].to_numpy(),
                        matrix.num_layers, prefill)
    n, k = matrix.scores.shape
    col = pd.Index(matrix.config_ids).get_indexer(gens["config_id"])
    mine = col >= 0
    degenerate, total = np.zeros((n, k), dtype=bool), np.zeros((n, k))
    degenerate[row[mine], col[mine]], total[row[mine], col[mine]] = flags[mine], totals[mine]
    empty = np.zeros((n, k), dtype=bool)
    empty[row[mine], col[mine]] = gens["output"].str.strip().eq("").to_numpy()[mine]
    samples = sample_degenerate = None
    sampled = (gens["family"] == SAMPLE).to_numpy()
    if sampled.any():
        ids = sorted(set(gens.loc[sampled, "config_id"]), key=lambda c: int(c.rsplit("-", 1)[1]))
        scol = pd.Index(ids).get_indexer(gens.loc[sampled, "config_id"])
        samples, sample_degenerate = np.full((n, len(ids)), np.nan), np.zeros((n, len(ids)), dtype=bool)
        samples[row[sampled], scol] = gens.loc[sampled, metric].to_numpy(dtype=np.float64, na_value=np.nan)
        sample_degenerate[row[sampled], scol] = flags[sampled]
        if np.isnan(samples).any():
            raise ValueError(f"{int(np.isnan(samples).sum())} sample rows are missing or have no {metric} score")
    return SideRows(degenerate, total, samples, sample_degenerate, table, float(empty.mean()))


def degenerate_summary(frontier: Frontier, side: SideRows, mode: str, match: float | None) -> dict:
    """How many rows the rule flags, and how many of the oracle's picks at the matching budget are degenerate."""
    picks = None
    if match is not None:
        choice = allocate(frontier, match).choice
        picks = int(side.degenerate[np.arange(len(choice)), choice].sum())
    return {"mode": mode, "rows": int(side.degenerate.sum()), "of_rows": int(side.degenerate.size),
            "full_rows": int(side.degenerate[:, 0].sum()), "picks_at_match": picks,
            "of_sequences": int(side.degenerate.shape[0])}


def total_cost_summary(frontier: Frontier, side: SideRows, match: float | None) -> dict:
    """The layer-tokens per sequence the full model and the oracle's allocation at the matching budget pay."""
    full = float(side.total[:, 0].mean())
    at_match = None
    if match is not None:
        choice = allocate(frontier, match).choice
        at_match = float(side.total[np.arange(len(choice)), choice].mean())
    return {"unit": "layer-tokens per sequence (prompt pass + decode steps)", "full_mean": full,
            "oracle_at_match": at_match, "fraction": None if at_match is None else at_match / full}


def noise_ceiling_summary(frontier: Frontier, matrix: Matrix, rows: list[FrontierRow], samples: np.ndarray,
                          draws: BootstrapDraws | None, match_full: bool, tolerance: float, resamples: int,
                          seed: int, level: float) -> dict:
    """The full model's best of K beside the oracle: both selection gains, and the budget matching best-of-K."""
    out = ceiling_summary(matrix.scores[:, 0], samples, resamples, seed, level)
    top = next(i for i, r in enumerate(rows) if r.budget >= float(matrix.costs.max()))
    out["oracle_gain_at_full_budget"] = rows[top].value - float(matrix.scores[:, 0].mean())
    out["oracle_gain_at_full_budget_interval"] = None if draws is None else _pair(
        draws.interval(draws.values[:, top] - draws.config_means[:, 0]))
    match = min_budget_to_match(frontier, best_of_k(samples), tolerance) if match_full else None
    out["min_budget_to_match_best_of_k"] = match
    out["min_budget_to_match_best_of_k_interval"] = None if draws is None or draws.target_match is None else (
        open_interval(draws.target_match[:, 0], level))
    return out


def open_interval(matches: np.ndarray, level: float) -> list[float | None]:
    """Percentile interval of least matching budgets where NaN (no match) counts as beyond every budget: a bound
    that falls there is None. Quantiles without interpolation (`inverted_cdf`), so infinities stay apart."""
    tail = (1.0 - level) / 2.0
    bounds = np.quantile(np.where(np.isnan(matches), np.inf, matches), [tail, 1.0 - tail], method="inverted_cdf")
    return [None if not np.isfinite(v) else float(v) for v in bounds]


def null_summary(null: NullDraws, rows: list[FrontierRow], draws: int, seed: int, binary: bool = False) -> dict:
    """summary.json's `oracle_null`: the null's least matching budget and its values at the requested budgets."""
    median, lo, hi = null.match_summary()
    values = null.value_summary()
    kind = ("independence (0/1 scores right with the additive fit's probability, seq + config)" if binary else
            "residual permutation (additive fit seq + config, residuals permuted within configurations)")
    return {"kind": kind,
            "draws": draws, "seed": seed, "min_budget_to_match": median, "min_budget_interval": [lo, hi],
            "budgets": [{"budget": r.budget, "value": float(v[0]), "value_lo": float(v[1]), "value_hi": float(v[2])}
                        for r, v in zip(rows, values) if r.kind == "requested"]}


def null_table(rows: list[FrontierRow], null: NullDraws) -> pa.Table:
    """null.parquet: the oracle on the null at every frontier budget (median over draws, percentile interval)."""
    values = null.value_summary()
    return pa.table({"budget": [r.budget for r in rows], "value": values[:, 0], "value_lo": values[:, 1],
                     "value_hi": values[:, 2]}, schema=NULL_SCHEMA)
