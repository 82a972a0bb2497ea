"""Controllers against the oracle: recover its gain when the features determine the scores, none otherwise,
never score a sequence with a model fitted on it, never beat the LP bound; and `dynoracle controller` on a
hand-made run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from handmade_run import make_run, write_features
from matplotlib.figure import Figure
from typer.testing import CliRunner

from pipeline.analysis.controller import (
    LEARNERS,
    best_static,
    bootstrap_match,
    fold_splits,
    gain_share,
    match_budget,
    run_controller,
    shuffled,
)
from pipeline.analysis.controller_run import CURVES_SCHEMA, evaluate_run
from pipeline.analysis.oracle import allocate, build_frontier
from pipeline.analysis.reduce import budget_grid, load_matrix
from pipeline.cli import app
from pipeline.report.figures import build_report, plot_controllers

N, COSTS = 150, np.arange(1.0, 7.0)  # configurations executing 1..6 layers
# Integer budgets: between two static costs a random mix of configurations spends more than the best static
# configuration affordable, and earns a positive share without knowing anything.
BUDGETS = np.arange(2.0, 6.0)


def difficulty_scores(ease: np.ndarray) -> np.ndarray:
    """(N, K): an easy sequence (ease near 1) scores well at any depth, a hard one only with many layers."""
    return ease[:, None] + (1 - ease[:, None]) * COSTS[None, :] / COSTS.max()


def shares(curve, scores: np.ndarray, budgets: np.ndarray = BUDGETS) -> np.ndarray:
    frontier = build_frontier(scores, COSTS)
    oracle = np.array([allocate(frontier, b).value for b in budgets])
    static, _ = best_static(scores, COSTS, budgets)
    return gain_share(curve.value, static, oracle)


@pytest.fixture(scope="module")
def task() -> tuple[np.ndarray, np.ndarray, list]:
    rng = np.random.default_rng(1)
    ease = rng.random(N)
    features = np.column_stack([ease, rng.normal(size=(N, 3))])  # the score-determining feature and noise
    return features, difficulty_scores(ease), fold_splits(N, 5, 0)


@pytest.mark.parametrize("learner, least", [("ridge", 0.97), ("boosting", 0.8), ("classifier", 0.8)])
def test_features_that_determine_the_scores_recover_the_oracles_gain(task, learner, least):
    features, scores, splits = task
    curve = run_controller(learner, features, scores, COSTS, BUDGETS, splits)
    assert np.nanmean(shares(curve, scores)) >= least


@pytest.mark.parametrize("learner", LEARNERS)
def test_shuffled_or_random_features_recover_about_nothing(task, learner):
    features, scores, splits = task
    random = np.random.default_rng(2).normal(size=features.shape)
    for x in (shuffled(features, 0), random):
        curve = run_controller(learner, x, scores, COSTS, BUDGETS, splits)
        assert abs(np.nanmean(shares(curve, scores))) < 0.2


def test_no_sequence_is_scored_by_a_model_fitted_on_it(task):
    _, scores, splits = task
    tests = np.concatenate([test for _, test in splits])
    assert np.array_equal(np.sort(tests), np.arange(N))  # every sequence in exactly one test fold
    for train, test in splits:
        assert np.intersect1d(train, test).size == 0 and train.size + test.size == N
    # One-hot sequence identities: a model that saw a sequence could memorise its scores, one that did not
    # learns nothing about it. Cross-fitted, the controller recovers nothing.
    curve = run_controller("ridge", np.eye(N), scores, COSTS, BUDGETS, splits)
    assert abs(np.nanmean(shares(curve, scores))) < 0.2


@pytest.mark.parametrize("learner", LEARNERS)
def test_controller_never_beats_the_lp_bound(task, learner):
    features, scores, splits = task
    noisy = features + np.random.default_rng(3).normal(scale=0.2, size=features.shape)
    frontier = build_frontier(scores, COSTS)
    curve = run_controller(learner, noisy, scores, COSTS, BUDGETS, splits)
    if learner != "classifier":
        assert (curve.cost <= BUDGETS + 1e-12).all()  # allocated by the oracle solver on predicted scores
    bound = np.array([allocate(frontier, max(b, c)).lp_bound for b, c in zip(BUDGETS, curve.cost)])
    assert (curve.value <= bound + 1e-12).all()


def test_measures_on_a_hand_computed_case():
    scores = np.array([[0.2, 0.5, 0.6], [0.4, 0.4, 0.9]])  # costs 1, 2, 3
    costs = np.array([1.0, 2.0, 3.0])
    static, index = best_static(scores, costs, np.array([0.5, 1.0, 2.5, 3.0]))
    assert np.array_equal(index, [-1, 0, 1, 2]) and np.isnan(static[0])
    assert np.allclose(static[1:], [0.3, 0.45, 0.75])
    assert gain_share(np.array([0.5]), np.array([0.4]), np.array([0.6]))[0] == pytest.approx(0.5)
    assert np.isnan(gain_share(np.array([0.5]), np.array([0.6]), np.array([0.6]))[0])
    assert match_budget(np.array([1.0, 2.0, 3.0]), np.array([0.1, 0.5, 0.4]), 0.45) == 2.0
    assert match_budget(np.array([1.0, 2.0]), np.array([0.1, 0.2]), 0.45) is None
    # choices always `full` (index 2) at budget 3: every resample matches there and nowhere earlier
    choices = np.array([[0, 0], [1, 1], [2, 2]])
    assert bootstrap_match(np.array([1.0, 2.0, 3.0]), choices, scores, 2, 50, 0) == (3.0, 3.0, 0.0)


@pytest.fixture(scope="module")
def handmade(tmp_path_factory) -> Path:
    """A hand-made run whose layer-1 features are each sequence's own rougeL scores (an exact function)."""
    run_dir = make_run(tmp_path_factory.mktemp("runs") / "toy", num_sequences=60)
    matrix, _ = load_matrix(run_dir, "rougeL", None, "nominal")
    write_features(run_dir, dict(zip(matrix.seq_ids, matrix.scores)))
    return run_dir


def test_controller_command_on_a_handmade_run(handmade):
    result = CliRunner().invoke(app, ["controller", str(handmade), "--learner", "ridge", "--learner", "classifier",
                                      "--resamples", "200"])
    assert result.exit_code == 0, result.output
    assert "features after layer 1" in result.output and "least budget matching the full model" in result.output

    out = handmade / "controller" / "rougeL+learners=classifier,ridge"  # not every learner: their own folder
    curves = pq.read_table(out / "curves.parquet")
    assert curves.schema.equals(CURVES_SCHEMA, check_metadata=False)
    matrix, _ = load_matrix(handmade, "rougeL", None, "nominal")
    grid = np.array(budget_grid(matrix.costs.min(), matrix.costs.max()))
    integers = grid[grid == np.round(grid)]
    frame = curves.to_pandas()
    assert len(frame) == 2 * (len(grid) + len(integers))  # (ridge on the grid + classifier on integers) x real/null
    frontier = build_frontier(matrix.scores, matrix.costs)
    for row in frame.itertuples():
        a = allocate(frontier, row.budget)
        assert (row.oracle, row.lp_bound) == (a.value, a.lp_bound)
        assert row.value <= allocate(frontier, max(row.budget, row.cost)).lp_bound + 1e-12
    ridge = frame[frame["learner"] == "ridge"]
    assert (ridge["cost"] <= ridge["budget"] + 1e-12).all()
    assert ridge.loc[~ridge["null"], "share"].mean() >= 0.9
    assert abs(ridge.loc[ridge["null"], "share"].mean()) < 0.25

    folds = pq.read_table(out / "folds.parquet").to_pandas()
    assert sorted(folds["seq_id"]) == sorted(matrix.seq_ids) and sorted(folds["fold"].value_counts()) == [12] * 5
    matches = pq.read_table(out / "matches.parquet").to_pandas()
    assert len(matches) == 4


def test_missing_features_or_bad_learner_is_one_line_and_writes_nothing(tmp_path):
    run_dir = make_run(tmp_path / "toy", num_sequences=10)
    for args, message in (([], "no prompt features"), (["--learner", "forest"], "unknown learner forest")):
        result = CliRunner().invoke(app, ["controller", str(run_dir), *args])
        assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1
        assert result.output.startswith("error: ") and message in result.output
    assert not (run_dir / "controller").exists()
    write_features(run_dir, {f"q{n:03d}": np.ones(3) for n in range(10)})
    with pytest.raises(ValueError, match="folds must be between 2"):
        evaluate_run(run_dir, folds=11)
    assert not (run_dir / "controller").exists()


def test_report_draws_the_controllers_beside_the_oracle(handmade):
    evaluate_run(handmade, learners=("ridge", "boosting"), resamples=10)
    assert handmade / "cost_quality.png" in build_report(handmade).figures
    curves = pq.read_table(handmade / "controller" / "rougeL+learners=boosting,ridge" / "curves.parquet").to_pandas()
    ax = Figure().add_subplot()
    plot_controllers(ax, curves, 6)
    assert [line.get_label() for line in ax.get_lines()] == [
        "controller: ridge, prompt features after layer 1", "controller: boosting, prompt features after layer 1",
        "controller: ridge, shuffled features (null)"]
    real = curves[(curves["learner"] == "ridge") & ~curves["null"]].sort_values("budget")
    assert np.array_equal(ax.get_lines()[0].get_xdata(), real["cost"].to_numpy())
