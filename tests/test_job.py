"""Job files and flags: defaults, overrides, one-line errors, and which fields make two runs different."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from pipeline.generation import models
from pipeline.generation.configs import build_configs
from pipeline.run.cluster import plan_workers
from pipeline.run.job import JOBS_DIR, load_job


@pytest.mark.parametrize("path", sorted(JOBS_DIR.glob("*.toml")), ids=lambda p: p.stem)
def test_shipped_jobs_load(path):
    spec = load_job(path)
    assert spec.run_dir == Path("outputs") / spec.name
    assert spec.to_dict()["dataset"]["name"] == spec.dataset.name


def test_dataset_default_job_and_overrides():
    spec = load_job(dataset="alpaca", overrides={"max_new_tokens": 8, "dataset": {"limit": 3, "data_dir": "/d"},
                                                  "families": "uls,ee", "name": "mine"})
    assert (spec.max_new_tokens, spec.dataset.limit, spec.dataset.data_dir) == (8, 3, "/d")
    assert spec.families == ("uls", "ee") and spec.out == "outputs/mine"
    assert load_job(dataset="alpaca", overrides={"out": "/tmp/x"}).run_dir == Path("/tmp/x")
    assert load_job(dataset="cnn_dailymail").dataset.prompt_budget == 512
    assert load_job(dataset="file", overrides={"dataset": {"path": "a.jsonl"}}).dataset.path == "a.jsonl"


@pytest.mark.parametrize("overrides, message", [
    ({"batch": 3}, "unknown job field batch"),
    ({"dataset": {"limt": 3}}, "unknown dataset field limt"),
    ({"families": ["uls", "xx"]}, "unknown family xx"),
    ({"shard_size": -1}, "shard_size must be a positive integer"),
    ({"max_new_tokens": 0}, "max_new_tokens must be a positive integer"),
    ({"workers": -2}, "workers must be a positive integer"),
    ({"rls_seeds": [-1]}, "rls_seeds must be non-negative"),
    ({"dataset": {"limit": -5}}, "dataset.limit must be a positive integer"),
    ({"dtype": "int8"}, "unknown dtype"),
    ({"prefill": "half"}, "unknown prefill"),
    ({"device": "tpu"}, "unknown device"),
    ({"scoring": {"stem": False}}, "unknown scoring field stem; known: sentence_split, stemming, tokenizer"),
    ({"scoring": {"tokenizer": "icu"}}, "unknown scoring.tokenizer 'icu'"),
])
def test_bad_fields_are_one_line_errors(overrides, message):
    with pytest.raises(ValueError, match=message) as info:
        load_job(dataset="alpaca", overrides=overrides)
    assert "\n" not in str(info.value)


def test_job_file_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_job(tmp_path / "none.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("name = \n")
    with pytest.raises(ValueError, match="bad.toml"):
        load_job(bad)
    with pytest.raises(ValueError, match="not both"):
        load_job(bad, dataset="alpaca")


def test_identity_ignores_speed_settings_and_order():
    base = load_job(dataset="alpaca")
    faster = load_job(dataset="alpaca", overrides={"batch_size": 1, "workers": 1, "max_rows": 64,
                                                   "families": "rls,ee,uls", "dataset": {"data_dir": "/x"}})
    assert base.identity() == faster.identity()
    assert base.identity() != load_job(dataset="alpaca", overrides={"max_new_tokens": 3}).identity()
    assert base.identity() != load_job(dataset="alpaca", overrides={"dataset": {"limit": 3}}).identity()
    for scoring in ({"stemming": False}, {"sentence_split": True}, {"tokenizer": "unicode"}):
        assert base.identity() != load_job(dataset="alpaca", overrides={"scoring": scoring}).identity()


def test_study_jobs_use_the_studys_settings():
    alpaca, cnn = load_job(JOBS_DIR / "study_opt_iml.toml"), load_job(JOBS_DIR / "study_opt_iml_cnn.toml")
    assert (alpaca.dataset.name, alpaca.dataset.split, alpaca.dataset.prompt_budget, alpaca.max_new_tokens) == (
        "alpaca", "test", 128, 300)
    assert (cnn.dataset.name, cnn.dataset.split, cnn.dataset.prompt_budget, cnn.max_new_tokens) == (
        "cnn_dailymail", "test", 1433, 200)
    for name in ("study_opt_iml", "study_opt_iml_cnn", "study_smollm2_alpaca", "study_smollm2_cnn"):
        scoring = load_job(JOBS_DIR / f"{name}.toml").scoring
        assert (scoring.stemming, scoring.tokenizer) == (False, "default")


def test_config_selection_keeps_full():
    configs = build_configs(30)
    spec = load_job(dataset="alpaca", overrides={"config_ids": ["uls-3", "ee-4"]})
    assert [c.config_id for c in spec.select_configs(configs)] == ["full", "uls-3", "ee-4"]
    with pytest.raises(ValueError, match="unknown config id uls-99"):
        load_job(dataset="alpaca", overrides={"config_ids": ["uls-99"]}).select_configs(configs)


def test_worker_plan_fits_each_node():
    cpu = load_job(dataset="alpaca", overrides={"workers": 2})
    one_node = plan_workers(cpu, [{"CPU": 8}])
    assert (one_node.count, one_node.num_cpus, one_node.threads, one_node.bundle) == (2, 4, 4, {"CPU": 4})
    # four 1-CPU nodes: a worker can never have 2 CPUs (the whole cluster's 4 / 2 workers)
    assert plan_workers(cpu, [{"CPU": 1}] * 4).threads == 1
    assert plan_workers(cpu, [{"CPU": 3}, {"CPU": 1}, {"CPU": 1}]).threads == 1
    assert plan_workers(cpu, [{"CPU": 6}, {"CPU": 2}]).threads == 3
    three = plan_workers(load_job(dataset="alpaca", overrides={"workers": 3}), [{"CPU": 1}] * 2)
    assert (three.threads, three.fits([{"CPU": 1}] * 2), three.fits([{"CPU": 1}] * 3)) == (1, False, True)
    gpu = plan_workers(dataclasses.replace(cpu, workers=None), [{"CPU": 4}, {"CPU": 16, "GPU": 3}])
    assert (gpu.count, gpu.device, gpu.bundle) == (3, "cuda", {"CPU": 1, "GPU": 1})
    assert plan_workers(cpu, [{"CPU": 16, "GPU": 3}]).count == 2
    study = plan_workers(load_job(JOBS_DIR / "study_opt_iml.toml"), [{"CPU": 4}])  # GPU nodes not up yet
    assert (study.count, study.device, study.fits([{"CPU": 4}]), study.fits([{"CPU": 4, "GPU": 1}] * 4)) == (
        4, "cuda", False, True)
    with pytest.raises(ValueError, match="no GPUs yet"):
        plan_workers(dataclasses.replace(cpu, device="cuda", workers=None), [{"CPU": 4}])


@pytest.mark.parametrize("flags, expected", [("fpu sse avx2", "float32"), ("avx512f avx512_bf16", "bfloat16"),
                                             ("amx_bf16 amx_tile", "bfloat16")])
def test_auto_dtype_follows_the_cpus_bfloat16_units(monkeypatch, tmp_path, flags, expected):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
    monkeypatch.setattr(models, "CPUINFO", cpuinfo)
    assert models.resolve_dtype("auto", "cpu") == expected
    assert models.resolve_dtype("float16", "cpu") == "float16"  # an explicit dtype is kept as it is
    assert load_job(dataset="alpaca").dtype == "auto"
