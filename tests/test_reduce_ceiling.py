"""`reduce` beside the oracle: the null, the full model's best-of-K noise ceiling, degenerate rows and total cost,
on a hand-made run (L = 6: full, uls-1..5 and four samples of the full model)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from handmade_run import GENERATION_COLUMNS, write_run
from pipeline.analysis.costs import total_cost
from pipeline.analysis.degenerate import EXCLUDED_SCORE
from pipeline.analysis.reduce import reduce_run
from pipeline.cli import app
from pipeline.generation.configs import build_configs, sample_configs

L, N, K = 6, 12, 4
CONFIGS = [*build_configs(L, ("uls",)), *sample_configs(L, K)]
PROMPT = 20


def _run(root: Path) -> tuple[Path, dict]:
    """Deeper is better plus noise; q000's uls-1 output is empty yet scores 0.9; sample k of q scores 0.4 + ..."""
    rng = np.random.default_rng(0)
    rows, truth = [], {"rougeL": {}, "gen": {}}
    for n in range(N):
        for cfg in CONFIGS:
            score = round(0.2 + 0.5 * cfg.cost / L + 0.2 * rng.random(), 4)
            output = f"answer number {n} from {cfg.config_id}"
            if (n, cfg.config_id) == (0, "uls-1"):
                score, output = 0.9, "  "
            gen = int(3 + (n + cfg.cost) % 5)
            truth["rougeL"][(n, cfg.config_id)], truth["gen"][(n, cfg.config_id)] = score, gen
            rows.append({"seq_id": f"q{n:03d}", "shard": 0, "config_id": cfg.config_id, "family": cfg.family,
                         "cost": cfg.cost, "prompt_tokens": PROMPT, "prompt_truncated": False, "gen_tokens": gen,
                         "finish_reason": "eos", "output": output, "reference": "ref",
                         **{m: score for m in ("rouge1", "rouge2", "rougeL", "rougeLsum", "fidelity")},
                         "layers_per_token": float(cfg.cost)})
    root.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist([c.to_dict() for c in CONFIGS], schema=pa.schema([
        ("config_id", pa.string()), ("family", pa.string()), ("budget", pa.int16()),
        ("layers", pa.list_(pa.int16())), ("cost", pa.int16())])), root / "configs.parquet")
    write_run(root, {"model": "toy", "max_new_tokens": 8, "prefill": "full", "dataset": {"name": "toy"}},
              [pa.Table.from_pylist(rows, schema=pa.schema(GENERATION_COLUMNS))])
    return root, truth


def test_total_cost_against_a_hand_computation():
    # 20 prompt tokens through all 6 layers, then 4 more tokens (5 generated) through 2 layers: 120 + 8
    assert total_cost(20, 5, 2, 6, "full") == 128
    assert total_cost(20, 5, 2, 6, "skip") == 20 * 2 + 4 * 2
    assert total_cost(20, 1, 2, 6, "full") == 120  # the first token comes from the prompt pass
    np.testing.assert_array_equal(total_cost(np.array([10, 3]), np.array([2, 4]), np.array([6, 1]), 6),
                                  [10 * 6 + 1 * 6, 3 * 6 + 3 * 1])
    with pytest.raises(ValueError, match="prefill"):
        total_cost(1, 1, 1, 6, "half")


def test_noise_ceiling_null_degenerate_and_total_cost(tmp_path: Path):
    run, truth = _run(tmp_path / "run")
    result = reduce_run(run, budgets=[2.0], resamples=200, null_draws=50, degenerate="keep")
    s = result.summary
    oracle = run / "oracle" / "rougeL+degenerate=keep"  # not the default rule's folder
    assert result.out_dir == oracle and not (run / "oracle" / "rougeL").exists()
    score = truth["rougeL"]
    full = np.array([score[(n, "full")] for n in range(N)])
    samples = np.array([[score[(n, f"sample-{k}")] for k in range(K)] for n in range(N)])
    ceiling = s["noise_ceiling"]
    assert ceiling["samples"] == K
    assert ceiling["best_of_k_mean"] == pytest.approx(samples.max(axis=1).mean(), abs=1e-12)
    assert ceiling["sample_mean"] == pytest.approx(samples.mean(), abs=1e-12)
    assert ceiling["best_of_k_gain"] == pytest.approx((samples.max(axis=1) - full).mean(), abs=1e-12)
    lo, hi = ceiling["best_of_k_mean_interval"]
    assert lo <= ceiling["best_of_k_mean"] <= hi
    frontier = pq.read_table(oracle / "frontier.parquet").to_pandas()
    at_full = frontier[frontier["budget"] == L]["value"].iloc[0]
    assert ceiling["oracle_gain_at_full_budget"] == pytest.approx(at_full - full.mean(), abs=1e-12)
    bar = ceiling["min_budget_to_match_best_of_k"]  # a higher bar than the full model's mean
    assert bar is None or bar >= s["min_budget_to_match"]
    assert s["num_configs"] == L  # the samples are not oracle choices
    # the null: a key, a table beside the frontier, and the same budgets
    null = pq.read_table(oracle / "null.parquet").to_pandas()
    np.testing.assert_array_equal(null["budget"], frontier["budget"])
    assert (null["value_lo"] <= null["value"]).all() and (null["value"] <= null["value_hi"]).all()
    assert s["oracle_null"]["draws"] == 50 and [b["budget"] for b in s["oracle_null"]["budgets"]] == [2.0]
    # degenerate: one row flagged (q000's uls-1), stored per row
    flags = pq.read_table(oracle / "degenerate.parquet").to_pandas()
    assert len(flags) == N * len(CONFIGS)
    assert flags[flags["degenerate"]][["seq_id", "config_id"]].values.tolist() == [["q000", "uls-1"]]
    assert s["degenerate"]["rows"] == 1 and s["degenerate"]["mode"] == "keep"
    # total cost of the full model by hand; at the matching budget, of the allocation the oracle chose
    gen = truth["gen"]
    assert s["total_cost"]["full_mean"] == pytest.approx(np.mean([PROMPT * L + (gen[(n, "full")] - 1) * L
                                                                   for n in range(N)]))
    alloc = pq.read_table(oracle / "allocations.parquet").to_pandas()
    picked = alloc[alloc["budget"] == s["min_budget_to_match"]]
    cost = {c.config_id: c.cost for c in CONFIGS}
    hand = np.mean([PROMPT * L + (gen[(int(q[1:]), c)] - 1) * cost[c] for q, c in zip(picked["seq_id"],
                                                                                    picked["config_id"])])
    assert s["total_cost"]["oracle_at_match"] == pytest.approx(hand)
    assert s["warning"].startswith("small sample: only 12 sequences")


def test_each_degenerate_mode_changes_the_allocation_as_documented(tmp_path: Path):
    run, truth = _run(tmp_path / "run")

    def at(mode: str) -> tuple[dict, dict]:
        result = reduce_run(run, budgets=[1.0, 2.0], resamples=0, null_draws=0, degenerate=mode)
        s, oracle = result.summary, result.out_dir
        alloc = pq.read_table(oracle / "allocations.parquet").to_pandas()
        means = pq.read_table(oracle / "config_means.parquet").to_pandas().set_index("config_id")["mean"]
        first = {b: alloc[(alloc["budget"] == b) & (alloc["seq_id"] == "q000")]["config_id"].iloc[0] for b in (1.0, 2.0)}
        return first, {"uls-1": means["uls-1"], "budget_1": s["budgets"][0]["value"], "summary": s}

    keep, keep_stats = at("keep")
    zero, zero_stats = at("zero")
    exclude, exclude_stats = at("exclude")
    assert keep[2.0] == "uls-1"  # kept: its 0.9 is q000's best and cheapest score
    assert zero[2.0] != "uls-1" and exclude[2.0] != "uls-1"  # zero: worth nothing; exclude: not a choice
    assert keep[1.0] == zero[1.0] == exclude[1.0] == "uls-1"  # budget 1 forces the only 1-layer configuration
    assert zero_stats["uls-1"] == pytest.approx(keep_stats["uls-1"] - 0.9 / N)
    assert exclude_stats["uls-1"] == pytest.approx(keep_stats["uls-1"] + (EXCLUDED_SCORE - 0.9) / N)
    assert exclude_stats["budget_1"] == pytest.approx(keep_stats["budget_1"] + (EXCLUDED_SCORE - 0.9) / N)
    assert zero_stats["summary"]["degenerate"]["picks_at_match"] == 0
    assert zero_stats["summary"]["oracle_null"] is None  # turned off by null_draws=0, and no null.parquet
    assert not (run / "oracle" / "rougeL" / "null.parquet").exists()  # zero, the default rule: the plain folder


def test_cli_prints_the_null_the_ceiling_and_the_degenerate_picks(tmp_path: Path):
    run, _ = _run(tmp_path / "run")
    out = CliRunner().invoke(app, ["reduce", str(run), "--bootstrap", "100", "--null-draws", "20"])
    assert out.exit_code == 0, out.output
    assert "null (residual permutation, 20 draws): the oracle matches the full model at" in out.output
    assert "noise ceiling: the full model's best of 4 samples" in out.output
    assert "degenerate (zero): 1 of 72 rows;" in out.output  # the oracle's 12 x 6 (samples: degenerate.parquet)
    assert "total cost at the matching budget, prompt pass included:" in out.output
    assert "warning: small sample: only 12 sequences" in out.output
    bad = CliRunner().invoke(app, ["reduce", str(run), "--degenerate", "drop"])
    assert bad.exit_code == 2 and "unknown degenerate mode 'drop'" in bad.output


def test_report_shows_the_null_and_the_oracles_picks_beside_the_full_models_output(tmp_path: Path):
    from handmade_run import make_run
    from pipeline.report.figures import build_report

    run = make_run(tmp_path / "run", num_sequences=16)
    result = build_report(run)
    text = result.markdown.read_text()
    s = result.summary
    assert "## How much of the oracle is real" in text and "the same on the null (median of 200 draws)" in text
    assert "| degenerate picks of the oracle at the matching budget | 0 of 16 | |" in text
    picks = pq.read_table(run / "oracle/rougeL/allocations.parquet").to_pandas()
    picks = picks[(picks["budget"] == s["min_budget_to_match"]) & (picks["config_id"] != "full")]
    first = picks.merge(pq.read_table(run / "configs.parquet").to_pandas(), on="config_id").sort_values(
        ["cost", "seq_id"]).iloc[0]
    n = int(first["seq_id"][1:])
    assert f"| {first['seq_id']} | {first['config_id']} ({first['cost']} layers) | `answer {n} by {first['config_id']}`" in text
    assert f"`answer {n} by full`" in text  # beside the full model's output for the same sequence


def test_report_keeps_a_fresh_reduction_of_a_run_with_samples(tmp_path: Path):
    """The `sample` family is never an oracle choice: a run that has it is still covered by its reduction, so
    `report` neither re-reduces (dropping the requested budgets) nor names another folder."""
    from pipeline.report.figures import stale_reason

    run, _ = _run(tmp_path / "run")
    result = reduce_run(run, budgets=[2.0], resamples=0, null_draws=0)
    present = pq.read_table(run / "configs.parquet").column("family").unique().to_pylist()
    assert "sample" in present and result.out_dir == run / "oracle" / "rougeL"
    assert stale_reason(run, "rougeL", None, present) is None
    assert reduce_run(run, families=["uls"], resamples=0, null_draws=0).out_dir == run / "oracle" / "rougeL"


def test_a_stale_reduction_redone_by_report_keeps_its_requested_budgets(tmp_path: Path):
    """A copied run (its files newer than the oracle's) is re-reduced by `report` with the budgets asked for."""
    import os

    from handmade_run import make_run
    from pipeline.report.figures import build_report

    run = make_run(tmp_path / "run", num_sequences=12)
    reduce_run(run, budgets=[2.0, 3.0], resamples=0, null_draws=0)
    shard = sorted((run / "generations").glob("*.parquet"))[0]
    later = shard.stat().st_mtime + 60
    os.utime(shard, (later, later))
    summary = build_report(run).summary
    assert [b["budget"] for b in summary["budgets"]] == [2.0, 3.0]
