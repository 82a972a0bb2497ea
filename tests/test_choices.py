"""Multiple-choice tasks: lm-evaluation-harness's metrics by hand, its prompts, its own HFLM, and a whole run."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from pipeline.data.adapters import DatasetSpec, load_examples
from pipeline.data.choice_tasks import LM_EVAL_YAML, lm_eval_task, load_choice_docs
from pipeline.generation.choice_task import ChoiceTask, choice_metrics
from pipeline.generation.configs import build_configs, full_config
from pipeline.generation.models import load_model
from tiny_models import save_tiny

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("DYNORACLE_DATA_DIR") or REPO.parent / "shared" / "data")


def test_acc_acc_norm_and_acc_bytes_by_hand_with_ties_and_multibyte_choices():
    # "é" is 1 character and 2 UTF-8 bytes; "ab" is 2 of each.
    m = choice_metrics(np.array([-2.0, -3.9]), np.array([1, 2]), np.array([2, 2]), gold=1)
    assert (m["pred"], m["pred_norm"]) == (0, 1)  # -2/1 < -3.9/2 = -1.95, but -2/2 = -1 > -1.95
    assert (m["acc"], m["acc_norm"], m["acc_bytes"]) == (0.0, 1.0, 0.0)
    assert m["prob_gold"] == pytest.approx(np.exp(-3.9) / (np.exp(-2.0) + np.exp(-3.9)), abs=1e-15)
    # Ties go to the first choice (numpy's argmax, as lm-eval): right when gold is 0, wrong when it is 1.
    tie = np.array([-1.5, -1.5, -4.0])
    assert choice_metrics(tie, np.array([3, 3, 1]), np.array([3, 3, 1]), gold=0)["acc"] == 1.0
    assert choice_metrics(tie, np.array([3, 3, 1]), np.array([3, 3, 1]), gold=1)["acc"] == 0.0
    normed = choice_metrics(np.array([-4.0, -2.0]), np.array([4, 2]), np.array([4, 2]), gold=1)  # -1 and -1: a tie
    assert (normed["pred_norm"], normed["acc_norm"], normed["prob_gold"]) == (0, 0.0, pytest.approx(1 / (1 + np.exp(-2))))


def lm_eval_task_here(name: str):
    pytest.importorskip("lm_eval")
    return lm_eval_task(name, DATA), LM_EVAL_YAML[name][2]


@pytest.mark.parametrize("name", list(LM_EVAL_YAML))
def test_contexts_continuations_choices_and_answers_are_lm_evals(name):
    task, split = lm_eval_task_here(name)
    task.build_all_requests(limit=5, rank=0, world_size=1)
    theirs: dict[int, list[tuple[str, str]]] = {}
    for instance in task.instances:
        theirs.setdefault(instance.doc_id, []).append(tuple(instance.arguments))
    docs = task.test_docs() if task.has_test_docs() else task.validation_docs()
    for i, (_, doc) in enumerate(load_choice_docs(DatasetSpec(name, split=split, limit=5, data_dir=str(DATA)))):
        assert list(zip(doc.contexts, doc.continuations)) == theirs[i]
        assert list(doc.choices) == list(task.doc_to_choice(docs[i]))
        assert doc.gold == (task.doc_to_text(docs[i]) if name == "winogrande" else task.doc_to_target(docs[i]))


def test_full_configuration_equals_lm_eval_hflm_on_20_arc_easy_rows(tmp_path):
    pytest.importorskip("lm_eval")
    from lm_eval.models.huggingface import HFLM

    folder = save_tiny("llama", tmp_path / "tiny")
    task, split = lm_eval_task_here("arc_easy")
    task.build_all_requests(limit=20, rank=0, world_size=1)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        results = HFLM(pretrained=str(folder), dtype="float32", device="cpu", batch_size=16).loglikelihood(task.instances)
        lm = load_model(str(folder), dtype="float32", device="cpu")
        examples = load_examples(DatasetSpec("arc_easy", split=split, limit=20, data_dir=str(DATA)), lm.tokenizer)
        tables = {prefill: ChoiceTask((full_config(lm.num_layers),), prefill, 8).run(lm, 0, examples).to_pandas()
                  for prefill in ("skip", "full")}
    finally:
        torch.set_num_threads(threads)
    per_doc: dict[int, list[float]] = {}
    for instance, (loglik, _) in zip(task.instances, results):
        per_doc.setdefault(instance.doc_id, []).append(loglik)
    docs = task.test_docs()
    expected = [task.process_results(docs[i], [(ll, False) for ll in per_doc[i]]) for i in range(20)]
    for table in tables.values():
        assert len(table) == 20
        for i, row in table.iterrows():
            # HFLM sums in float32 (these random models give log-likelihoods near -130): relative 1e-6 is its rounding
            assert row["loglik"] == pytest.approx(per_doc[i], rel=1e-6, abs=1e-5)
            assert (row["acc"], row["acc_norm"]) == (expected[i]["acc"], expected[i]["acc_norm"])


def test_a_choice_run_writes_verified_rows_that_reduce_query_and_report_read(tmp_path):
    from pipeline.analysis.reduce import reduce_run
    from pipeline.report.figures import build_report
    from pipeline.report.query import query_run
    from pipeline.run.job import load_job
    from pipeline.run.runner import run_job

    folder = save_tiny("llama", tmp_path / "tiny")
    overrides = {"model": str(folder), "dtype": "float32", "families": ("uls", "ee"), "workers": 1,
                 "batch_size": 3, "shard_size": 3, "out": str(tmp_path / "run"), "prefill": "full",
                 "dataset": {"limit": 6, "data_dir": str(DATA)}}
    spec = load_job(dataset="arc_easy", overrides=overrides)
    summary = run_job(spec)
    assert (summary.shards, summary.computed, summary.rows) == (2, 2, 6 * 7)
    rows = pq.read_table(tmp_path / "run" / "choices").to_pandas().sort_values(["seq_id", "config_id"])
    lm = load_model(str(folder), dtype="float32", device="cpu")
    configs = tuple(build_configs(lm.num_layers, ("uls", "ee"), (0,)))
    direct = ChoiceTask(configs, "full", 6).run(
        lm, 0, load_examples(spec.dataset, lm.tokenizer)).to_pandas().sort_values(["seq_id", "config_id"])
    assert np.allclose(np.stack(rows["loglik"]), np.stack(direct["loglik"]), atol=1e-5, rtol=0)
    assert rows["acc"].tolist() == direct["acc"].tolist() and rows["acc_norm"].tolist() == direct["acc_norm"].tolist()

    reduced = reduce_run(tmp_path / "run", resamples=20).summary  # the run's default metric: acc
    assert reduced["metric"] == "acc" and reduced["full_mean"] == rows[rows.config_id == "full"]["acc"].mean()
    assert set(reduced["cola_shares"]) == {"max_cost", "real", "null"}
    assert reduce_run(tmp_path / "run", "prob_gold", resamples=0).summary.get("cola_shares") is None  # not 0/1
    with pytest.raises(ValueError, match=r"unknown metric 'rougeL' for .* \(a choice run\)"):
        reduce_run(tmp_path / "run", "rougeL")
    _, got = query_run(tmp_path / "run", "select count(*), avg(acc_norm) from choices")
    assert got == [(6 * 7, pytest.approx(rows["acc_norm"].mean()))]
    report = build_report(tmp_path / "run", "acc")
    assert "CoLa's shares (acc)" in report.markdown.read_text()
    assert sorted(p.name for p in report.figures) == ["cost_quality.png", "oracle_shares.png"]
