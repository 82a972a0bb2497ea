"""`dynoracle reduce` on run folders written by hand: the Parquet contract, the numbers, the errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from handmade_run import write_run
from typer.testing import CliRunner

from pipeline.analysis.oracle import allocate, build_frontier, min_budget_to_match
from pipeline.analysis.reduce import reduce_run
from pipeline.cli import app

L = 4
CONFIGS = [("full", "full", 4, 4)] + [(f"{f}-{c}", f, c, c) for f in ("uls", "ee") for c in range(1, L)]
IDS = [c[0] for c in CONFIGS]
COSTS = np.array([c[3] for c in CONFIGS], dtype=float)
METRIC_COLUMNS = ("rouge1", "rouge2", "rougeL", "rougeLsum", "fidelity")


def make_run(root: Path, scores: np.ndarray, tokens: np.ndarray | None = None, per_token: np.ndarray | None = None,
             drop: int = 0, duplicate: int = 0) -> Path:
    """A run folder with configs.parquet and one shard; scores[n, k] is sequence n under CONFIGS[k]."""
    n = scores.shape[0]
    tokens = np.full(scores.shape, 5) if tokens is None else tokens
    per_token = np.broadcast_to(COSTS, scores.shape) if per_token is None else per_token
    root.mkdir(parents=True)
    pq.write_table(
        pa.table(
            {
                "config_id": IDS,
                "family": [c[1] for c in CONFIGS],
                "budget": [c[2] for c in CONFIGS],
                "layers": pa.array([list(range(c[3])) for c in CONFIGS], pa.list_(pa.int16())),
                "cost": [c[3] for c in CONFIGS],
            }
        ),
        root / "configs.parquet",
    )
    seq, cfg = np.meshgrid(np.arange(n), np.arange(len(IDS)), indexing="ij")
    seq, cfg = seq.ravel(), cfg.ravel()
    keep = np.arange(seq.size)[drop:]
    keep = np.concatenate([keep, keep[:duplicate]])
    seq, cfg = seq[keep], cfg[keep]
    rows = {
        "seq_id": [f"s{i:03d}" for i in seq],
        "shard": np.zeros(seq.size, dtype=np.int64),
        "config_id": [IDS[k] for k in cfg],
        "family": [CONFIGS[k][1] for k in cfg],
        "cost": COSTS[cfg].astype(np.int64),
        "prompt_tokens": np.full(seq.size, 12),
        "prompt_truncated": np.zeros(seq.size, dtype=bool),
        "gen_tokens": tokens[seq, cfg],
        "finish_reason": ["eos"] * seq.size,
        "output": ["text"] * seq.size,
        "reference": ["ref"] * seq.size,
        **{m: scores[seq, cfg] for m in METRIC_COLUMNS},
        "layers_per_token": per_token[seq, cfg],
    }
    write_run(root, {"model": "toy-lm", "max_new_tokens": 5}, [pa.table(rows)])
    return root


@pytest.fixture
def scores() -> np.ndarray:
    rng = np.random.default_rng(5)
    return rng.random((40, len(IDS))).round(2) + 0.1 * COSTS  # deeper is better on average


def invoke(*args: str):
    return CliRunner().invoke(app, ["reduce", *map(str, args)])


def test_reduce_writes_the_contract_and_prints_the_oracle_minimal_budget(tmp_path: Path, scores: np.ndarray) -> None:
    run = make_run(tmp_path / "run", scores)
    result = invoke(run, "--budget", "2.5", "--budget", "1.75")
    assert result.exit_code == 0, result.output

    frontier = build_frontier(scores, COSTS)  # the matrix as built here, independently of the reducer's pivot
    expected = min_budget_to_match(frontier, scores[:, 0].mean())
    assert expected is not None
    summary = json.loads((run / "oracle" / "rougeL" / "summary.json").read_text())
    (lo, hi), (mlo, mhi) = summary["full_mean_interval"], summary["min_budget_interval"]
    line = (f"minimal budget matching full model (mean {scores[:, 0].mean():.4f}, 95% CI {lo:.4f}-{hi:.4f}): "
            f"{expected:.6g} layers of 4 ({expected / 4:.1%}); 95% CI {mlo:.4g}-{mhi:.4g} layers, 1000 paired "
            "resamples, seed 0")
    assert line in result.output

    out = run / "oracle" / "rougeL"
    table = pq.read_table(out / "frontier.parquet")
    assert table.schema.names == ["budget", "value", "value_lo", "value_hi", "lp_bound", "gap", "kind", "shares"]
    shares = pa.list_(pa.struct([("config_id", pa.string()), ("share", pa.float64())]))
    assert [f.type for f in table.schema] == [pa.float64()] * 6 + [pa.string(), shares]
    rows = table.to_pylist()
    assert {r["kind"] for r in rows} == {"grid", "requested", "match_full"}
    assert [r["budget"] for r in rows if r["kind"] == "match_full"] == [expected]
    assert [r["budget"] for r in rows if r["kind"] == "grid"] == [1 + 0.25 * i for i in range(13)]
    for r in rows:
        a = allocate(frontier, r["budget"])
        assert (r["value"], r["lp_bound"], r["gap"]) == pytest.approx((a.value, a.lp_bound, a.gap), abs=1e-12)
        assert all(s["share"] > 0 for s in r["shares"])
        assert sum(s["share"] for s in r["shares"]) == pytest.approx(1.0)

    alloc = pq.read_table(out / "allocations.parquet")
    assert alloc.schema.names == ["budget", "seq_id", "config_id"]
    assert [alloc.schema.field(c).type for c in alloc.schema.names] == [pa.float64(), pa.string(), pa.string()]
    frame = alloc.to_pandas()
    assert sorted(frame["budget"].unique()) == sorted({1.0, 1.75, 2.0, 2.5, 3.0, 4.0, expected})
    for budget, group in frame.groupby("budget"):
        assert len(group) == scores.shape[0] and group["seq_id"].is_unique
        k = np.array([IDS.index(c) for c in group.sort_values("seq_id")["config_id"]])
        assert COSTS[k].mean() <= budget + 1e-12
        value = scores[np.arange(scores.shape[0]), k].mean()
        assert value == pytest.approx(allocate(frontier, budget).value, abs=1e-12)

    summary = json.loads((out / "summary.json").read_text())
    assert summary["min_budget_to_match"] == expected
    assert summary["min_budget_fraction"] == pytest.approx(expected / 4)
    assert (summary["num_sequences"], summary["num_configs"], summary["num_layers"]) == (40, 7, 4)
    assert [b["budget"] for b in summary["budgets"]] == [1.75, 2.5]


def test_reduce_json_families_and_metric(tmp_path: Path, scores: np.ndarray) -> None:
    run = make_run(tmp_path / "run", scores)
    result = invoke(run, "--families", "uls", "--metric", "fidelity", "--json", "--tolerance", "0.01")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary == json.loads((run / "oracle" / "fidelity+families=uls" / "summary.json").read_text())
    assert summary["families"] == ["full", "uls"] and summary["num_configs"] == 4
    uls = [0, 1, 2, 3]  # full, uls-1, uls-2, uls-3
    assert summary["min_budget_to_match"] == min_budget_to_match(
        build_frontier(scores[:, uls], COSTS[uls]), scores[:, 0].mean(), 0.01
    )
    used = set(pq.read_table(run / "oracle" / "fidelity+families=uls" / "allocations.parquet")["config_id"].to_pylist())
    assert used <= {"full", "uls-1", "uls-2", "uls-3"}


def test_measured_cost_is_the_token_weighted_layers_per_token(tmp_path: Path, scores: np.ndarray) -> None:
    n = scores.shape[0]
    tokens = np.tile(np.arange(1, n + 1)[:, None], (1, len(IDS)))
    per_token = COSTS + (np.arange(n)[:, None] % 2) * 0.5  # odd sequences spend half a layer more per token
    run = make_run(tmp_path / "run", scores, tokens=tokens, per_token=per_token)
    result = reduce_run(run, cost="measured", match_full=False)
    weighted = (per_token * tokens).sum(axis=0) / tokens.sum(axis=0)
    grid = [r.budget for r in result.rows if r.kind == "grid"]
    assert grid[0] == pytest.approx(weighted.min()) and grid[-1] == pytest.approx(weighted.max())
    assert result.summary["num_layers"] == pytest.approx(weighted[0])
    assert result.summary["min_budget_to_match"] is None and result.summary["cost_mode"] == "measured"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["{missing}"], "does not exist"),
        (["{bare}"], "bare is incomplete: 1 of 1 shard files missing (first shard=00000.parquet); finish it with"),
        (["{bare}", "--partial"], "bare has no shard files yet"),
        (["{run}", "--metric", "bleu"], "unknown metric 'bleu'"),
        (["{run}", "--families", "uls,xx"], "unknown family xx"),
        (["{run}", "--budget", "0.5"], "below the cheapest"),
        (["{run}", "--cost", "wall"], "unknown cost mode"),
    ],
)
def test_errors_are_one_line_exit_2_and_write_nothing(
    tmp_path: Path, scores: np.ndarray, args: list[str], message: str
) -> None:
    run = make_run(tmp_path / "run", scores)
    bare = tmp_path / "bare"  # configs but not one shard yet
    (bare / "generations").mkdir(parents=True)
    for name in ("configs.parquet", "run.json"):
        (bare / name).write_bytes((run / name).read_bytes())
    result = invoke(*(a.format(run=run, bare=bare, missing=tmp_path / "nope") for a in args))
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.output
    assert not (run / "oracle").exists() and not (bare / "oracle").exists()


@pytest.mark.parametrize(
    ("drop", "duplicate", "message"),
    [
        (3, 0, "3 of 40 x 7 (sequence, configuration) pairs are missing"),
        (0, 2, "2 of 40 x 7 (sequence, configuration) pairs appear more than once"),
    ],
)
def test_incomplete_or_duplicated_generations_are_refused(
    tmp_path: Path, scores: np.ndarray, drop: int, duplicate: int, message: str
) -> None:
    run = make_run(tmp_path / "run", scores, drop=drop, duplicate=duplicate)
    result = invoke(run)
    assert result.exit_code == 2 and result.output.strip() == f"error: {message}"
    assert not (run / "oracle").exists()
