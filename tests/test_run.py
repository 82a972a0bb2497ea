"""`dynoracle run` with real Ray on a tiny slice: rows, faults (a worker, the driver), resume, lock, corruption.

Every run here is the same job (6 Alpaca sequences, 4 configurations, 6 new tokens, 3 shards of 2, two
CPU workers, float32), so every run folder must end up with exactly the reference run's rows.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.data.adapters import load_examples, shard_examples
from pipeline.generation.configs import full_config
from pipeline.generation.engine import generate
from pipeline.generation.models import load_model
from pipeline.generation.scoring import sentence_splitter
from pipeline.run.job import load_job
from pipeline.run.rundir import GENERATIONS_SCHEMA, RunDir
from pipeline.run.runner import run_job

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("DYNORACLE_DATA_DIR") or REPO.parent / "shared" / "data")
CLI = [sys.executable, "-m", "pipeline.cli", "run"]
CONFIG_IDS = ("full", "uls-15", "ee-10", "rls-8-s0")
SEQUENCES, SHARDS = 6, 3
JOB = f"""
name = "tiny"
dtype = "float32"
families = ["uls", "ee", "rls"]
config_ids = ["uls-15", "ee-10", "rls-8-s0"]
max_new_tokens = 6
batch_size = 2
shard_size = 2
workers = 2

[dataset]
name = "alpaca"
limit = {SEQUENCES}
data_dir = "{DATA}"
"""


@pytest.fixture(scope="module")
def job_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("jobs") / "tiny.toml"
    path.write_text(JOB)
    return path


def read_rows(run_dir: Path) -> list[dict]:
    table = pq.read_table(run_dir / "generations")
    assert table.schema.equals(GENERATIONS_SCHEMA, check_metadata=False)
    return sorted(table.to_pylist(), key=lambda row: (row["seq_id"], row["config_id"]))


@pytest.fixture(scope="module")
def reference(local_ray, job_file, tmp_path_factory) -> tuple[Path, list[dict]]:
    """One undisturbed run that every other run is compared with."""
    out = tmp_path_factory.mktemp("runs") / "reference"
    summary = run_job(load_job(job_file, overrides={"out": str(out)}))
    assert (summary.shards, summary.computed, summary.skipped) == (SHARDS, SHARDS, 0)
    return out, read_rows(out)


def test_rows_match_engine(reference, job_file):
    out, rows = reference
    assert len(rows) == SEQUENCES * len(CONFIG_IDS)
    pairs = {(row["seq_id"], row["config_id"]) for row in rows}
    assert len(pairs) == len(rows)
    assert {config for _, config in pairs} == set(CONFIG_IDS)
    assert sorted(pq.read_table(out / "configs.parquet").column("config_id").to_pylist()) == sorted(CONFIG_IDS)
    record = json.loads((out / "run.json").read_text())
    assert record["finished"] and record["rows"] == len(rows) and record["shards"] == SHARDS

    spec = load_job(job_file)
    lm = load_model(spec.model, "float32", "cpu")
    shards = shard_examples(load_examples(spec.dataset, lm.tokenizer), spec.shard_size)
    full = {row["seq_id"]: row for row in rows if row["config_id"] == "full"}
    for index, examples in enumerate(shards):
        direct = generate(lm, [list(ex.prompt_ids) for ex in examples], [full_config(lm.num_layers)],
                          spec.max_new_tokens)
        for ex, (gen,) in zip(examples, direct):
            row = full[ex.seq_id]
            assert (row["output"], row["gen_tokens"], row["finish_reason"], row["shard"]) == (
                gen.text, gen.gen_tokens, gen.finish_reason, index)
            assert row["fidelity"] == 1.0 and row["cost"] == lm.num_layers and row["reference"] == ex.reference


def test_worker_killed_mid_shard(reference, job_file, tmp_path, capsys):
    killed: list[int] = []

    def kill_newest_shard_worker(dispatcher) -> None:
        busy = dispatcher.busy()
        if not killed and busy:
            killed.append(busy[max(busy)]["pid"])
            os.kill(killed[0], signal.SIGKILL)

    summary = run_job(load_job(job_file, overrides={"out": str(tmp_path / "run")}), on_dispatch=kill_newest_shard_worker)
    assert killed and "shard requeued" in capsys.readouterr().err
    assert summary.computed == SHARDS
    assert read_rows(tmp_path / "run") == reference[1]


def _shard_files(run_dir: Path) -> list[Path]:
    return sorted((run_dir / "generations").glob("shard=*.parquet"))


def _wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def test_driver_killed_then_resumed_and_second_run_refused(reference, job_file, tmp_path):
    """The driver killed is a CLI process; the refused second run and the resume are the same command in-process
    (on this module's Ray)."""
    out = tmp_path / "run"
    command = [*CLI, "--job", str(job_file), "--out", str(out)]
    first = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lock = out / ".lock"
        _wait_for(lambda: lock.is_file() and lock.read_text().strip() == str(first.pid), 120, "the run to lock")
        second = CliRunner().invoke(app, command[len(CLI) - 1:])
        assert second.exit_code == 2
        assert second.stderr.strip() == f"error: run folder {out} is in use by another dynoracle run (pid {first.pid})"
        _wait_for(lambda: _shard_files(out) or first.poll() is not None, 180, "the first shard file")
        first.send_signal(signal.SIGKILL)
        first.wait(30)
    finally:
        if first.poll() is None:
            first.kill()
    present = len(_shard_files(out))  # only the driver writes shard files, so none can appear from now on
    assert 1 <= present < SHARDS

    rerun = CliRunner().invoke(app, command[len(CLI) - 1:])
    assert rerun.exit_code == 0, rerun.output
    assert f"generations: {present} of {SHARDS} shards already complete (skipped), computing {SHARDS - present}" in rerun.stderr
    assert f"next: dynoracle reduce {out} --match-full" in rerun.stdout
    assert read_rows(out) == reference[1]


def test_corrupt_shards_regenerated_and_other_job_refused(reference, job_file, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(reference[0], out)
    run = RunDir(out)
    truncated, garbled = run.shard_path(1), run.shard_path(2)
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2])
    data = bytearray(garbled.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 64] = bytes(b ^ 0xFF for b in data[middle : middle + 64])
    garbled.write_bytes(bytes(data))
    (out / "generations" / ".shard=00000.parquet.x.tmp").write_bytes(b"half")

    with pytest.raises(ValueError, match="holds a different job"):
        run_job(load_job(job_file, overrides={"out": str(out), "max_new_tokens": 5}))
    assert garbled.read_bytes() == bytes(data)  # a refused run touches nothing

    summary = run_job(load_job(job_file, overrides={"out": str(out)}))
    err = capsys.readouterr().err
    assert "shard 00001: unreadable" in err and "shard 00002:" in err
    assert (summary.skipped, summary.computed) == (1, 2)
    assert not list((out / "generations").glob(".*.tmp"))
    assert read_rows(out) == reference[1]


def test_a_run_that_fails_before_writing_leaves_no_folder(tmp_path):
    fresh, existing = RunDir(tmp_path / "fresh"), RunDir(tmp_path / "existing")
    existing.root.mkdir()
    for run in (fresh, existing):
        with pytest.raises(RuntimeError, match="cluster unreachable"), run.lock():
            raise RuntimeError("cluster unreachable")
    assert not fresh.root.exists()
    assert existing.root.is_dir()  # a folder the user had is never removed

    with fresh.lock():
        (fresh.root / "run.json").write_text("{}")
    assert (fresh.root / "run.json").is_file()  # a folder the run wrote into stays


def test_scoring_recorded_and_a_resume_with_other_scoring_refused(reference, job_file, tmp_path, capsys):
    record = json.loads((reference[0] / "run.json").read_text())
    assert record["scoring"] == {"stemming": True, "sentence_split": False, "tokenizer": "default",
                                 "sentence_splitter": None}
    assert record["identity"]["scoring"] == {"stemming": True, "sentence_split": None, "tokenizer": "default"}
    with pytest.raises(ValueError, match=r"holds a different job \(scoring differ\)"):
        run_job(load_job(job_file, overrides={"out": str(reference[0]), "scoring": {"stemming": False}}))

    rows = [{"q": "Какая столица России?", "a": "Москва — столица России."}, {"q": "中国的首都是哪里？", "a": ["北京。", "北京是首都。"]}]
    data = tmp_path / "world.jsonl"
    data.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    out = tmp_path / "world"
    job = {"name": "world", "out": str(out), "dtype": "float32", "families": ["ee"], "config_ids": ["ee-10"],
           "max_new_tokens": 2, "shard_size": 2, "workers": 1,
           "dataset": {"name": "file", "path": str(data), "prompt_column": "q", "reference_column": "a", "limit": 2},
           "scoring": {"stemming": False, "sentence_split": True, "tokenizer": "unicode"}}
    run_job(load_job(job_file, overrides=job))
    assert "warning" not in capsys.readouterr().err
    record = json.loads((out / "run.json").read_text())
    assert record["scoring"] == {"stemming": False, "sentence_split": True, "tokenizer": "unicode",
                                 "sentence_splitter": sentence_splitter()}
    table = pq.read_table(out / "generations").to_pylist()
    assert sorted(row["reference"] for row in table) == sorted([rows[0]["a"]] * 2 + [json.dumps(rows[1]["a"], ensure_ascii=False)] * 2)

    job["scoring"]["tokenizer"] = "default"
    with pytest.raises(ValueError, match=r"holds a different job \(scoring differ\)"):
        run_job(load_job(job_file, overrides=job))
    warning = capsys.readouterr().err
    assert "warning: 2 of 2 references (first world-000000) are mostly outside [a-z0-9]" in warning
    assert 'set tokenizer = "unicode" in [scoring]' in warning


def test_sigterm_stops_like_ctrl_c(job_file, tmp_path):
    """SIGTERM (a scheduler's stop) ends the run with one line and code 130; what is on disk is whole."""
    out, log_file = tmp_path / "run", tmp_path / "stderr.log"
    with log_file.open("w") as err_handle:
        run = subprocess.Popen([*CLI, "--job", str(job_file), "--out", str(out)], cwd=REPO, stdout=subprocess.PIPE,
                               stderr=err_handle, text=True)
        try:  # Ray is up and the workers are starting: the moment a stop used to end in Ray's stack dump
            _wait_for(lambda: "starting 2 CPU workers" in log_file.read_text() or run.poll() is not None, 600,
                      "the run to start its workers")
            run.send_signal(signal.SIGTERM)
            run.wait(300)
        finally:
            if run.poll() is None:
                run.kill()
    err = log_file.read_text()
    assert run.returncode == 130, err
    assert err.strip().splitlines()[-1] == ("error: interrupted; the shard files written so far are whole: rerun the "
                                            "same command to resume")
    assert "Traceback" not in err
    assert not list(out.rglob(".*.tmp"))
    for shard in _shard_files(out):
        assert pq.read_table(shard, page_checksum_verification=True).num_rows == 2 * len(CONFIG_IDS)
