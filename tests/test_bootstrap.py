"""Paired bootstrap intervals: equal to a slow direct loop, containing the estimates, narrowing with N, seeded."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from handmade_run import make_run

from pipeline.analysis.bootstrap import bootstrap_oracle, resample_indices
from pipeline.analysis.oracle import allocate, build_frontier, min_budget_to_match
from pipeline.analysis.reduce import reduce_run


def fidelity_like(n: int, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Rounded scores (ties, repeated rows) rising with cost; column 0 is `full` at the dearest cost."""
    rng = np.random.default_rng(seed)
    costs = np.concatenate(([float(k)], np.arange(1.0, k)))
    scores = np.clip(rng.random((n, k)) * 0.6 + costs / (2 * k), 0, 1).round(2)
    return scores, costs


def test_draws_equal_a_slow_loop_over_resamples_with_the_full_model_paired() -> None:
    scores, costs = fidelity_like(25, 6, seed=1)
    budgets = np.array([1.0, 1.5, 2.75, 4.0, 6.0])
    draws = bootstrap_oracle(scores, costs, budgets, resamples=60, seed=7)
    for r, rows in enumerate(resample_indices(25, 60, 7)):
        resample = scores[rows]  # the same sequences for every statistic: the full model's too
        frontier = build_frontier(resample, costs)
        assert draws.values[r].tolist() == [allocate(frontier, b).value for b in budgets]
        assert draws.match[r] == min_budget_to_match(frontier, resample[:, 0])
        assert draws.config_means[r] == pytest.approx(resample.mean(axis=0), abs=1e-15)


def test_reduce_intervals_contain_the_estimates_and_are_reproducible(tmp_path: Path) -> None:
    run = make_run(tmp_path / "run", num_sequences=30)
    first = reduce_run(run, "rougeL", budgets=(2.5,), resamples=200, seed=3)
    out = run / "oracle" / "rougeL"
    frontier = pq.read_table(out / "frontier.parquet").to_pandas()
    assert (frontier["value_lo"] <= frontier["value"]).all() and (frontier["value"] <= frontier["value_hi"]).all()
    assert (frontier["value_lo"] < frontier["value_hi"]).any()
    means = pq.read_table(out / "config_means.parquet").to_pandas()
    assert len(means) == first.summary["num_configs"] and means["config_id"].iloc[0] == "full"
    assert ((means["mean_lo"] <= means["mean"]) & (means["mean"] <= means["mean_hi"])).all()
    summary = first.summary
    assert summary["bootstrap"] == {"resamples": 200, "seed": 3, "level": 0.95}
    lo, hi = summary["min_budget_interval"]
    assert lo <= summary["min_budget_to_match"] <= hi
    lo, hi = summary["full_mean_interval"]
    assert lo <= summary["full_mean"] <= hi and means["mean"].iloc[0] == summary["full_mean"]

    saved = {name: (out / name).read_bytes() for name in ("frontier.parquet", "config_means.parquet")}
    again = reduce_run(run, "rougeL", budgets=(2.5,), resamples=200, seed=3)
    assert again.summary == json.loads((out / "summary.json").read_text()) == summary
    assert all((out / name).read_bytes() == data for name, data in saved.items())
    other = reduce_run(run, "rougeL", budgets=(2.5,), resamples=200, seed=4)
    assert other.summary["full_mean_interval"] != summary["full_mean_interval"]


def test_intervals_narrow_as_the_number_of_sequences_grows() -> None:
    widths = []
    for n in (40, 640):
        scores, costs = fidelity_like(n, 6, seed=n)
        draws = bootstrap_oracle(scores, costs, np.array([3.0]), resamples=300, seed=0)
        width = lambda draw: float(np.diff(draws.interval(draw), axis=-1).max())  # noqa: E731
        widths.append((width(draws.config_means[:, 0]), width(draws.values[:, 0]), width(draws.match)))
    small, large = widths
    # the standard error falls as 1/sqrt(N): 16x the sequences, about a quarter of the width
    assert all(b < a / 2 for a, b in zip(small, large)), widths


def test_no_bootstrap_leaves_the_interval_columns_null(tmp_path: Path) -> None:
    run = make_run(tmp_path / "run", num_sequences=8)
    result = reduce_run(run, "rougeL", resamples=0)
    assert result.summary["bootstrap"] is None and result.summary["min_budget_interval"] is None
    frontier = pq.read_table(run / "oracle" / "rougeL" / "frontier.parquet")
    assert frontier["value_lo"].null_count == frontier.num_rows
