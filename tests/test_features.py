"""`dynoracle features` over a finished run (real Ray, a tiny random Llama): features equal a plain HF forward."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import ray
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
from typer.testing import CliRunner

from pipeline.analysis.feature_task import run_features
from pipeline.analysis.features import FEATURES_SCHEMA, load_features
from pipeline.cli import app
from pipeline.data.adapters import load_examples, shard_examples
from pipeline.generation.models import load_tokenizer
from pipeline.run.job import load_job
from pipeline.run.runner import run_job

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("DYNORACLE_DATA_DIR") or REPO.parent / "shared" / "data")
SEQUENCES, SHARD_SIZE, LAYERS = 5, 2, 4


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    """A 4-layer random Llama speaking the embedded tokenizer's ids, saved as a local model folder."""
    torch.manual_seed(0)
    tokenizer = load_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    folder = tmp_path_factory.mktemp("models") / "tiny-llama"
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def finished_run(tiny_model, tmp_path_factory) -> tuple[Path, object]:
    job = tmp_path_factory.mktemp("jobs") / "tiny.toml"
    job.write_text(f'name = "tiny"\nmodel = "{tiny_model}"\ndtype = "float32"\nconfig_ids = ["ee-2"]\n'
                   f'max_new_tokens = 2\nshard_size = {SHARD_SIZE}\nworkers = 1\n\n'
                   f'[dataset]\nname = "alpaca"\nlimit = {SEQUENCES}\ndata_dir = "{DATA}"\n')
    out = tmp_path_factory.mktemp("runs") / "tiny"
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    try:
        spec = load_job(job, overrides={"out": str(out)})
        run_job(spec)
        yield out, spec
    finally:
        ray.shutdown()


def test_features_equal_a_direct_hf_forward(finished_run, tiny_model):
    out, spec = finished_run
    summary = run_features(out, layers=[1, 2, LAYERS])
    assert (summary.shards, summary.computed, summary.skipped) == (3, 3, 0)
    table = pq.read_table(out / "features")
    assert table.schema.equals(FEATURES_SCHEMA, check_metadata=False)
    assert table.num_rows == SEQUENCES * 3 * 2  # sequences x layers x poolings

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    examples = load_examples(spec.dataset, load_tokenizer(str(tiny_model)))
    rows = {(r["seq_id"], r["layer"], r["pooling"]): r for r in table.to_pylist()}
    for shard, part in enumerate(shard_examples(examples, SHARD_SIZE)):
        for ex in part:
            with torch.no_grad():
                states = model(torch.tensor([ex.prompt_ids]), output_hidden_states=True).hidden_states
            for layer in (1, 2, LAYERS):
                h = states[layer][0]
                for pooling, expected in (("last", h[-1]), ("mean", h.mean(dim=0))):
                    row = rows[(ex.seq_id, layer, pooling)]
                    assert (row["shard"], row["prompt_tokens"]) == (shard, ex.prompt_tokens)
                    assert np.array_equal(np.asarray(row["hidden"], dtype=np.float32), expected.numpy())

    ids = np.array([ex.seq_id for ex in examples][::-1])
    x = load_features(out, ids, LAYERS)
    assert x.shape == (SEQUENCES, 2 * 32 + 1)
    assert np.array_equal(x[:, -1], np.log([ex.prompt_tokens for ex in examples][::-1]))

    again = run_features(out, layers=[1, 2, LAYERS])  # resumable: every shard file is whole, nothing recomputed
    assert (again.computed, again.skipped) == (0, 3)


def test_bad_layer_is_one_line_and_writes_nothing(finished_run):
    out, _ = finished_run
    before = sorted(p.name for p in (out / "features").iterdir())
    result = CliRunner().invoke(app, ["features", str(out), "--layer", str(LAYERS + 1)])
    assert result.exit_code == 2
    assert result.output.strip() == f"error: feature layer {LAYERS + 1} is outside 1..{LAYERS} (the model's layers)"
    assert sorted(p.name for p in (out / "features").iterdir()) == before
