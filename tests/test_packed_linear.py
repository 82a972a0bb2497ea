"""The engine's packed bfloat16 linears (`packed_linear`) against `nn.Linear`: bit-identical outputs, on the
layers and through the engine's decode and log-likelihood passes, and every module restored after."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pipeline.generation import packed_linear
from pipeline.generation.configs import CUSTOM, SkipConfig
from pipeline.generation.engine import generate
from pipeline.generation.loglik import continuation_logliks
from pipeline.generation.models import decoder_layers, load_model

pytestmark = pytest.mark.skipif(not packed_linear.supported(), reason="no oneDNN bfloat16 linear on this CPU")


def packed_linears_of(block: nn.Module):
    return packed_linear.packed_linears([block])


def test_packed_linear_is_bit_identical_and_restored():
    torch.manual_seed(0)
    block = nn.Sequential(nn.Linear(96, 256, bias=False), nn.Linear(256, 96)).to(torch.bfloat16)
    for rows in (1, 3, 64):
        x = torch.randn(rows, 5, 96, dtype=torch.bfloat16)
        with torch.inference_mode():
            expected = block(x)
            with packed_linears_of(block) as count:
                got = block(x)
        assert count == 2 and torch.equal(got, expected)
    assert all("forward" not in linear.__dict__ for linear in block)
    with packed_linears_of(block), torch.enable_grad():  # training keeps nn.Linear (the packed weight has no grad)
        assert block(torch.randn(2, 96, dtype=torch.bfloat16)).requires_grad
    with packed_linears_of(block.float()) as count:
        assert count == 0


def test_engine_passes_are_the_same_with_and_without_packing(monkeypatch):
    lm = load_model("random:tiny-llama", "bfloat16", "cpu")
    with packed_linear.packed_linears(decoder_layers(lm.model)) as count:
        assert count == 7 * lm.num_layers
    prompts = [lm.tokenizer(text)["input_ids"] for text in ("Name a colour.", "Two plus two is", "Say hi")]
    configs = [SkipConfig(f"p{k}", CUSTOM, len(p), p) for k, p in
               enumerate([tuple(range(lm.num_layers)), (0, 2), (0, 1, 1, 3), (0, 2, 1, 3)])]
    groups = [(p, [[11, 12], [13]]) for p in prompts]

    def passes():
        gens = generate(lm, prompts, configs, 5, ignore_eos=True)
        logliks = continuation_logliks(lm, groups, [c.layers for c in configs], prefill="full")
        return [[g.token_ids for g in row] for row in gens], logliks

    calls = []
    real_forward = packed_linear._packed_forward
    monkeypatch.setattr(packed_linear, "_packed_forward", lambda *args: calls.append(1) or real_forward(*args))
    packed_tokens, packed_logliks = passes()
    assert calls  # the engine's passes did run the packed kernel
    monkeypatch.setattr(packed_linear, "supported", lambda: False)
    plain_tokens, plain_logliks = passes()
    assert packed_tokens == plain_tokens
    assert all((a == b).all() for a, b in zip(packed_logliks, plain_logliks))
