"""Per-token gated decoding (`pipeline.generation.gated`) against the engine and against no-cache references,
in float32 on tiny random Llama and OPT models."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.generation.configs import config_for_id, full_config
from pipeline.generation.engine import generate
from pipeline.generation.gated import gated_generate
from pipeline.generation.models import LoadedModel, load_model, load_tokenizer
from pipeline.generation.reference import gated_reference_generate

NEW_TOKENS = 6


@pytest.fixture(scope="module", params=["tiny-llama", "tiny-opt"])
def tiny(request) -> LoadedModel:
    return load_model(f"random:{request.param}", "float32", "cpu")


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    """Three prompts of different lengths, so the batch is left-padded."""
    tokenizer = load_tokenizer()
    texts = ["Give three tips for staying healthy.", "What is the capital of France? Answer briefly.", "Hi"]
    return [tokenizer(t)["input_ids"] for t in texts]


def _sign_gate(dim: int, seed: int):
    """A gate that depends on the hidden state: run layer l where a fixed random projection of h is positive."""
    generator = torch.Generator().manual_seed(seed)
    weights = torch.randn(64, dim, generator=generator)

    def gate(layer: int, hidden: torch.Tensor) -> torch.Tensor:
        return hidden.float() @ weights[layer] > 0

    return gate


@pytest.mark.parametrize("kv", ["compute", "none"])
def test_always_run_gates_equal_the_full_configuration(tiny, prompts, kv):
    full = [row[0] for row in generate(tiny, prompts, [full_config(tiny.num_layers)], NEW_TOKENS)]
    gated = gated_generate(tiny, prompts, lambda layer, h: torch.ones(h.shape[0], dtype=torch.bool), NEW_TOKENS, kv)
    assert [g.token_ids for g in gated] == [f.token_ids for f in full]
    assert all(g.decode_cost == tiny.num_layers or math.isnan(g.decode_cost) for g in gated)
    assert [g.layers_per_token for g in gated] == [f.layers_per_token for f in full]


@pytest.mark.parametrize("kv", ["compute", "none"])
def test_fixed_subset_gates_equal_that_configuration(tiny, prompts, kv):
    configs = [config_for_id(tiny.num_layers, c) for c in ("uls-3", "ee-2", "rls-4-s0")]
    rows = generate(tiny, prompts, configs, NEW_TOKENS, ignore_eos=True)
    for k, config in enumerate(configs):
        kept = set(config.layers)
        gated = gated_generate(tiny, prompts, lambda layer, h: torch.full((h.shape[0],), layer in kept), NEW_TOKENS,
                               kv, ignore_eos=True)
        assert [g.token_ids for g in gated] == [row[k].token_ids for row in rows], config.config_id
        assert [g.decode_cost for g in gated] == [config.cost] * len(prompts)


@pytest.mark.parametrize("kv", ["compute", "none"])
def test_hidden_state_gates_equal_the_no_cache_reference(tiny, prompts, kv):
    gate = _sign_gate(tiny.model.config.hidden_size, seed=1)
    gated = gated_generate(tiny, prompts, gate, NEW_TOKENS, kv)
    costs = []
    for prompt, out in zip(prompts, gated):
        tokens, cost = gated_reference_generate(tiny, prompt, gate, NEW_TOKENS, kv)
        assert out.token_ids == tokens
        assert out.decode_cost == pytest.approx(cost, nan_ok=True)
        costs.append(cost)
    assert 1 < min(costs) and max(costs) < tiny.num_layers  # the gate really skipped some layers, not all


def test_the_two_kv_semantics_differ_and_errors_are_clear(tiny, prompts):
    gate = _sign_gate(tiny.model.config.hidden_size, seed=1)
    a = gated_reference_generate(tiny, prompts[0], gate, NEW_TOKENS, "compute")
    b = gated_reference_generate(tiny, prompts[0], gate, NEW_TOKENS, "none")
    assert a != b  # masking the skipped tokens' keys changes what later tokens see
    with pytest.raises(ValueError, match="unknown kv semantics"):
        gated_generate(tiny, prompts, gate, NEW_TOKENS, "drop")
