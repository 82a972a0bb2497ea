"""Multiple-choice log-likelihoods on the routed layers equal a direct Hugging Face forward of each configuration,
and of each layer program (repeats, reorderings) run literally without a cache."""

from __future__ import annotations

from typing import Iterator

import numpy as np
import pytest
import torch

from pipeline.generation.configs import build_configs
from pipeline.generation.loglik import _representatives, continuation_logliks, pair_logliks
from pipeline.generation.models import LoadedModel, load_model
from pipeline.generation.reference import program_loglik
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
    rep = _representatives(sets, [0] * len(sets), (0, 1, 2, 3))
    assert rep.tolist() == [[0, 0, 0, 0], [0, 0, -1, -1], [0, -1, 2, 2], [0, 0, -1, 3]]


PROGRAMS = [(0, 1, 1, 2, 5), (0, 2, 1, 3), (1, 0, 3, 3, 4, 1), (0, 3), (0, 1, 2, 3, 4, 5), (0, 4, 4, 4)]


def _groups(seed: int) -> list[tuple[list[int], list[list[int]]]]:
    rng = np.random.default_rng(seed)
    return [(rng.integers(10, 5000, n).tolist(), [rng.integers(10, 5000, m).tolist() for m in sizes])
            for n, sizes in ((7, (3, 1, 4)), (3, (2, 2)), (10, (1, 5)))]


@pytest.fixture(scope="module")
def tiny_opt() -> Iterator[LoadedModel]:
    """A small random OPT (learned positions, another decoder layer), 6 layers like `tiny`, on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield load_model("random:tiny-opt", "float32", "cpu")
    torch.set_num_threads(threads)


@pytest.mark.parametrize("model", ["tiny", "tiny_opt"])
@pytest.mark.parametrize("prefill", ["full", "skip"])
def test_programs_equal_a_literal_no_cache_run_and_pairs_equal_the_cross_product(model, prefill, request):
    tiny = request.getfixturevalue(model)
    groups = _groups(5)
    groups[1][1][1][0] = groups[1][1][0][0]
    got = continuation_logliks(tiny, groups, PROGRAMS, prefill, row_tokens=48)  # several chunks, mixed kinds
    for (context, conts), per_program in zip(groups, got):
        for u, program in enumerate(PROGRAMS):
            for t, cont in enumerate(conts):
                expected = program_loglik(tiny, context, cont, program, prefill)
                assert per_program[u, t] == pytest.approx(expected, abs=1e-5), (program, t)
    # Chosen (group, program) pairs, a subset and programs mixed: each as the cross product gave it.
    pairs = [(g, PROGRAMS[(g + k) % len(PROGRAMS)]) for g in range(len(groups)) for k in (0, 2, 3)]
    for (g, program), values in zip(pairs, pair_logliks(tiny, groups, pairs, prefill, row_tokens=48)):
        np.testing.assert_allclose(values, got[g][PROGRAMS.index(program)], rtol=0, atol=1e-5)


def test_program_rows_share_exactly_their_equal_prefixes_on_the_same_context():
    schedule = (0, 1, 1, 2, 0, 3)
    programs = [(0, 1, 1, 3), (0, 1, 2), (0, 1, 1, 3), (0, 0, 3)]
    rep = _representatives(programs, [0, 0, 1, 0], schedule)
    assert rep.tolist() == [[0, 0, 0, -1, -1, 0], [0, 0, -1, 1, -1, -1], [2, 2, 2, -1, -1, 2],
                            [0, -1, -1, -1, 3, 3]]


def test_a_program_that_does_not_fit_is_one_line(tiny):
    with pytest.raises(ValueError, match=r"program \[1, 6\] does not fit the 6-layer model"):
        continuation_logliks(tiny, _groups(1), [(0, 1), (1, 6)])
