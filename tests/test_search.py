"""Per-sequence search: the pure policy (determinism for a seed, budget, cost cap, a score-blind null) and
`dynoracle search` on a tiny float32 Llama with real Ray (rows of a search run, resumption after a kill,
the stored program is what produced each row), on a generation run and on a multiple-choice run (each
searched row's log-likelihoods are its stored program's, run literally without a cache)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import ray
import torch
from tiny_models import save_tiny, tiny_llama

from pipeline.analysis.reduce import reduce_run
from pipeline.data.adapters import DatasetSpec, load_examples
from pipeline.generation.choice_task import ChoiceTask, choice_metrics
from pipeline.generation.configs import CUSTOM, SkipConfig
from pipeline.generation.engine import generate
from pipeline.generation.models import load_model
from pipeline.generation.reference import program_loglik
from pipeline.report.figures import build_report
from pipeline.run.job import job_from_dict
from pipeline.run.runner import run_job
from pipeline.search.evaluate import ChoiceEvaluator
from pipeline.search.policy import ARMS, SearchSpec, propose, slot_costs
from pipeline.search.run import prepare_search, run_search, search_report
from pipeline.search.task import PROGRAMS_KEY, read_programs

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


def _table(folder: Path, task_folder: str = "generations") -> list[dict]:
    return sorted(pq.read_table(folder / task_folder).to_pylist(), key=lambda r: (r["seq_id"], r["config_id"]))


def _stored_programs(folder: Path, task_folder: str = "generations") -> dict[tuple[str, str], tuple[int, ...]]:
    programs = {}
    for shard in sorted((folder / task_folder).glob("shard=*.parquet")):
        programs.update(read_programs(shard))
    return programs


def _assert_literal_logliks(lm, example, row: dict, program: tuple[int, ...], prefill: str) -> None:
    """A choice row's log-likelihoods are its program's, run literally without a cache, and its metrics theirs."""
    expected = [program_loglik(lm, list(ctx), list(cont), program, prefill) for ctx, cont in example.requests]
    np.testing.assert_allclose(row["loglik"], expected, rtol=0, atol=1e-5, err_msg=str(program))
    metrics = choice_metrics(np.array(row["loglik"]), np.array(row["choice_chars"]), np.array(row["choice_bytes"]),
                             row["gold"])
    assert {key: row[key] for key in metrics} == metrics


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
    programs = _stored_programs(first)
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


ARC = DatasetSpec("arc_easy", limit=3, data_dir=DATA)


@pytest.fixture
def one_thread():
    """One torch thread for the many tiny in-process forwards, which more threads only slow on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("prefill", ["full", "skip"])
def test_choice_evaluator_rows_are_literal_programs_and_subsets_are_choice_task_rows(prefill, one_thread):
    lm = tiny_llama(5, initializer_range=0.2)
    examples = load_examples(ARC, lm.tokenizer)
    programs = [(0, 2, 4), (0, 1, 1, 3), (2, 0, 4, 1)]
    pairs = [(i, SkipConfig(f"p{k}", CUSTOM, len(p), p)) for i in range(len(examples))
             for k, p in enumerate(programs) if (i + k) % 3 != 2]  # every question its own programs
    scores, table = ChoiceEvaluator(prefill, batch_size=2).evaluate(lm, 0, examples, None, pairs, "acc_norm")
    rows = table.to_pylist()
    assert [(r["seq_id"], r["config_id"]) for r in rows] == [(examples[i].seq_id, c.config_id) for i, c in pairs]
    assert scores == [r["acc_norm"] for r in rows]
    subset = pairs[0][1]
    direct = {r["seq_id"]: r for r in ChoiceTask((subset,), prefill, 2).run(lm, 0, examples).to_pylist()}
    for (i, cfg), row in zip(pairs, rows):
        _assert_literal_logliks(lm, examples[i], row, cfg.layers, prefill)
        if cfg == subset:  # a subset's row is ChoiceTask's row for it, field for field
            expected = direct[row["seq_id"]]
            np.testing.assert_allclose(row.pop("loglik"), expected.pop("loglik"), rtol=0, atol=1e-5)
            assert row == expected


@pytest.fixture(scope="module")
def choice_run(source_run) -> Path:
    _, model = source_run
    out = model.parent / "choice"
    run_job(job_from_dict({"name": "c", "model": str(model), "dtype": "float32", "families": ["uls", "ee"],
                           "prefill": "full", "batch_size": 2, "shard_size": 2, "workers": 1,
                           "dataset": {"name": "arc_easy", "limit": 3, "data_dir": DATA}, "out": str(out)}))
    return out


def test_search_on_a_choice_run_scores_programs_literally_within_budget_and_cap(source_run, choice_run, tmp_path,
                                                                              one_thread):
    _, model = source_run
    spec = SearchSpec(budget=4, width=2, cost_cap=3, seed=1)  # metric: the choice default, prob_gold
    folder, _ = run_search(choice_run, spec, tmp_path / "a")
    rows = _table(folder, "choices")
    enumerated = {(r["seq_id"], r["config_id"]): r for r in _table(choice_run, "choices")}
    assert len(rows) == len(enumerated) + 3 * 2 * spec.budget
    assert all(enumerated[r["seq_id"], r["config_id"]] == r for r in rows if r["family"] not in ARMS)
    programs = _stored_programs(folder, "choices")

    # Deterministic for a seed: the shard's task rerun here gives the worker's rows and programs exactly.
    lm = load_model(str(model), "float32", "cpu")
    prepared = prepare_search(choice_run, spec, tmp_path / "b")
    again = prepared.task.run(lm, 0, prepared.shards[0])
    assert again.to_pylist() == pq.read_table(folder / "choices" / "shard=00000.parquet").to_pylist()
    stored = pq.read_schema(folder / "choices" / "shard=00000.parquet").metadata
    assert again.schema.metadata[PROGRAMS_KEY] == stored[PROGRAMS_KEY]
    examples = {ex.seq_id: ex for ex in load_examples(ARC, lm.tokenizer)}
    searched = [r for r in rows if r["family"] in ARMS]
    for row in searched:
        program = programs[row["seq_id"], row["config_id"]]
        assert len(program) == row["cost"] <= spec.cost_cap
        _assert_literal_logliks(lm, examples[row["seq_id"]], row, program, "full")
    for seq in examples:
        for arm in ARMS:
            assert sum(r["seq_id"] == seq and r["family"] == arm for r in searched) == spec.budget

    # The union reduces and reports as a choice run (searched and random rows as families); the curve reads
    # prob_gold, the shares right = acc.
    assert reduce_run(folder, resamples=0).summary["metric"] == "acc"
    assert sorted(p.name for p in build_report(folder, "acc").figures) == ["cost_quality.png", "oracle_shares.png"]
    report = search_report(folder, budgets=(2.0,), resamples=20)
    assert set(report["curve"]["evaluated"]) == {0, 2, 4}
    shares = report["shares"]
    assert {(s["right_metric"], s["threshold"]) for s in shares.values()} == {("acc", 1.0)}
    full_acc = [r["acc"] for r in rows if r["config_id"] == "full"]
    assert all(s["right"] == sum(full_acc) and s["wrong"] == len(full_acc) - sum(full_acc) for s in shares.values())
    assert "prob_gold" in (folder / "run.json").read_text()
    with pytest.raises(ValueError, match=r"unknown metric 'rougeL' for .* \(a choice run\)"):
        run_search(choice_run, SearchSpec(budget=4, width=2, cost_cap=3, metric="rougeL"), tmp_path / "c")
    assert not (tmp_path / "c").exists()
