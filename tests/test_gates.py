"""Gate training (`pipeline.training.gates`) on a tiny random Llama: the cost penalty works, the fixed-input control
sees nothing of the hidden state, and an interrupted training resumes to the same gates."""

from __future__ import annotations

import dataclasses

import pyarrow.parquet as pq
import pytest
import torch

from pipeline.data.adapters import DatasetSpec
from pipeline.generation.configs import full_config
from pipeline.generation.engine import generate
from pipeline.generation.models import LoadedModel, load_model
from pipeline.training import gates as gates_module
from pipeline.training.finetune import response_rows
from pipeline.training.gates import GateSpec, Gates, load_gates, prompt_kv, response_batch, train_gates

DATASET = DatasetSpec("alpaca", split="train", limit=8, prompt_budget=128)


@pytest.fixture(scope="module")
def tiny() -> LoadedModel:
    return load_model("random:tiny-llama", "float32", "cpu")


@pytest.fixture(scope="module")
def rows(tiny) -> list[dict]:
    """Train-split prompts with the tiny model's own greedy continuation as the response: a random model's layers
    do not help it predict Alpaca's references, but they do help it predict its own output."""
    rows = response_rows(dataclasses.replace(DATASET, empty_references="keep"), tiny.tokenizer, 8)
    outputs = generate(tiny, [r["prompt_ids"] for r in rows], [full_config(tiny.num_layers)], 8, ignore_eos=True)
    return [{**r, "response_ids": out[0].token_ids} for r, out in zip(rows, outputs)]


def _expected_layers(lm: LoadedModel, gates: Gates, rows: list[dict]) -> float:
    """Mean over the batch's decision tokens of 1 + sum of P(run l), from the states of a full forward."""
    batch = response_batch(lm, rows, [prompt_kv(lm, r["prompt_ids"]) for r in rows])
    labels = batch.pop("labels")
    with torch.no_grad():
        states = lm.model(**batch, output_hidden_states=True).hidden_states  # states[l] = input of layer l
    decided = labels != -100
    probs = sum(torch.sigmoid(gates.logits(l, states[l]))[decided].mean() for l in range(1, lm.num_layers))
    return 1 + float(probs.detach())


def test_a_larger_lambda_trains_cheaper_gates(tiny, rows, tmp_path):
    expected = []
    for lam in (0.0, 0.3, 3.0):
        spec = GateSpec("hidden", lam, DATASET, epochs=3, lr=0.05, batch_size=4, max_response_tokens=8)
        train_gates(tiny, spec, tmp_path / spec.name, rows)
        expected.append(_expected_layers(tiny, load_gates(tmp_path / spec.name), rows))
    assert expected[0] > expected[1] > expected[2]
    assert expected[2] < tiny.num_layers - 1  # the penalty really switched layers off


def test_the_fixed_input_control_ignores_the_hidden_state():
    torch.manual_seed(0)
    fixed, hidden = Gates(6, 16, "fixed", init_run_logit=0.0), Gates(6, 16, "hidden", init_run_logit=0.0)
    states = torch.randn(40, 16)
    permuted = states[torch.randperm(40)]
    for layer in range(1, 6):
        assert torch.equal(fixed.logits(layer, permuted), fixed.logits(layer, states))
        assert torch.equal(fixed.logits(layer, 3 * torch.randn(40, 16)), fixed.logits(layer, states))
        assert not torch.equal(hidden.logits(layer, permuted), hidden.logits(layer, states))


def test_an_interrupted_training_resumes_to_the_same_gates(tiny, rows, tmp_path, monkeypatch):
    spec = GateSpec("fixed", 0.3, DATASET, epochs=2, lr=0.05, batch_size=4, max_response_tokens=8, save_steps=2)
    straight = train_gates(tiny, spec, tmp_path / "straight", rows)
    calls = {"n": 0}
    original = gates_module.gate_loss

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(gates_module, "gate_loss", failing)
    with pytest.raises(KeyboardInterrupt):
        train_gates(tiny, spec, tmp_path / "resumed", rows)
    assert (tmp_path / "resumed" / "checkpoint.pt").is_file() and not (tmp_path / "resumed" / "gates.json").exists()
    monkeypatch.setattr(gates_module, "gate_loss", original)
    resumed = train_gates(tiny, spec, tmp_path / "resumed", rows)
    assert resumed["history"] == straight["history"]
    a, b = load_gates(tmp_path / "straight").state_dict(), load_gates(tmp_path / "resumed").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_the_gated_task_scores_like_the_run_and_the_curves_summarise_it(tiny, rows, tmp_path):
    import io

    import numpy as np
    import pandas as pd

    from pipeline.analysis.gate_curves import summarise
    from pipeline.analysis.gates_task import GatedGenerateTask, GateSet, evaluation_rows
    from pipeline.data.adapters import Example
    from pipeline.generation.scoring import ScoringOptions, score

    examples = [Example(f"s{i}", "", tuple(r["prompt_ids"]), ("a reference",), False, False) for i, r in enumerate(rows[:3])]
    full = [row[0] for row in generate(tiny, [list(e.prompt_ids) for e in examples], [full_config(tiny.num_layers)], 6)]
    always = Gates(tiny.num_layers, tiny.model.config.hidden_size, "fixed", init_run_logit=30.0)
    buffer = io.BytesIO()
    torch.save(always.state_dict(), buffer)
    task = GatedGenerateTask((GateSet("fixed-lambda0", "fixed", 0.0, 0, buffer.getvalue()),), 6, "none", 2,
                             ScoringOptions(), {e.seq_id: g.text for e, g in zip(examples, full)})
    shard = task.run(tiny, 0, examples)
    (tmp_path / "gates" / "train" / "fixed-lambda0").mkdir(parents=True)  # a trained set's files beside the rows
    (tmp_path / "gates" / "train" / "fixed-lambda0" / "gates.json").write_text("{}")
    pq.write_table(shard, tmp_path / "gates" / "shard=00000.parquet")
    table = evaluation_rows(tmp_path)
    assert table.equals(shard.to_pandas())
    assert {(s, g) for s, g in zip(table["seq_id"], table["gates"])} == task.expected_keys(examples)
    assert table["output"].tolist() == [g.text for g in full]  # gates that always run are the full model
    assert table["fidelity"].tolist() == [1.0] * 3
    want = score(table["output"].tolist(), [e.references for e in examples], table["output"].tolist(), False)
    assert table["rougeL"].tolist() == want["rougeL"]
    curves = summarise(pd.concat([table, table.assign(gates="x", cost=table["cost"] - 1)]), resamples=100)
    row = curves[(curves["gates"] == "fixed-lambda0") & (curves["metric"] == "rougeL")].iloc[0]
    assert row["mean"] == np.mean(want["rougeL"]) and row["cost"] == tiny.num_layers
    assert row["mean_lo"] <= row["mean"] <= row["mean_hi"] and row["cost_lo"] == row["cost_hi"] == tiny.num_layers
