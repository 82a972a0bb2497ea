"""`dynoracle controller RUN`: how much of the oracle's gain a prompt-only controller recovers, from the run folder.

The I/O edge around `pipeline.analysis.controller`: reads the score matrix (`reduce.load_matrix`, nominal cost), the
prompt features (`features.load_features`, one feature set per stored layer), solves the true oracle at
every budget of the reducer's grid (`pipeline.analysis.oracle`), runs every learner on the real features and on
shuffled ones (the null), and writes `controller/<name>/{curves,matches,folds}.parquet` and
`summary.json` (<name>: the metric plus the families, learners and layers when not all, as
`pipeline.analysis.result_key` spells them). Everything is computed before the first file is written; each file is renamed into place.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from pipeline.analysis.controller import (
    LEARNERS,
    REGRESSORS,
    best_static,
    bootstrap_match,
    fold_splits,
    gain_share,
    match_budget,
    overall_share,
    run_controller,
    shuffled,
)
from pipeline.analysis.features import load_features, stored_layers
from pipeline.analysis.oracle import allocate, build_frontier
from pipeline.analysis.metrics import check_metric
from pipeline.analysis.reduce import budget_grid, load_matrix, run_families
from pipeline.analysis.result_key import CONTROLLER_OPTIONS, chosen_or_all, preferred_result, result_name
from pipeline.generation.configs import FULL_ID
from pipeline.run.atomic import write_json, write_parquet
from pipeline.run.location import locate, read_parquet
from pipeline.run.rundir import RunDir

CURVES_SCHEMA = pa.schema([
    ("layer", pa.int16()),  # feature layer (hidden state after this many layers; L = final)
    ("learner", pa.string()),
    ("null", pa.bool_()),  # true: shuffled features (every sequence sees another's)
    ("budget", pa.float64()),
    ("value", pa.float64()),  # controller's mean true score
    ("cost", pa.float64()),  # controller's mean cost (layers)
    ("oracle", pa.float64()),
    ("lp_bound", pa.float64()),
    ("static", pa.float64()),  # best single configuration with cost <= budget
    ("static_config", pa.string()),
    ("share", pa.float64()),  # (value - static) / (oracle - static); NaN where the oracle gains nothing
])
MATCHES_SCHEMA = pa.schema([
    ("layer", pa.int16()),
    ("learner", pa.string()),
    ("null", pa.bool_()),
    ("full_mean", pa.float64()),
    ("match_budget", pa.float64()),  # least budget whose controller mean >= full_mean; null when none
    ("match_low", pa.float64()),  # bootstrap percentile interval; null when that bound has no match
    ("match_high", pa.float64()),
    ("unmatched", pa.float64()),  # share of resamples with no matching budget
    ("overall_share", pa.float64()),  # sum over budgets of (value - static) / sum of (oracle - static)
    ("seconds", pa.float64()),  # fitting and allocating this curve
])
FOLDS_SCHEMA = pa.schema([("seq_id", pa.string()), ("fold", pa.int16())])
CONTROLLER_FILES = ("curves.parquet", "matches.parquet", "folds.parquet", "summary.json")


@dataclass(frozen=True)
class ControllerResult:
    out_dir: Path
    curves: pd.DataFrame
    matches: pd.DataFrame
    summary: dict


def evaluate_run(run_dir: str | Path, metric: str | None = None, families: list[str] | tuple[str, ...] | None = None,
                 layers: list[int] | tuple[int, ...] = (), learners: list[str] | tuple[str, ...] = LEARNERS,
                 folds: int = 5, seed: int = 0, resamples: int = 1000) -> ControllerResult:
    """Evaluate every learner on every feature layer (default: all stored), real and shuffled; write the files.

    Regression controllers are evaluated at every budget of the reducer's grid, the classifier (one fit
    per fold and budget) at its integer budgets.
    """
    unknown = sorted(set(learners) - set(LEARNERS))
    if unknown or not learners:
        raise ValueError(f"unknown learner {', '.join(unknown) or '(none)'}; choose from {', '.join(LEARNERS)}")
    if resamples < 1:
        raise ValueError(f"resamples must be at least 1, got {resamples}")
    run_dir = Path(run_dir)
    metric = check_metric(RunDir(run_dir).read_run_json(), metric, run_dir)
    matrix, _ = load_matrix(run_dir, metric, families, "nominal")
    scores, costs = matrix.scores, matrix.costs
    every_family = set(run_families(run_dir)) - {FULL_ID}
    name = result_name(metric, {"families": chosen_or_all(families and matrix.families[1:], every_family),
                                "learners": chosen_or_all(learners, LEARNERS),
                                "layers": chosen_or_all(layers or None, stored_layers(run_dir))}, CONTROLLER_OPTIONS)
    layers = sorted(set(layers)) or stored_layers(run_dir)
    if not layers:
        raise FileNotFoundError(f"no prompt features in {run_dir / 'features'}; run `dynoracle features {run_dir}` first")
    features = {j: load_features(run_dir, matrix.seq_ids, j) for j in layers}
    splits = fold_splits(scores.shape[0], folds, seed)

    frontier = build_frontier(scores, costs)
    grid = np.asarray(budget_grid(frontier.min_budget, float(costs.max())))
    oracle = [allocate(frontier, b) for b in grid]
    reference = pd.DataFrame({"budget": grid, "oracle": [a.value for a in oracle],
                              "lp_bound": [a.lp_bound for a in oracle]})
    static, static_index = best_static(scores, costs, grid)
    reference["static"] = static
    reference["static_config"] = [matrix.config_ids[i] if i >= 0 else None for i in static_index]
    full_mean = float(scores[:, 0].mean())  # load_matrix puts `full` first

    curves, matches = [], []
    for layer, x in features.items():
        for learner in learners:
            budgets = grid if learner in REGRESSORS else grid[np.isclose(grid, np.round(grid))]
            for null in (False, True):
                start = time.monotonic()
                curve = run_controller(learner, shuffled(x, seed) if null else x, scores, costs, budgets, splits, seed)
                seconds = time.monotonic() - start
                rows = reference.set_index("budget").loc[budgets].reset_index()
                rows = rows.assign(layer=layer, learner=learner, null=null, value=curve.value, cost=curve.cost)
                rows["share"] = gain_share(rows["value"].to_numpy(), rows["static"].to_numpy(), rows["oracle"].to_numpy())
                curves.append(rows)
                low, high, unmatched = bootstrap_match(budgets, curve.choices, scores, 0, resamples, seed)
                matches.append({"layer": layer, "learner": learner, "null": null, "full_mean": full_mean,
                                "match_budget": match_budget(budgets, curve.value, full_mean), "match_low": low,
                                "match_high": high, "unmatched": unmatched,
                                "overall_share": overall_share(rows["value"], rows["static"], rows["oracle"]),
                                "seconds": seconds})
    curves_frame = pd.concat(curves, ignore_index=True)[CURVES_SCHEMA.names]
    matches_frame = pd.DataFrame(matches, columns=MATCHES_SCHEMA.names)
    fold_of = np.empty(scores.shape[0], dtype=np.int16)
    for k, (_, test) in enumerate(splits):
        fold_of[test] = k
    summary = {"metric": metric, "result": name, "families": matrix.families, "num_sequences": int(scores.shape[0]),
               "num_configs": int(scores.shape[1]), "num_layers": float(costs[0]), "full_mean": full_mean,
               "layers": layers, "learners": list(learners), "folds": folds, "seed": seed, "resamples": resamples}
    out_dir = run_dir / "controller" / name  # the metric, plus the options unlike their defaults
    tables = {"curves.parquet": pa.Table.from_pandas(curves_frame, schema=CURVES_SCHEMA, preserve_index=False),
              "matches.parquet": pa.Table.from_pandas(matches_frame, schema=MATCHES_SCHEMA, preserve_index=False),
              "folds.parquet": pa.table({"seq_id": matrix.seq_ids.astype(str), "fold": fold_of}, schema=FOLDS_SCHEMA)}
    for name, table in tables.items():
        write_parquet(table, out_dir / name)
    write_json(summary, out_dir / "summary.json")
    return ControllerResult(out_dir, curves_frame, matches_frame, summary)


def read_curves(run_dir: str | Path, metric: str) -> pd.DataFrame | None:
    """The controller curves of a run for `metric` (`result_key.preferred_result`: the default options' folder,
    else the newest other); None when `dynoracle controller` has not run for it."""
    path = preferred_result(locate(run_dir) / "controller", metric, "curves.parquet")
    return None if path is None else read_parquet(path).to_pandas()
