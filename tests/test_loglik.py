"""Multiple-choice log-likelihoods on the routed layers equal a direct Hugging Face forward of each configuration."""

from __future__ import annotations

from typing import Iterator

import numpy as np
import pytest
import torch

from pipeline.generation.configs import build_configs
from pipeline.generation.loglik import _representatives, continuation_logliks
from pipeline.generation.models import LoadedModel
from tiny_models import skipped_as_identity, tiny_llama

L = 6


@pytest.fixture(scope="module")
def tiny() -> Iterator[LoadedModel]:
    """A small random Llama in float32 speaking the embedded tokenizer's ids, on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield tiny_llama(L, initializer_range=0.2)
    torch.set_num_threads(threads)


def reference_loglik(lm: LoadedModel, context: list[int], continuation: list[int], kept: tuple[int, ...],
                     prefill: str) -> float:
    """One (context, continuation, layer set), no batching, packing or cache: the model with its skipped layers
    made identity (on the continuation only under the `full` prefill), log-softmax of its logits."""
    with skipped_as_identity(lm, kept, prefill, len(context)), torch.inference_mode():
        logits = lm.model(input_ids=torch.tensor([context + continuation[:-1]])).logits[0].float()
    logprobs = torch.log_softmax(logits[len(context) - 1 :], -1)
    return float(logprobs[torch.arange(len(continuation)), torch.tensor(continuation)].double().sum())


CONFIGS = [c for c in build_configs(L, ("uls", "ee", "rls"), (0,)) if c.budget in (1, 2, 3, 5, L)]


@pytest.mark.parametrize("prefill", ["full", "skip"])
def test_every_loglik_equals_a_direct_forward_of_its_configuration(tiny, prefill):
    rng = np.random.default_rng(3)
    # Contexts of different lengths (left padding), ragged continuations, a single-token one, a shared prefix.
    groups = [(rng.integers(10, 5000, n).tolist(), [rng.integers(10, 5000, m).tolist() for m in sizes])
              for n, sizes in ((9, (3, 1, 5, 2)), (4, (2, 2)), (12, (1, 6, 3)))]
    groups[1][1][1][0] = groups[1][1][0][0]  # two continuations that start alike
    sets = [c.layers for c in CONFIGS]
    got = continuation_logliks(tiny, groups, sets, prefill, row_tokens=64)  # row_tokens: several row chunks
    for (context, conts), per_set in zip(groups, got):
        assert per_set.shape == (len(sets), len(conts))
        for u, kept in enumerate(sets):
            for t, cont in enumerate(conts):
                assert per_set[u, t] == pytest.approx(reference_loglik(tiny, context, cont, kept, prefill), abs=1e-5)


def test_prefix_sharing_groups_exactly_the_sets_with_equal_earlier_layers():
    sets = [(0, 1, 2, 3), (0, 1), (0, 2, 3), (0, 1, 3)]
    rep = _representatives(sets, 4)
    assert rep.tolist() == [[0, 0, 0, 0], [0, 0, -1, -1], [0, -1, 2, 2], [0, 0, -1, 3]]
