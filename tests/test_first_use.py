"""What a new user hits first: a wrong model path, a job of custom sets only, Ray's start-up on a finished run.

Each error is one line naming what was asked for and where it was looked for, and leaves no run folder.
"""

from __future__ import annotations

import os
from pathlib import Path

import huggingface_hub.constants
import pytest
from tiny_models import save_tiny

from pipeline.generation.models import load_config
from pipeline.run import runner
from pipeline.run.job import job_from_dict
from pipeline.run.runner import run_job

DATA = os.environ.get("DYNORACLE_DATA_DIR") or str(Path(__file__).resolve().parents[2] / "shared" / "data")


def _job(out: Path, model: str | Path, **fields):
    return job_from_dict({"name": "t", "model": str(model), "dtype": "float32", "families": ["uls"],
                          "config_ids": ["uls-2"], "max_new_tokens": 2, "batch_size": 2, "shard_size": 1,
                          "workers": 1, "dataset": {"name": "alpaca", "limit": 2, "data_dir": DATA},
                          "out": str(out), **fields})


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return save_tiny("llama", tmp_path_factory.mktemp("model") / "tiny")


@pytest.fixture
def offline(monkeypatch):
    """The hub answers at once (no network retries): a name that is not a folder is looked up and not found."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def test_a_missing_model_path_is_one_line_naming_it_and_where_it_was_looked_for(tmp_path, monkeypatch, offline):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError) as caught:
        run_job(_job(tmp_path / "run", "./nosuchmodel"))
    message = str(caught.value)
    assert message.startswith(f"model ./nosuchmodel: no folder or file at {tmp_path / 'nosuchmodel'};")
    assert "dynoracle finetune" in message and "\n" not in message and "Repo id" not in message
    assert not (tmp_path / "run").exists()
    with pytest.raises(FileNotFoundError, match=r"^model org/nothing: no folder or file at .*org/nothing, and not "
                                                r"found as a Hugging Face hub id") as caught:
        load_config("org/nothing")
    assert "couldn't connect" not in str(caught.value)


def test_a_missing_checkpoint_names_its_table_entry(tiny, tmp_path, monkeypatch, offline):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError) as caught:
        run_job(_job(tmp_path / "run", tiny, checkpoints={"uls-2": "ft/nope"}))
    message = str(caught.value)
    assert message.startswith(f"[checkpoints] uls-2: model ft/nope: no folder or file at {tmp_path / 'ft' / 'nope'}")
    assert "\n" not in message and "huggingface.co" not in message and not (tmp_path / "run").exists()


def test_families_empty_runs_only_the_custom_sets_and_full():
    spec = job_from_dict({"dataset": {"name": "alpaca"}, "families": [], "configs": {"mine": [0, 2]}})
    assert [(c.config_id, c.layers) for c in spec.configurations(4)] == [("full", (0, 1, 2, 3)), ("mine", (0, 2))]
    with pytest.raises(ValueError, match="families is empty and the job has no \\[configs\\]"):
        job_from_dict({"dataset": {"name": "alpaca"}, "families": []})


def test_a_finished_run_reruns_without_starting_ray_and_ray_starts_quietly(tiny, tmp_path, monkeypatch, capfd):
    out = tmp_path / "run"
    first = run_job(_job(out, tiny))  # a private Ray, started and shut down by the run
    assert first.computed == 2 and "Token authentication" not in capfd.readouterr().err

    def no_ray(address):
        raise AssertionError("Ray started")

    monkeypatch.setattr(runner, "ray_session", no_ray)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != ".lock"}
    again = run_job(_job(out, tiny))
    assert (again.shards, again.skipped, again.computed, again.rows) == (2, 2, 0, 4)
    assert "nothing to compute (Ray not started)" in capfd.readouterr().err
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != ".lock"} == before
    os.utime(tiny / "config.json")  # weights changed since: only a worker can tell, so Ray starts
    with pytest.raises(AssertionError, match="Ray started"):
        run_job(_job(out, tiny))
