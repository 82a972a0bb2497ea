"""The engine's packed bfloat16 linears (`packed_linear`) against `nn.Linear`: bit-identical outputs on the
embedded model's widths (small calls packed, large or non-contiguous ones not), through the engine's decode
and log-likelihood passes, and every module restored after."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pipeline.generation import packed_linear
from pipeline.generation.configs import CUSTOM, SkipConfig
from pipeline.generation.engine import generate
from pipeline.generation.loglik import continuation_logliks
from pipeline.generation.models import EMBEDDED_MODEL, decoder_layers, load_model

pytestmark = pytest.mark.skipif(not packed_linear.supported(), reason="no oneDNN bfloat16 linear on this CPU")


@pytest.fixture
def packed_calls(monkeypatch) -> list[int]:
    """Row counts of the calls the packed kernel served."""
    calls: list[int] = []
    real = packed_linear._pointwise
    monkeypatch.setattr(packed_linear, "_pointwise", lambda x, w, b: calls.append(x.shape[0]) or real(x, w, b))
    return calls


def test_packed_linear_is_bit_identical_and_restored(packed_calls):
    torch.manual_seed(1)
    for shape, bias in (((576, 576), False), ((576, 1536), False), ((1536, 576), True)):
        linear = nn.Linear(*shape, bias=bias).to(torch.bfloat16)
        inputs = [torch.randn(rows, 3, shape[0], dtype=torch.bfloat16) for rows in (1, 7, 21)]  # 3..63 rows
        inputs += [torch.randn(352, shape[0], dtype=torch.bfloat16),  # past MAX_ROWS: nn.Linear's own
                   torch.randn(shape[0], 9, dtype=torch.bfloat16).t()]  # non-contiguous: nn.Linear's own
        with torch.inference_mode():
            expected = [linear(x) for x in inputs]
            with packed_linear.packed_linears([linear]) as count:
                linear(inputs[0])  # the first call packs the weight and checks the kernel on 1..MAX_ROWS rows
                packed_calls.clear()
                got = [linear(x) for x in inputs]
        assert count == 1 and all(torch.equal(a, b) for a, b in zip(got, expected))
        assert "forward" not in linear.__dict__
        if packed_linear._AGREES[(*shape, bias, torch.get_num_threads())]:
            assert packed_calls == [3, 21, 63]
    with packed_linear.packed_linears([linear]), torch.enable_grad():  # training keeps nn.Linear
        assert linear(torch.randn(2, shape[0], dtype=torch.bfloat16)).requires_grad
    with packed_linear.packed_linears([linear.float()]) as count:
        assert count == 0


def test_engine_passes_are_the_same_with_and_without_packing(monkeypatch, packed_calls):
    """The embedded model in bfloat16: 12 prompts (a ~370-row prefill, past MAX_ROWS) under a program batch."""
    lm = load_model(EMBEDDED_MODEL, "bfloat16", "cpu")
    with packed_linear.packed_linears(decoder_layers(lm.model)) as count:
        assert count == 7 * lm.num_layers
    prompts = [lm.tokenizer(f"Question {i}: you are given a {w}, a length of rope and a sunny afternoon in a "
                            f"quiet town. Name three uses of the {w}.")["input_ids"]
               for i, w in enumerate(["brick", "river", "violin", "ladder", "cloud", "lamp"] * 2)]
    programs = [tuple(range(lm.num_layers)), tuple(range(0, lm.num_layers, 2)), (0, 1, 2, 2, 4, 3, *range(5, 20))]
    configs = [SkipConfig(f"p{k}", CUSTOM, len(p), p) for k, p in enumerate(programs)]
    groups = [(p, [[11, 12], [13]]) for p in prompts[:4]]

    def passes():
        gens = generate(lm, prompts, configs, 6, ignore_eos=True)
        logliks = continuation_logliks(lm, groups, programs, prefill="full")
        return [[g.token_ids for g in row] for row in gens], logliks

    packed_tokens, packed_logliks = passes()
    assert packed_calls and max(packed_calls) <= packed_linear.MAX_ROWS  # the packed kernel ran, on small calls
    monkeypatch.setattr(packed_linear, "supported", lambda: False)
    plain_tokens, plain_logliks = passes()
    assert packed_tokens == plain_tokens
    assert all((a == b).all() for a, b in zip(packed_logliks, plain_logliks))
