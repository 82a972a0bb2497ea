"""Per-sequence search: the pure policy (determinism for a seed, budget, cost cap, a score-blind null) and
`dynoracle search` on a tiny float32 Llama with real Ray (rows of a search run, resumption after a kill,
the stored program is what produced each row)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import ray
from tiny_models import save_tiny

from pipeline.analysis.reduce import reduce_run
from pipeline.data.adapters import load_examples
from pipeline.generation.configs import SkipConfig
from pipeline.generation.engine import generate
from pipeline.generation.models import load_model
from pipeline.run.job import job_from_dict
from pipeline.run.runner import run_job
from pipeline.search.policy import ARMS, SearchSpec, propose, slot_costs
from pipeline.search.run import run_search, search_report
from pipeline.search.task import read_programs

DATA = os.environ.get("DYNORACLE_DATA_DIR") or str(Path(__file__).resolve().parents[2] / "shared" / "data")
ENUMERATED = [((0, 1, 2, 3, 4, 5), 0.4), ((0, 2, 4), 0.3), ((0, 3), 0.1), ((0,), 0.0)]


def _all_rounds(spec: SearchSpec, arm: str, scores: list[float], num_layers: int = 6) -> list[tuple[int, ...]]:
    enumerated = [(p, s) for (p, _), s in zip(ENUMERATED, scores)]
    costs, evaluated = slot_costs(spec), []
    for r in range(spec.rounds):
        slots = costs[r * spec.width : (r + 1) * spec.width]
        children = propose(spec, arm, "seq-7", r, slots, num_layers, enumerated, evaluated)
        evaluated += [(c, float(len(set(c)))) for c in children]  # any score: the search reads it
    return [p for p, _ in evaluated]


def test_policy_is_deterministic_within_budget_and_cost_cap():
    spec = SearchSpec(budget=10, width=3, cost_cap=7, seed=3)
    scores = [s for _, s in ENUMERATED]
    for arm in ARMS:
        programs = _all_rounds(spec, arm, scores)
        assert programs == _all_rounds(spec, arm, scores)  # same seed, same programs
        assert len(programs) == spec.budget
        assert [len(p) for p in programs] == slot_costs(spec)  # each slot's exact cost, the same for both arms
        assert max(map(len, programs)) <= spec.cost_cap and all(0 in p and max(p) < 6 for p in programs)
        assert programs != _all_rounds(SearchSpec(10, 3, 7, seed=4), arm, scores)
    # The null never reads a score; the search does.
    reversed_scores = scores[::-1]
    assert _all_rounds(spec, "random", scores) == _all_rounds(spec, "random", reversed_scores)
    assert _all_rounds(spec, "search", scores) != _all_rounds(spec, "search", reversed_scores)
    with pytest.raises(ValueError, match="width"):
        SearchSpec(budget=2, width=3)


@pytest.fixture(scope="module")
def source_run(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("search")
    model = save_tiny("llama", root / "model", layers=4)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    job = job_from_dict({"name": "s", "model": str(model), "dtype": "float32", "families": ["uls", "ee"],
                         "max_new_tokens": 3, "batch_size": 3, "shard_size": 2, "workers": 1,
                         "dataset": {"name": "alpaca", "limit": 3, "data_dir": DATA}, "out": str(root / "src")})
    run_job(job)
    yield root / "src", model
    ray.shutdown()


def _table(folder: Path) -> list[dict]:
    return sorted(pq.read_table(folder / "generations").to_pylist(), key=lambda r: (r["seq_id"], r["config_id"]))


def test_search_run_rows_resume_and_stored_programs(source_run, tmp_path):
    source, model = source_run
    spec = SearchSpec(budget=4, width=2, cost_cap=5, seed=0)
    first, _ = run_search(source, spec, tmp_path / "a")
    rows = _table(first)
    enumerated = {(r["seq_id"], r["config_id"]): r for r in _table(source)}
    assert len(rows) == len(enumerated) + 3 * 2 * spec.budget
    assert all(enumerated[r["seq_id"], r["config_id"]] == r for r in rows if r["family"] not in ARMS)

    # A killed search (shard 1 never written, a half-written file left) reruns to exactly the same rows.
    (first / "generations" / "shard=00001.parquet").unlink()
    (first / "generations" / ".shard=00001.parquet.x1.tmp").write_bytes(b"half")
    again, done = run_search(source, spec, tmp_path / "a")
    assert (done.computed, done.skipped) == (1, 1) and _table(again) == rows
    assert _table(run_search(source, spec, tmp_path / "b")[0]) == rows  # an undisturbed second run
    with pytest.raises(ValueError, match="other settings"):
        run_search(source, SearchSpec(budget=4, width=2, cost_cap=5, seed=1), tmp_path / "a")

    # Every searched row is its stored program's output, within the cap, distinct per sequence and arm.
    programs = {}
    for shard in sorted((first / "generations").glob("shard=*.parquet")):
        programs.update(read_programs(shard))
    lm = load_model(str(model), "float32", "cpu")
    examples = {ex.seq_id: ex for ex in load_examples(job_from_dict(
        {"name": "s", "dataset": {"name": "alpaca", "limit": 3, "data_dir": DATA}}).dataset, lm.tokenizer)}
    searched = [r for r in rows if r["family"] in ARMS]
    for row in searched:
        program = programs[row["seq_id"], row["config_id"]]
        assert len(program) == row["cost"] <= spec.cost_cap
        cfg = SkipConfig(row["config_id"], row["family"], len(program), program)
        (gen,), = generate(lm, [list(examples[row["seq_id"]].prompt_ids)], [cfg], 3)
        assert gen.text == row["output"]
    for seq in examples:
        for arm in ARMS:
            mine = [programs[seq, r["config_id"]] for r in searched if r["seq_id"] == seq and r["family"] == arm]
            assert len(mine) == spec.budget

    # The union reduces like any run, and the curve starts from the enumerated oracle.
    reduce_run(first, budgets=(2.0,))
    report = search_report(first, budgets=(2.0,), resamples=50)
    frame = report["curve"]
    start = frame[frame["evaluated"] == 0]
    assert start["value"].nunique() == 1 and set(frame["evaluated"]) == {0, 2, 4}
    assert all(path.is_file() for path in report["files"])
