"""Generation runs scored beyond ROUGE: stop strings in the engine, the gsm8k job's exact-match columns,
`lm_eval:gsm8k` against the named job, and a user's scorer on the workers (its failure, its identity)."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import ray

from pipeline.data.adapters import DatasetSpec, load_examples, load_records
from pipeline.generation.configs import build_configs
from pipeline.generation.engine import generate
from pipeline.generation.exact_match import EXACT_MATCH_COLUMNS, GSM8K_FILTERS, gsm8k_exact_match
from pipeline.generation.models import load_model
from pipeline.generation.stops import StopStrings, cut_at_stops
from pipeline.run.executor import RunError
from pipeline.run.job import load_job
from pipeline.run.runner import run_job
from tiny_models import save_tiny

DATA = Path(os.environ.get("DYNORACLE_DATA_DIR") or Path(__file__).resolve().parents[2] / "shared" / "data")
GSM8K = DATA / "gsm8k"
TEST_PID = os.getpid()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return save_tiny("llama", tmp_path_factory.mktemp("models") / "llama")


def test_stop_strings_end_rows_where_their_text_first_holds_one(tiny) -> None:
    """Against the same greedy decode without stops: each stopped row is the shortest prefix whose text holds
    the stop string (rows without it run on unchanged)."""
    lm = load_model(str(tiny), "float32", "cpu")
    prompts = [list(ex.prompt_ids) for ex in load_examples(DatasetSpec("gsm8k", num_fewshot=0, limit=3), lm.tokenizer)]
    configs = build_configs(lm.num_layers, ("uls",), (0,))
    free = generate(lm, prompts, configs, 12, ignore_eos=True)
    stop = free[1][0].text[3:6]  # a string the first configuration's output of prompt 1 spells mid-way
    assert stop.strip() and len(free[1][0].token_ids) == 12
    stopped = generate(lm, prompts, configs, 12, ignore_eos=True, stop=StopStrings(lm.tokenizer, [stop]))
    hits = 0
    for per_free, per_stopped in zip(free, stopped):
        for a, b in zip(per_free, per_stopped):
            ends = [t for t in range(1, 13) if stop in lm.tokenizer.decode(a.token_ids[:t], skip_special_tokens=True)]
            assert b.token_ids == a.token_ids[: ends[0] if ends else 12]
            hits += bool(ends)
    assert hits >= 1
    assert cut_at_stops(free[1][0].text, [stop]) == (free[1][0].text.split(stop)[0], True)
    assert cut_at_stops("no stop", ["Question:", ""]) == ("no stop", False)


def test_lm_eval_gsm8k_gives_the_named_jobs_prompts_targets_and_scores(monkeypatch) -> None:
    lm_eval = pytest.importorskip("lm_eval.tasks")
    from pipeline.data import lm_eval_tasks
    from pipeline.data.lm_eval_tasks import lm_eval_columns, lm_eval_scores, lm_eval_until

    ours = load_records(DatasetSpec("gsm8k", limit=6, data_dir=str(DATA)))
    theirs = load_records(DatasetSpec("lm_eval", task="gsm8k", path=str(GSM8K / "test.jsonl"),
                                      fewshot_path=str(GSM8K / "train_sample.jsonl"), limit=6))
    assert [r.plain_prompt for r in theirs] == [r.plain_prompt for r in ours]
    assert [r.references for r in theirs] == [r.references for r in ours]
    assert ours[0].plain_prompt.count("Question: ") == 6 and ours[0].plain_prompt.endswith("\nAnswer:")
    assert lm_eval_until("gsm8k") == ("Question:", "</s>", "<|im_end|>")
    assert lm_eval_columns("gsm8k") == EXACT_MATCH_COLUMNS
    outputs = [[f"#### {r.reference.split('#### ')[-1]}", "It is $1,000.", ""] for r in ours]
    flat = [out for per in outputs for out in per]
    assert lm_eval_scores("gsm8k", [r.row for r in ours], outputs) == gsm8k_exact_match(
        flat, [r.reference for r in ours for _ in range(3)])

    # Every shard scores its own rows: the task's index (lm-eval's TaskManager) is built once per process.
    built = []

    class Counting(lm_eval.TaskManager):
        def __init__(self, *args, **kwargs):
            built.append(args)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(lm_eval, "TaskManager", Counting)
    lm_eval_tasks._manager.cache_clear()
    for _ in range(2):
        lm_eval_scores("gsm8k", [r.row for r in ours], outputs)
    lm_eval_tasks._manager.cache_clear()
    assert len(built) == 1


SCORERS = """
import os


def worker_pid(output, reference, row):
    \"\"\"Where it ran, and whether the output holds the question's final number.\"\"\"
    return {"scorer_pid": float(os.getpid()), "has_answer": float(reference.split("#### ")[-1] in output)}


def fails_on_outputs(output, reference, row):
    \"\"\"Passes the driver's trial (output = reference), raises on generated outputs.\"\"\"
    if output != reference:
        raise ZeroDivisionError(f"cannot score {len(output)} characters")
    return 1.0
"""


@pytest.fixture(scope="module")
def local_ray(tmp_path_factory):
    """A local Ray whose workers can import the user's scorer module (`user_scores`, on PYTHONPATH)."""
    folder = tmp_path_factory.mktemp("scorers")
    (folder / "user_scores.py").write_text(SCORERS)
    saved = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(folder), saved) if p)
    sys.path.insert(0, str(folder))
    if ray.is_initialized():
        ray.shutdown()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    yield
    ray.shutdown()
    sys.path.remove(str(folder))
    if saved is None:
        del os.environ["PYTHONPATH"]
    else:
        os.environ["PYTHONPATH"] = saved


def job(tiny: Path, tmp_path: Path, name: str, scorer: str) -> Path:
    path = tmp_path / f"{name}.toml"
    path.write_text(f"""
name = "{name}"
model = "{tiny}"
dtype = "float32"
families = ["uls"]
config_ids = ["uls-2"]
max_new_tokens = 8
shard_size = 2
workers = 1
scorer = "{scorer}"
stop = ["e"]

[dataset]
name = "gsm8k"
num_fewshot = 0
limit = 3
data_dir = "{DATA}"
""")
    return path


def test_user_scorer_runs_on_workers_fails_in_one_line_and_is_part_of_the_identity(local_ray, tiny, tmp_path):
    spec = load_job(job(tiny, tmp_path, "scored", "user_scores:worker_pid"), overrides={"out": str(tmp_path / "a")})
    run_job(spec)
    resumed = run_job(spec)  # the same job resumes: nothing to compute
    assert (resumed.skipped, resumed.computed) == (2, 0)
    record = json.loads((tmp_path / "a" / "run.json").read_text())
    assert record["metric_columns"] == [*EXACT_MATCH_COLUMNS, "scorer_pid", "has_answer"]
    assert record["identity"]["answers"]["scorer"] == "user_scores:worker_pid"
    rows = pq.read_table(tmp_path / "a" / "generations").to_pylist()
    assert len(rows) == 6 and {row["config_id"] for row in rows} == {"full", "uls-2"}
    for row in rows:
        assert row["scorer_pid"] != TEST_PID  # scored in a worker process
        assert row["has_answer"] == float(row["reference"].split("#### ")[-1] in row["output"])
        assert "e" not in row["output"]  # cut at the stop string
        expected = [float(f.extract(row["output"]) == row["reference"].split("#### ")[-1]) for f in GSM8K_FILTERS]
        assert [row[c] for c in EXACT_MATCH_COLUMNS] == expected

    assert any(row["finish_reason"] == "stop" for row in rows)

    other = load_job(job(tiny, tmp_path, "scored", "user_scores:fails_on_outputs"),
                     overrides={"out": str(tmp_path / "a")})
    with pytest.raises(ValueError, match="holds a different job .*answers"):
        run_job(other)
    with pytest.raises(RunError) as failure:
        run_job(load_job(job(tiny, tmp_path, "failing", "user_scores:fails_on_outputs"),
                         overrides={"out": str(tmp_path / "b")}))
    message = str(failure.value)  # at once, not after retries: the shard's first output fails
    assert "\n" not in message and message.startswith(
        "shard 0: ScorerError: scorer user_scores:fails_on_outputs raised on row gsm8k-test-000000 (config full): "
        "ZeroDivisionError: cannot score ")
