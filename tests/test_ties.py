"""Exact matching under ties: an oracle equal to the full model's mean matches it, whatever the rounding."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from handmade_run import GENERATION_COLUMNS, write_run
from typer.testing import CliRunner

from pipeline.analysis.oracle import build_frontier, choice_at, min_budget_to_match
from pipeline.cli import app
from pipeline.generation.configs import build_configs
from pipeline.run.rundir import CONFIGS_SCHEMA

# The 5-sequence run: rougeL of full, uls-1, uls-2, uls-3 on a 4-layer model. Its float means differ
# (0.46871794871794864 for the oracle at the full budget, 0.46871794871794875 for `full`) though the
# oracle at the full budget can give every sequence `full`.
TIE = np.array([
    [.7, 0, .13333333333333333, .7],
    [.4, .25, 0, 0],
    [.5, .45454545454545453, 0, .26666666666666666],
    [.6666666666666666, .6666666666666666, .5833333333333334, .25],
    [.07692307692307693, .07692307692307693, 0, 0],
])
COSTS = np.array([4.0, 1.0, 2.0, 3.0])


def exact_mean_reached(scores: np.ndarray, choice: np.ndarray) -> bool:
    """Rational arithmetic on the floats' exact values: sum of the chosen scores >= sum of `full`'s."""
    chosen = sum(Fraction(float(x)) for x in scores[np.arange(len(choice)), choice])
    return chosen >= sum(Fraction(float(x)) for x in scores[:, 0])


def test_tie_case_matches_at_the_first_breakpoint_that_reaches_full_exactly() -> None:
    frontier = build_frontier(TIE, COSTS)
    assert frontier.values[-1] < TIE[:, 0].mean()  # the float means hide the tie ...
    budget = min_budget_to_match(frontier, TIE[:, 0])  # ... the per-sequence comparison does not
    assert budget is not None
    first = int(np.flatnonzero(frontier.mean_cost == budget)[0])
    assert exact_mean_reached(TIE, choice_at(frontier, first))
    assert all(not exact_mean_reached(TIE, choice_at(frontier, p)) for p in range(first))


def test_exact_matching_agrees_with_rational_arithmetic_on_fidelity_like_runs() -> None:
    rng = np.random.default_rng(3)
    for _ in range(200):
        n, k = int(rng.integers(2, 12)), int(rng.integers(2, 6))
        # fidelity-like: small-denominator fractions, the full model scores 1 against itself often
        scores = rng.integers(0, 8, (n, k)) / rng.integers(1, 8, (n, k)).clip(1)
        scores = np.minimum(scores, 1.0)
        costs = np.concatenate(([float(k)], rng.permutation(np.arange(1.0, k))))
        frontier = build_frontier(scores, costs)
        budget = min_budget_to_match(frontier, scores[:, 0])
        reached = [exact_mean_reached(scores, choice_at(frontier, p)) for p in range(frontier.num_segments + 1)]
        assert reached[-1]  # the full budget gives every sequence its best: never below `full`
        assert budget == frontier.mean_cost[reached.index(True)]


def write_tie_run(root: Path, scores: np.ndarray) -> Path:
    """A run folder holding only `full`, uls-1, uls-2, uls-3 of a 4-layer model, scores in that column order."""
    configs = {c.config_id: c for c in build_configs(4, ("uls",), ())}
    ordered = [configs[i] for i in ("full", "uls-1", "uls-2", "uls-3")]
    root.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist([c.to_dict() for c in ordered], schema=CONFIGS_SCHEMA),
                   root / "configs.parquet")
    rows = [{"seq_id": f"s{n}", "shard": 0, "config_id": c.config_id, "family": c.family, "cost": c.cost,
             "prompt_tokens": 9, "prompt_truncated": False, "gen_tokens": 5, "finish_reason": "eos",
             "output": "o", "reference": "r", "rouge1": scores[n, j], "rouge2": scores[n, j], "rougeL": scores[n, j],
             "rougeLsum": scores[n, j], "fidelity": scores[n, j], "layers_per_token": float(c.cost)}
            for n in range(scores.shape[0]) for j, c in enumerate(ordered)]
    write_run(root, {"model": "toy-lm", "max_new_tokens": 5},
              [pa.Table.from_pylist(rows, schema=pa.schema(GENERATION_COLUMNS))])
    return root


def test_reduce_and_report_the_tie_run(tmp_path: Path) -> None:
    run = write_tie_run(tmp_path / "tie", TIE)
    expected = min_budget_to_match(build_frontier(TIE, COSTS), TIE[:, 0])
    reduced = CliRunner().invoke(app, ["reduce", str(run), "--match-full", "--bootstrap", "0"])
    assert reduced.exit_code == 0, reduced.output
    assert f"minimal budget matching full model (mean 0.4687): {expected:.6g} layers of 4" in reduced.output
    reported = CliRunner().invoke(app, ["report", str(run)])
    assert reported.exit_code == 0, reported.output
    assert f"the oracle matches it at {expected:.3f} of 4 layers" in reported.output
    assert f"| least budget matching the full model | {expected:.3f} layers" in (run / "report.md").read_text()


def test_report_of_oracle_files_without_a_match_says_so(tmp_path: Path) -> None:
    # With `full` among the configurations the exact comparison always matches at the latest at the full
    # budget; oracle files that record no match (searched, none found) still make a report, not a crash.
    import json

    from pipeline.analysis.reduce import reduce_run
    from pipeline.report.figures import markdown, plot_cost_quality, plot_shares

    run = write_tie_run(tmp_path / "tie", TIE)
    result = reduce_run(run, "rougeL", match_full=True)
    summary = {**result.summary, "min_budget_to_match": None, "min_budget_fraction": None}
    frontier = pq.read_table(run / "oracle" / "rougeL" / "frontier.parquet").to_pandas()
    frontier = frontier[frontier["kind"] != "match_full"]
    per_config = pq.read_table(run / "generations").to_pandas().groupby(["config_id", "family", "cost"],
                                                                        as_index=False).agg(
        score=("rougeL", "mean"), gen_tokens=("gen_tokens", "mean"), eos_rate=("gen_tokens", lambda s: 1.0))
    per_config = per_config.merge(pq.read_table(run / "oracle" / "rougeL" / "config_means.parquet").to_pandas()[
        ["config_id", "mean_lo", "mean_hi"]], on="config_id")
    text = markdown(summary, frontier, per_config, "tie", [])
    assert ("| least budget matching the full model | none: no budget up to 4 layers brings the oracle to the "
            "full model's mean rougeL (0.4687) |") in text
    for fig in (plot_cost_quality(per_config, frontier, summary, "tie"), plot_shares(per_config, frontier, summary, "tie")):
        fig.savefig(tmp_path / "figure.png")
        assert (tmp_path / "figure.png").stat().st_size > 10_000
    assert json.loads((run / "oracle" / "rougeL" / "summary.json").read_text())["match_full"] is True
