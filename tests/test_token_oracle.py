"""The per-token oracle (`pipeline.analysis.token_oracle*`) against a brute-force computation on tiny models:
for every token and configuration, a Hugging Face cache of the full model over the prefix, then the one token
through the configuration's layers (the others identity)."""

from __future__ import annotations

import copy

import numpy as np
import pandas as pd
import pytest
import torch
from transformers import DynamicCache

from pipeline.analysis.token_oracle import by_position, cheapest_matching, summarise
from pipeline.analysis.token_oracle_task import token_matches
from pipeline.generation.configs import build_configs, full_config
from pipeline.generation.engine import generate, wrapped_layers
from pipeline.generation.models import LoadedModel, load_model, load_tokenizer
from pipeline.generation.reference import _MaskedLayer

NEW_TOKENS = 5


@pytest.fixture(scope="module", params=["tiny-llama", "tiny-opt"])
def tiny(request) -> LoadedModel:
    return load_model(f"random:{request.param}", "float32", "cpu")


@torch.inference_mode()
def _brute_force(lm: LoadedModel, prompt: list[int], output: list[int], layer_sets) -> tuple[list[int], np.ndarray]:
    """Targets and (U, n - 1) matches, one position and configuration at a time."""
    model = lm.model
    targets, matches = [], np.zeros((len(layer_sets), len(output) - 1), bool)
    with wrapped_layers(model, _MaskedLayer) as wrappers:
        for t in range(1, len(output)):
            for w in wrappers:
                w.keep = True
            prefix = torch.tensor([prompt + output[: t - 1]])
            cache = DynamicCache(config=model.config)
            model(input_ids=prefix, past_key_values=cache, use_cache=True)
            token = torch.tensor([[output[t - 1]]])
            full = model(input_ids=token, past_key_values=copy.deepcopy(cache), use_cache=True).logits[0, -1].argmax()
            targets.append(int(full))
            for u, layers in enumerate(layer_sets):
                for j, w in enumerate(wrappers):
                    w.keep = j in layers
                logits = model(input_ids=token, past_key_values=copy.deepcopy(cache), use_cache=True).logits
                matches[u, t - 1] = int(logits[0, -1].argmax()) == targets[-1]
    return targets, matches


def test_token_matches_equal_brute_force(tiny):
    tokenizer = load_tokenizer()
    prompts = [tokenizer(t)["input_ids"] for t in ("Name a colour.", "Write one short sentence about the sea, please.")]
    configs = [c for c in build_configs(tiny.num_layers, ["uls", "ee", "rls"], [0]) if c.cost in (2, 4)]
    layer_sets = list(dict.fromkeys(c.layers for c in configs))
    outputs = [row[0].token_ids for row in generate(tiny, prompts, [full_config(tiny.num_layers)], NEW_TOKENS,
                                                      ignore_eos=True)]
    targets, matches = token_matches(tiny, prompts, outputs, layer_sets)
    for i, (prompt, output) in enumerate(zip(prompts, outputs)):
        want_targets, want = _brute_force(tiny, prompt, output, layer_sets)
        assert targets[i].tolist() == want_targets == output[1:]  # the full model's own greedy tokens
        assert np.array_equal(matches[i].numpy(), want)
    assert 0 < matches.float().mean() < 1  # some configurations miss some tokens


def test_cheapest_matching_and_summaries():
    matches = np.array([[True, True, False, True], [False, False, False, False], [False, True, True, False]])
    costs = np.array([3, 1, 2, 2])
    families = np.array(["uls", "uls", "ee", "ee"])
    cheapest = cheapest_matching(matches, costs, families, ["ee", "uls"], num_layers=4)
    assert cheapest.tolist() == [[2, 1], [4, 4], [2, 1]]
    tokens = pd.DataFrame({"seq_id": ["a", "a", "b"], "position": [1, 2, 1], "family": "uls",
                           "cost": [1, 4, 1], "num_layers": 4})
    summary = summarise(tokens, resamples=200)
    assert summary["mean_cost"].tolist() == [2.0] and summary["tokens"].tolist() == [3]
    assert summary["mean_cost_lo"].iloc[0] >= 1 and summary["mean_cost_hi"].iloc[0] <= 4
    positions = by_position(tokens, bins=2)
    assert positions["tokens"].sum() == 3 and positions["share_full"].max() == 1.0
