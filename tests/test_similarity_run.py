"""`dynoracle similarity` on a tiny finished run: real Ray, the run's model and shards, resumable, reported."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from pipeline.analysis.similarity import SHARD_SCHEMA, summary_path
from pipeline.analysis.similarity_task import state_similarity
from pipeline.cli import app
from pipeline.data.adapters import load_examples, shard_examples
from pipeline.generation.configs import ee_layers, uls_layers
from pipeline.generation.models import load_model
from pipeline.run.job import load_job
from pipeline.run.runner import run_job

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("DYNORACLE_DATA_DIR") or REPO.parent / "shared" / "data")
CONFIG_IDS = ("full", "uls-8", "ee-8")
JOB = f"""
name = "tiny-similarity"
dtype = "float32"
families = ["uls", "ee"]
config_ids = ["uls-8", "ee-8"]
max_new_tokens = 4
batch_size = 2
shard_size = 2
workers = 1

[dataset]
name = "alpaca"
limit = 3
data_dir = "{DATA}"
"""


@pytest.fixture(scope="module")
def run(local_ray, tmp_path_factory) -> tuple[Path, Path]:
    """The finished run; it and the `similarity` commands share the module's Ray (one start-up, not three)."""
    job = tmp_path_factory.mktemp("jobs") / "tiny.toml"
    job.write_text(JOB)
    out = tmp_path_factory.mktemp("runs") / "tiny"
    run_job(load_job(job, overrides={"out": str(out)}))
    return out, job


def test_similarity_rows_summary_resume_and_report(run: tuple[Path, Path]) -> None:
    run, job_file = run
    result = CliRunner().invoke(app, ["similarity", str(run), "--bootstrap", "200"])
    assert result.exit_code == 0, result.output
    assert "9 rows in 2 shards (2 computed, 0 skipped)" in result.output
    rows = pq.read_table(run / "similarity-reference")
    assert rows.schema.equals(SHARD_SCHEMA, check_metadata=False) and rows.num_rows == 3 * len(CONFIG_IDS)

    # the workers' rows equal the computation done here, on the run's shards, with the run's model and prefill
    spec = load_job(job_file)
    lm = load_model(spec.model, "float32", "cpu")
    frame = rows.to_pandas().set_index(["seq_id", "config_id"])
    shards = shard_examples(load_examples(spec.dataset, lm.tokenizer), spec.shard_size)
    sets = {"full": tuple(range(30)), "uls-8": uls_layers(30, 8), "ee-8": ee_layers(30, 8)}
    for examples in shards:
        responses = [lm.tokenizer(ex.reference, add_special_tokens=False)["input_ids"][:4] for ex in examples]
        order = sorted(range(len(examples)), key=lambda i: (examples[i].prompt_tokens + len(responses[i]), i))
        final, layers = state_similarity(lm, [list(examples[i].prompt_ids) for i in order],
                                         [responses[i] for i in order], list(sets.values()), "full")
        for row, i in enumerate(order):
            for u, config_id in enumerate(sets):
                got = frame.loc[(examples[i].seq_id, config_id)]
                assert got["tokens"] == len(responses[i])
                assert got["final_similarity"] == pytest.approx(final[row, u], abs=1e-12)
                assert list(got["layer_similarity"]) == pytest.approx(layers[row, u].tolist(), abs=1e-12)

    summary = pq.read_table(summary_path(run, "reference")).to_pandas()
    assert len(summary) == len(CONFIG_IDS) * 31
    full = summary[summary["config_id"] == "full"]
    assert (full[["similarity", "lo", "hi"]] == 1.0).all().all()
    ee = summary[summary["config_id"] == "ee-8"].set_index("layer")
    assert (ee.loc[:7, "similarity"] == 1.0).all()  # EE's first 8 layers are the full model's, exactly
    assert (ee["lo"] <= ee["similarity"]).all() and (ee["similarity"] <= ee["hi"]).all()
    weights = frame.xs("ee-8", level="config_id")["tokens"].to_numpy()
    finals = frame.xs("ee-8", level="config_id")["final_similarity"].to_numpy()
    assert ee.loc[30, "similarity"] == pytest.approx(np.average(finals, weights=weights), abs=1e-12)

    again = CliRunner().invoke(app, ["similarity", str(run), "--bootstrap", "200"])
    assert again.exit_code == 0 and "(0 computed, 2 skipped)" in again.output

    reported = CliRunner().invoke(app, ["report", str(run)])
    assert reported.exit_code == 0, reported.output
    for name in ("similarity_cost.png", "similarity_layers.png"):
        assert (run / name).stat().st_size > 10_000
    assert "## Hidden-state similarity to the full model" in (run / "report.md").read_text()
