"""What a new user hits first: a wrong model path, a job of custom sets only, Ray's start-up on a finished run.

Each error is one line naming what was asked for and where it was looked for, and leaves no run folder.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import huggingface_hub.constants
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from handmade_run import make_run, write_features
from tiny_models import save_tiny
from typer.testing import CliRunner

from pipeline.analysis.controller_run import evaluate_run
from pipeline.analysis.reduce import load_matrix, reduce_run
from pipeline.analysis.result_key import ORACLE_OPTIONS, result_name
from pipeline.cli import app
from pipeline.data.adapters import DatasetSpec, data_source, load_records
from pipeline.generation.models import load_config
from pipeline.report.figures import plot_cost_quality, plot_lengths, plot_shares
from pipeline.report.paper import NAMED_BANDS
from pipeline.run import runner
from pipeline.run.job import job_from_dict, load_job
from pipeline.run.job_reference import reference, rewrite
from pipeline.run.runner import run_job
from pipeline.training.finetune import FinetuneSpec, finetune

README = Path(__file__).resolve().parents[1] / "README.md"
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

    def no_ray(*args, **kwargs):
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


def _bytes(folder: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_reductions_and_controllers_live_in_folders_named_by_what_they_were_computed_over(tmp_path):
    run = make_run(tmp_path / "run", num_sequences=12)
    reduce_run(run, resamples=0)
    everything = _bytes(run / "oracle" / "rougeL")
    result = CliRunner().invoke(app, ["reduce", str(run), "--families", "uls", "--bootstrap", "0"])
    assert result.exit_code == 0 and f"written to {run / 'oracle' / 'rougeL+families=uls'}" in result.output
    assert reduce_run(run, cost="measured", families=["ee", "uls"], resamples=0).out_dir == \
        run / "oracle" / "rougeL+cost=measured+families=ee,uls"
    assert reduce_run(run, families=["rls", "ee", "uls"], resamples=0).out_dir == run / "oracle" / "rougeL"
    assert reduce_run(run, degenerate="keep", resamples=0).out_dir == run / "oracle" / "rougeL+degenerate=keep"
    assert _bytes(run / "oracle" / "rougeL").keys() == everything.keys()
    assert json.loads((run / "oracle" / "rougeL+families=uls" / "summary.json").read_text())["families"] == \
        ["full", "uls"]
    assert result_name("rougeL", {"cost": "nominal", "families": None}, ORACLE_OPTIONS) == "rougeL"

    matrix, _ = load_matrix(run, "rougeL", None, "nominal")
    write_features(run, dict(zip(matrix.seq_ids, matrix.scores)))
    evaluate_run(run, learners=("ridge", "classifier"), folds=3, resamples=5)
    before = _bytes(run / "controller")
    ridge = evaluate_run(run, learners=("ridge",), folds=3, resamples=5)
    assert ridge.out_dir == run / "controller" / "rougeL+learners=ridge"
    assert {p: b for p, b in _bytes(run / "controller").items() if p in before} == before
    both = evaluate_run(run, families=["uls"], learners=("ridge",), folds=3, resamples=5)
    assert both.out_dir == run / "controller" / "rougeL+families=uls+learners=ridge"


def test_query_views_config_means_controller_curves_similarity_and_features(tmp_path):
    run = make_run(tmp_path / "run", num_sequences=12)
    missing = CliRunner().invoke(app, ["query", str(run), "select count(*) from features"])
    assert missing.exit_code == 2 and "dynoracle features" in missing.output
    reduce_run(run, families=["uls"], resamples=0)
    matrix, _ = load_matrix(run, "rougeL", None, "nominal")
    write_features(run, dict(zip(matrix.seq_ids, matrix.scores)))
    evaluate_run(run, learners=("ridge",), folds=3, resamples=5)

    def rows(sql: str, *args: str) -> list[dict]:
        result = CliRunner().invoke(app, ["query", str(run), sql, "--format", "json", *args])
        assert result.exit_code == 0, result.output
        return json.loads(result.output)

    means = rows("select config_id, mean from config_means order by config_id", "--families", "uls")
    assert [r["config_id"] for r in means] == sorted(["full", *(f"uls-{c}" for c in range(1, 6))])
    expected = dict(zip(matrix.config_ids, matrix.scores.mean(axis=0)))
    assert all(np.isclose(r["mean"], expected[r["config_id"]]) for r in means)
    assert rows("select count(distinct seq_id) as n from features")[0]["n"] == 12
    curves = rows("select learner, count(*) as n from controller_curves group by 1")  # the only one: ridge's
    assert [r["learner"] for r in curves] == ["ridge"] and curves[0]["n"] > 0
    missing = CliRunner().invoke(app, ["query", str(run), "select * from similarity"])
    assert missing.exit_code == 2 and "dynoracle similarity" in missing.output


def test_finetune_on_a_file_splits_it_and_records_where_the_data_came_from(tiny, tmp_path, monkeypatch):
    path = tmp_path / "mine.jsonl"
    path.write_text("".join(json.dumps({"q": f"question {i}?", "a": f"answer {i}"}) + "\n" for i in range(20)))
    spec = DatasetSpec("file", path=str(path), prompt_column="q", reference_column="a")
    train, validation, every = ({r.body for r in load_records(dataclasses.replace(spec, split=split))}
                                for split in ("train", "validation", "test"))
    assert (len(train), len(validation), len(every)) == (14, 3, 20) and not train & validation
    assert train | validation <= every

    record = finetune(FinetuneSpec(str(tiny), "uls-2", spec, str(tmp_path / "tuned"), epochs=1, lr=1e-3,
                                   batch_size=7, max_response_tokens=4))
    assert (record["train_rows"], record["eval_rows"], record["data_source"]) == (14, 3, str(path.resolve()))
    monkeypatch.setenv("DYNORACLE_DATA_DIR", DATA)  # data_dir unset in the spec: the mirror it was read from
    assert data_source(DatasetSpec("alpaca")) == str((Path(DATA) / "alpaca").resolve())


def test_the_readmes_job_reference_is_the_generated_one_and_its_example_job_loads(tmp_path):
    text = README.read_text()
    assert rewrite(text) == text, "rerun `python -m pipeline.run.job_reference README.md`"
    for key in ("`dataset.path`", "`dataset.prompt_column`", "`dataset.reference_column`", "`scoring.tokenizer`",
                "`checkpoints`", "`start_timeout` | a number | 600"):
        assert key in reference()
    example = text.split("### Your own data", 1)[1].split("```toml\n", 1)[1].split("```", 1)[0]
    (tmp_path / "mine.toml").write_text(example)
    spec = load_job(tmp_path / "mine.toml")
    assert (spec.dataset.name, spec.dataset.path, spec.dataset.prompt_column, spec.dataset.reference_column) == (
        "file", "data/mine.jsonl", "question", "answer")
    assert spec.configs == {"my-cut": [0, 1, 2, 5, 9]} and spec.scoring.tokenizer == "unicode"


def test_report_for_papers_formats_names_checkpoints_shares_and_sections(tmp_path):
    run = make_run(tmp_path / "run", num_sequences=12)
    record = json.loads((run / "run.json").read_text())
    record["job"]["checkpoints"] = {"uls-3": "outputs/ft/uls-3"}
    (run / "run.json").write_text(json.dumps(record))
    matrix, _ = load_matrix(run, "rougeL", None, "nominal")
    write_features(run, dict(zip(matrix.seq_ids, matrix.scores)))
    evaluate_run(run, learners=("ridge",), folds=3, resamples=5)
    reduce_run(run, resamples=0)  # the report reuses it

    before = _bytes(run)
    refused = CliRunner().invoke(app, ["report", str(run), "--format", "png,gif"])
    assert refused.exit_code == 2 and refused.output.count("\n") == 1 and "unknown figure format gif" in refused.output
    assert _bytes(run) == before
    result = CliRunner().invoke(app, ["report", str(run), "--format", "png,pdf,svg"])
    assert result.exit_code == 0, result.output
    for stem in ("cost_quality", "oracle_shares", "lengths"):
        assert (run / f"{stem}.pdf").read_bytes()[:5] == b"%PDF-" and b"<svg" in (run / f"{stem}.svg").read_bytes()
        assert (run / f"{stem}.png").read_bytes()[:4] == b"\x89PNG"
    text = (run / "report.md").read_text()
    assert "## Configurations on their own checkpoints" in text and "| uls-3 | `outputs/ft/uls-3` |" in text
    assert "## Prompt-feature controllers" in text and "| 1 | ridge |" in text

    out = run / "oracle" / "rougeL"
    frontier, summary = pq.read_table(out / "frontier.parquet").to_pandas(), json.loads((out / "summary.json").read_text())
    per_config = pq.read_table(out / "config_means.parquet").to_pandas().rename(columns={"mean": "score"})
    per_config = per_config.assign(gen_tokens=8.0, eos_rate=1.0)
    custom = pd.DataFrame([{"config_id": "my-cut", "family": "custom", "cost": 2.0, "score": 0.5, "mean_lo": 0.4,
                            "mean_hi": 0.6, "gen_tokens": 8.0, "eos_rate": 1.0}])
    figure = plot_cost_quality(pd.concat([per_config, custom]), frontier, summary, "t", None, {"uls-3": "x"})
    assert {"my-cut", "uls-3 (checkpoint)"} <= {t.get_text() for t in figure.axes[0].texts}
    lengths = plot_lengths(pd.concat([per_config, custom]), summary, "t", 24)
    assert all("my-cut" in {t.get_text() for t in ax.texts} for ax in lengths.axes)
    shares = plot_shares(per_config, frontier, summary, "t", {"uls-3": "x"})
    labels = [t.get_text() for t in shares.axes[0].get_legend().get_texts()]
    named = [label for label in labels if label.endswith(")") and "(" in label and "least" not in label]
    assert len(named) == NAMED_BANDS and labels[NAMED_BANDS].endswith("other configurations")
    used = {item["config_id"] for row in frontier["shares"] for item in row}
    assert len(used) == NAMED_BANDS + int(labels[NAMED_BANDS].split()[0])
