"""Hidden-state similarity: exact for the full model and for equal layer sets, and equal to a direct computation."""

from __future__ import annotations

from typing import Iterator

import numpy as np
import pytest
import torch

from pipeline.analysis.similarity_task import SimilarityTask, state_similarity
from pipeline.data.adapters import Example
from pipeline.generation.configs import SkipConfig, build_configs
from pipeline.generation.models import LoadedModel
from tiny_models import skipped_as_identity, tiny_llama

L = 6


@pytest.fixture(scope="module")
def tiny() -> Iterator[LoadedModel]:
    """A small random Llama (the embedded model's architecture) in float32, speaking the embedded tokenizer's ids.

    Its many tiny forwards run on one thread: on a shared 2-core machine, more only adds contention.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield tiny_llama(L)
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def sequences() -> tuple[list[list[int]], list[list[int]]]:
    """Three prompts and responses of different lengths (left padding, ragged responses)."""
    rng = np.random.default_rng(1)
    prompts = [rng.integers(10, 5000, size).tolist() for size in (9, 5, 12)]
    responses = [rng.integers(10, 5000, size).tolist() for size in (7, 3, 5)]
    return prompts, responses


CONFIGS = [c for c in build_configs(L, ("uls", "ee", "rls"), (0,)) if c.budget in (1, 2, 4, L)]


@pytest.mark.parametrize("prefill", ["full", "skip"])
def test_full_model_is_exactly_one_and_equal_layer_sets_are_identical(tiny, sequences, prefill):
    prompts, responses = sequences
    twin = SkipConfig("custom-uls-2", "custom", 2, next(c for c in CONFIGS if c.config_id == "uls-2").layers)
    configs = (*CONFIGS, twin)
    examples = [Example(f"s{i}", "", tuple(p), "", False, False) for i, p in enumerate(prompts)]
    task = SimilarityTask(configs, prefill, "full", 64, 2, {f"s{i}": tiny.tokenizer.decode(r)
                                                          for i, r in enumerate(responses)})
    table = task.run(tiny, 0, examples).to_pandas().set_index(["seq_id", "config_id"])
    full = table.xs("full", level="config_id")
    assert (full["final_similarity"] == 1.0).all()
    assert all(list(v) == [1.0] * L for v in full["layer_similarity"])
    uls2, custom = table.xs("uls-2", level="config_id"), table.xs("custom-uls-2", level="config_id")
    assert uls2["final_similarity"].tolist() == custom["final_similarity"].tolist()
    assert [list(v) for v in uls2["layer_similarity"]] == [list(v) for v in custom["layer_similarity"]]
    assert (table["final_similarity"] < 1.0).sum() >= len(examples) * (len(CONFIGS) - 2)  # the others differ
    assert len(table) == len(examples) * len(configs)


def reference_similarity(lm: LoadedModel, prompt: list[int], response: list[int], layers: tuple[int, ...],
                         prefill: str) -> tuple[float, list[float]]:
    """One sequence, one configuration, no batching and no cache: the model with its skipped layers made identity
    (on the response only under the `full` prefill), read with output_hidden_states=True."""

    def states(kept: tuple[int, ...]) -> tuple[torch.Tensor, ...]:
        with skipped_as_identity(lm, kept, prefill, len(prompt)), torch.inference_mode():
            hidden = lm.model(input_ids=torch.tensor([prompt + response]), output_hidden_states=True).hidden_states
        return tuple(h[0, len(prompt):] for h in hidden)  # (embeddings, after layer 0 .. L-2, final normed)

    mine, full = states(layers), states(tuple(range(L))) if layers != tuple(range(L)) else None
    full = mine if full is None else full
    cos = [torch.nn.functional.cosine_similarity(a, b, dim=-1).mean().item() for a, b in zip(mine, full)]
    return cos[-1], cos[1:-1]


@pytest.mark.parametrize("prefill", ["full", "skip"])
def test_equals_a_direct_output_hidden_states_computation(tiny, sequences, prefill):
    prompts, responses = sequences
    sets = [c.layers for c in CONFIGS]
    final, layers = state_similarity(tiny, prompts, responses, sets, prefill)
    for i, (prompt, response) in enumerate(zip(prompts, responses)):
        for u, kept in enumerate(sets):
            expected_final, expected_layers = reference_similarity(tiny, prompt, response, kept, prefill)
            assert final[i, u] == pytest.approx(expected_final, abs=2e-6), (i, kept)
            # hidden_states holds layers 0..L-2 raw; the last layer's raw state only normed, as the final state
            assert layers[i, u, : L - 1] == pytest.approx(expected_layers, abs=2e-6), (i, kept)


def test_summary_is_the_token_weighted_mean_with_intervals_from_the_same_resamples() -> None:
    import pyarrow as pa

    from pipeline.analysis.bootstrap import resample_indices
    from pipeline.analysis.similarity import SHARD_SCHEMA, summarise

    rng = np.random.default_rng(4)
    n, layers = 7, 3
    configs = [("full", "full", 3), ("ee-1", "ee", 1), ("uls-2", "uls", 2)]
    tokens = rng.integers(1, 9, n)
    tokens[2] = 0  # a sequence without response tokens: null similarities, no weight
    sims = {c: rng.random((n, layers + 1)) if c != "full" else np.ones((n, layers + 1)) for c, _, _ in configs}
    rows = [{"seq_id": f"s{i}", "shard": 0, "config_id": c, "family": f, "cost": cost, "tokens": int(tokens[i]),
             "final_similarity": None if tokens[i] == 0 else float(sims[c][i, layers]),
             "layer_similarity": None if tokens[i] == 0 else sims[c][i, :layers].tolist()}
            for i in range(n) for c, f, cost in configs]
    summary = summarise(pa.Table.from_pylist(rows, schema=SHARD_SCHEMA), resamples=50, seed=2).to_pandas()
    assert len(summary) == len(configs) * (layers + 1)
    assert summary["config_id"].iloc[0] == "full" and (summary.loc[summary["config_id"] == "full", "lo"] == 1).all()
    weight = np.where(tokens > 0, tokens, 0)
    for c, _, _ in configs:
        mine = summary[summary["config_id"] == c].set_index("layer")
        for layer in range(layers + 1):
            values = np.nan_to_num(sims[c][:, layer])
            assert mine.loc[layer, "similarity"] == pytest.approx(np.average(values, weights=weight), abs=1e-12)
            draws = [np.average(values[idx], weights=weight[idx]) for idx in resample_indices(n, 50, 2)]
            assert (mine.loc[layer, "lo"], mine.loc[layer, "hi"]) == pytest.approx(
                tuple(np.quantile(draws, [0.025, 0.975])), abs=1e-12)
