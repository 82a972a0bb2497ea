"""Checkpoint tables and custom layer sets in `dynoracle run`, on tiny random Llama models with real Ray.

A table entry naming the job's own model changes nothing; an entry naming another checkpoint (a folder
written by `dynoracle finetune`) gives that configuration exactly the outputs of a run of that folder
as the job's model. Custom layer sets run, reduce and
report; bad sets and bad checkpoints are one-line errors before any run folder exists.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from tiny_models import save_tiny

from pipeline.analysis.reduce import reduce_run
from pipeline.data.adapters import DatasetSpec, load_examples
from pipeline.generation.configs import SkipConfig
from pipeline.generation.engine import generate
from pipeline.generation.models import load_model
from pipeline.report.figures import build_report
from pipeline.run.job import job_from_dict, load_job
from pipeline.run.runner import run_job
from pipeline.training.finetune import FinetuneSpec, finetune

DATA = os.environ.get("DYNORACLE_DATA_DIR") or str(Path(__file__).resolve().parents[2] / "shared" / "data")
SEQUENCES = 3
COMPARED = ("output", "gen_tokens", "finish_reason", "rougeL", "layers_per_token")


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """a: the job's model; b: a fine-tuned for uls-2 by `finetune` (one large step, so outputs change)."""
    root = tmp_path_factory.mktemp("models")
    a = save_tiny("llama", root / "a", seed=0)
    finetune(FinetuneSpec(str(a), "uls-2", DatasetSpec("alpaca", data_dir=DATA, limit=4), str(root / "b"),
                          epochs=1, lr=0.05, batch_size=4, max_response_tokens=4, eval_limit=2))
    return {"a": a, "b": root / "b",
            "deeper": save_tiny("llama", root / "deeper", layers=5),
            "other_tokenizer": save_tiny("llama", root / "other", extra_token="<extra>")}


def _job(out: Path, model: Path, **fields):
    return job_from_dict({"name": "t", "model": str(model), "dtype": "float32", "families": ["uls"],
                          "config_ids": ["uls-2"], "max_new_tokens": 4, "batch_size": 3, "shard_size": 3,
                          "workers": 1, "dataset": {"name": "alpaca", "limit": SEQUENCES, "data_dir": DATA},
                          "out": str(out), **fields})


def _rows(out: Path) -> dict[tuple[str, str], dict]:
    rows = pq.read_table(out / "generations").to_pylist()
    return {(row["seq_id"], row["config_id"]): row for row in rows}


@pytest.fixture(scope="module")
def plain_run(local_ray, models, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "plain"
    run_job(_job(out, models["a"]))
    return out


def test_a_table_naming_the_jobs_own_model_changes_nothing(plain_run, models, tmp_path):
    out = tmp_path / "own"
    run_job(_job(out, models["a"], checkpoints={"uls-2": str(models["a"])}))
    assert _rows(out) == _rows(plain_run) and len(_rows(out)) == SEQUENCES * 2
    record, plain = (json.loads((folder / "run.json").read_text()) for folder in (out, plain_run))
    assert record["identity"] == plain["identity"] and record["checkpoint_fingerprints"] == {}


def test_a_configuration_on_another_checkpoint_equals_that_checkpoints_own_run(plain_run, models, tmp_path):
    mixed, alone = tmp_path / "mixed", tmp_path / "alone"
    run_job(_job(mixed, models["a"], checkpoints={"uls-2": str(models["b"])}))
    run_job(_job(alone, models["b"]))
    rows, alone_rows, plain_rows = _rows(mixed), _rows(alone), _rows(plain_run)
    assert len(rows) == SEQUENCES * 2
    for (seq_id, config_id), row in rows.items():
        expected = alone_rows if config_id == "uls-2" else plain_rows
        assert {k: row[k] for k in COMPARED} == {k: expected[seq_id, config_id][k] for k in COMPARED}
    assert any(rows[key]["output"] != plain_rows[key]["output"] for key in rows if key[1] == "uls-2")
    record = json.loads((mixed / "run.json").read_text())
    b_print = json.loads((alone / "run.json").read_text())["model_fingerprint"]
    assert record["checkpoint_fingerprints"] == {"uls-2": b_print}
    assert record["identity"]["checkpoints"] == {"uls-2": str(models["b"].resolve())}


@pytest.mark.parametrize("table,message", [
    ({"uls-2": "deeper"}, "has 5 layers, the job's model"),
    ({"uls-2": "other_tokenizer"}, "has a different tokenizer"),
    ({"uls-3": "b"}, "name configuration uls-3, which this job does not run"),
])
def test_bad_checkpoints_are_refused_before_anything_is_written(models, tmp_path, table, message):
    out = tmp_path / "run"
    with pytest.raises(ValueError, match=message) as caught:
        run_job(_job(out, models["a"], checkpoints={k: str(models[v]) for k, v in table.items()}))
    assert "\n" not in str(caught.value) and not out.exists()


def test_custom_layer_sets_run_reduce_and_report(local_ray, models, tmp_path):
    out = tmp_path / "custom"
    run_job(_job(out, models["a"], configs={"ends": [0, 3], "head": [1, 0]}))
    rows = _rows(out)
    assert len(rows) == SEQUENCES * 4
    configs = pq.read_table(out / "configs.parquet").to_pylist()
    custom = {c["config_id"]: (c["family"], c["layers"], c["cost"]) for c in configs if c["family"] == "custom"}
    assert custom == {"ends": ("custom", [0, 3], 2), "head": ("custom", [1, 0], 2)}  # a program: order kept

    lm = load_model(str(models["a"]), "float32", "cpu")
    examples = load_examples(_job(out, models["a"]).dataset, lm.tokenizer)
    direct = generate(lm, [list(ex.prompt_ids) for ex in examples], [SkipConfig("ends", "custom", 2, (0, 3))], 4)
    for ex, (gen,) in zip(examples, direct):
        assert rows[ex.seq_id, "ends"]["output"] == gen.text and rows[ex.seq_id, "ends"]["cost"] == 2

    result = reduce_run(out, families=["custom"], budgets=(2.0,))
    assert result.summary["families"] == ["full", "custom"] and result.summary["num_configs"] == 3
    report = build_report(out)
    assert "custom" in report.summary["families"] and all(path.is_file() for path in report.figures)


INVALID_SETS = [
    ("empty = []", "empty: layers must be a non-empty list"),
    ("far = [0, 9]", "far: layer 9 is out of range for a 4-layer model"),
    ("late = [1, 2]", "late: layer 0 is always executed"),
    ('"uls-2" = [0, 1]', "name 'uls-2' must be non-empty, without '/', and not a built-in id"),
]


def _job_file(folder: Path, model: Path, table: str) -> tuple[Path, Path]:
    job, out = folder / "job.toml", folder / "run"
    job.write_text(f'model = "{model}"\nout = "{out}"\ndtype = "float32"\n[dataset]\nname = "alpaca"\n'
                   f'limit = 2\ndata_dir = "{DATA}"\n[configs]\n{table}\n')
    return job, out


@pytest.mark.parametrize("table,message", INVALID_SETS)
def test_invalid_custom_sets_are_refused_before_anything_is_written(models, tmp_path, table, message):
    job, out = _job_file(tmp_path, models["a"], table)
    with pytest.raises(ValueError, match=re.escape(message)) as caught:
        run_job(load_job(job))
    assert "\n" not in str(caught.value) and not out.exists()


def test_an_invalid_custom_set_is_one_line_on_stderr_and_exit_2(models, tmp_path):
    job, out = _job_file(tmp_path, models["a"], INVALID_SETS[0][0])
    result = subprocess.run([sys.executable, "-m", "pipeline.cli", "run", "--job", str(job)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 2 and not out.exists()
    assert result.stderr.strip().count("\n") == 0 and INVALID_SETS[0][1] in result.stderr
