"""`dynoracle finetune` on tiny random Llama and OPT models: what is frozen stays bit-identical, what is
trained changes and the loss falls; the skip forward equals an independent two-pass reference; 2 Ray Train
CPU workers save a loadable model."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch
from tiny_models import save_tiny
from transformers import AutoModelForCausalLM, DynamicCache

from pipeline.data.adapters import DatasetSpec
from pipeline.generation.configs import config_for_id
from pipeline.generation.models import decoder_layers, load_model
from pipeline.training.finetune import (
    FINETUNE_JSON,
    FinetuneSpec,
    ResponseCollator,
    SkippedLayers,
    finetune,
    response_loss,
    response_rows,
)

DATA = os.environ.get("DYNORACLE_DATA_DIR") or str(Path(__file__).resolve().parents[2] / "shared" / "data")
CONFIG = "uls-2"  # of 4 layers: executes 0 and 2, skips 1 and 3


def _spec(base: Path, out: Path, **changes) -> FinetuneSpec:
    settings = {"epochs": 2, "lr": 1e-3, "batch_size": 4, "max_response_tokens": 8, "eval_limit": 4}
    return FinetuneSpec(str(base), CONFIG, DatasetSpec("alpaca", data_dir=DATA, limit=8), str(out),
                        **{**settings, **changes})


def _fixed_batch(model_dir: Path) -> dict:
    lm = load_model(str(model_dir), "float32")
    rows = response_rows(DatasetSpec("alpaca", "train", data_dir=DATA, limit=4), lm.tokenizer, 8)
    return ResponseCollator(lm.tokenizer.pad_token_id)(rows)


@torch.no_grad()
def _loss(model_dir: Path, batch: dict, prefill: str) -> float:
    lm = load_model(str(model_dir), "float32")
    return float(response_loss(lm.model, SkippedLayers(lm.model, config_for_id(4, CONFIG), prefill), batch))


@pytest.mark.parametrize("kind,prefill", [("llama", "full"), ("opt", "full"), ("llama", "skip")])
def test_finetune_freezes_skipped_layers_trains_kept_ones_and_lowers_the_loss(kind, prefill, tmp_path):
    base, out = save_tiny(kind, tmp_path / "base"), tmp_path / "tuned"
    batch = _fixed_batch(base)
    before = _loss(base, batch, prefill)
    record = finetune(_spec(base, out, prefill=prefill))

    assert json.loads((out / FINETUNE_JSON).read_text()) == json.loads(json.dumps(record))
    assert record["config"]["layers"] == [0, 2] and record["train_rows"] == 8 and record["steps"] == 4
    assert not (out / "trainer-checkpoints").exists()
    start = AutoModelForCausalLM.from_pretrained(base)
    tuned = AutoModelForCausalLM.from_pretrained(out)  # an ordinary Hugging Face model folder
    for j, (old, new) in enumerate(zip(decoder_layers(start), decoder_layers(tuned))):
        pairs = list(zip(old.state_dict().values(), new.state_dict().values()))
        if j in (0, 2):
            assert all(not torch.equal(a, b) for a, b in pairs), f"kept layer {j} has an unchanged tensor"
        else:
            assert all(torch.equal(a, b) for a, b in pairs), f"skipped layer {j} changed"
    assert not torch.equal(start.get_input_embeddings().weight, tuned.get_input_embeddings().weight)
    assert _loss(out, batch, prefill) < before


def test_finetune_refuses_a_finished_folder_and_a_configuration_the_model_lacks(tmp_path):
    base = save_tiny("llama", tmp_path / "base")
    with pytest.raises(ValueError, match="budget 7 is outside 1..3"):
        finetune(FinetuneSpec(str(base), "uls-7", DatasetSpec("alpaca", data_dir=DATA, limit=8), str(tmp_path / "bad")))
    assert not (tmp_path / "bad").exists()
    (tmp_path / "done").mkdir()
    (tmp_path / "done" / FINETUNE_JSON).write_text("{}")
    with pytest.raises(ValueError, match="already holds a finished fine-tune"):
        finetune(_spec(base, tmp_path / "done"))


@torch.no_grad()
def test_full_prefill_training_forward_equals_a_cached_two_pass_reference(tmp_path):
    """Logits of the one-pass training forward on the response positions equal those of a prompt pass through
    every layer, then the response through the kept layers only over the cached prompt KV (one row at a time,
    no padding)."""
    base = save_tiny("llama", tmp_path / "base")
    lm = load_model(str(base), "float32")
    rows = response_rows(DatasetSpec("alpaca", "train", data_dir=DATA, limit=3), lm.tokenizer, 6)
    batch = ResponseCollator(lm.tokenizer.pad_token_id)(rows)
    config = config_for_id(4, CONFIG)
    skipping = SkippedLayers(lm.model, config, "full")
    inputs = {k: v for k, v in batch.items() if k not in ("labels", "prompt_width")}
    skipping.prompt_width = batch["prompt_width"]
    with skipping.active():
        logits = lm.model(**inputs, use_cache=False).logits  # (B, R + 1, V): last prompt position onwards
    stack = decoder_layers(lm.model)
    for i, row in enumerate(rows):
        prompt, response = torch.tensor([row["prompt_ids"]]), torch.tensor([row["response_ids"]])
        cache = DynamicCache(config=lm.model.config)
        first = lm.model(input_ids=prompt, cache=cache, use_cache=True).logits[:, -1]
        originals = list(stack)
        for j in range(4):
            if j not in config.layers:
                stack[j] = _Identity()
        try:
            rest = lm.model(input_ids=response, cache=cache, use_cache=True).logits[0]
        finally:
            for j, layer in enumerate(originals):
                stack[j] = layer
        expected = torch.cat([first, rest[:-1]])  # predictions of the response tokens
        got = logits[i, : len(row["response_ids"])]
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


class _Identity(torch.nn.Module):
    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


def test_finetune_on_two_ray_train_cpu_workers(tmp_path):
    base, out = save_tiny("opt", tmp_path / "base"), tmp_path / "tuned"
    sigint_before = signal.getsignal(signal.SIGINT)
    record = finetune(_spec(base, out, workers=2, epochs=1))
    assert record["train_rows"] == 8 and record["steps"] == 2  # global batch 4 = 2 workers x 2
    assert signal.getsignal(signal.SIGINT) is sigint_before  # Ray Train's own Ctrl-C handler does not outlive the fit
    tuned = load_model(str(out), "float32")
    assert tuned.num_layers == 4 and (out / FINETUNE_JSON).is_file()
    assert not (out / ".ray-train").exists()
