"""Layer programs (repeats, reorderings) in the engine against a literal no-cache run of each program, and the
program rule of configs.py, on tiny float32 Llama and OPT models under both prefill policies."""

from __future__ import annotations

import bisect
import functools
import random

import numpy as np
import pytest

from pipeline.generation.configs import (
    CUSTOM,
    SkipConfig,
    check_custom_layers,
    check_program,
    loop_configs,
    loop_program,
)
from pipeline.generation.engine import _supersequence, generate, generate_pairs, layer_schedule, program_membership
from pipeline.generation.models import decoder_layers
from pipeline.generation.reference import program_generate
from pipeline.search.policy import mutate
from test_engine import prompts, tiny_llama, tiny_opt  # noqa: F401 (fixtures)

NEW_TOKENS = 4
PROGRAMS = [
    (0, 1, 1, 2, 3),        # a repeat
    (0, 2, 1, 3),           # a reordering
    (0, 1, 2, 2, 3, 3, 1),  # both, ending out of order
    (1, 0, 3),              # layer 0 not first
    (0, 2, 3),              # a subset, decoded in the same batch as the programs
    loop_program(4, 1, 2, 3),
]


def _configs() -> list[SkipConfig]:
    return [SkipConfig(f"p{k}", CUSTOM, len(p), p) for k, p in enumerate(PROGRAMS)]


@pytest.mark.parametrize("model_fixture", ["tiny_llama", "tiny_opt"])
@pytest.mark.parametrize("prefill", ["full", "skip"])
def test_programs_equal_the_literal_no_cache_reference(model_fixture, prefill, prompts, request):  # noqa: F811
    lm = request.getfixturevalue(model_fixture)
    chosen = prompts[:2]
    configs = _configs()
    originals = list(decoder_layers(lm.model))
    got = generate(lm, chosen, configs, NEW_TOKENS, prefill=prefill)
    for k, cfg in enumerate(configs):
        expected = program_generate(lm, chosen, cfg.layers, NEW_TOKENS, prefill=prefill)
        assert [row[k].token_ids for row in got] == expected, cfg.layers
    assert list(decoder_layers(lm.model)) == originals and lm.num_layers == len(originals)
    # Chosen (prompt, program) pairs decode as the cross product does, whatever the rest of their batch.
    pairs = [(i, configs[(i + k) % len(configs)]) for i in range(len(chosen)) for k in (0, 3)]
    paired = generate_pairs(lm, chosen, pairs, NEW_TOKENS, prefill=prefill, max_rows=3)
    for (i, cfg), gen in zip(pairs, paired):
        assert gen.token_ids == got[i][configs.index(cfg)].token_ids


def test_layers_per_token_counts_every_execution(tiny_llama, prompts):  # noqa: F811
    configs = _configs()
    for prefill, first in (("full", lambda cfg: tiny_llama.num_layers), ("skip", lambda cfg: cfg.cost)):
        got = generate(tiny_llama, prompts[:2], configs, NEW_TOKENS, prefill=prefill, ignore_eos=True)
        for row in got:
            for cfg, g in zip(configs, row):
                assert g.layers_per_token == pytest.approx((first(cfg) + cfg.cost * (NEW_TOKENS - 1)) / NEW_TOKENS)


def test_supersequence_of_two_is_a_shortest_one():
    """Against the identity |SCS(a, b)| = |a| + |b| - |LCS(a, b)|, the LCS by an independent recursion."""
    rng = random.Random(0)

    @functools.lru_cache(maxsize=None)
    def lcs(a: tuple, b: tuple) -> int:
        if not a or not b:
            return 0
        return 1 + lcs(a[1:], b[1:]) if a[0] == b[0] else max(lcs(a[1:], b), lcs(a, b[1:]))

    for _ in range(300):
        a, b = (tuple(rng.randint(0, 4) for _ in range(rng.randint(0, 7))) for _ in range(2))
        merged = _supersequence(a, b)
        for part in (a, b):
            rest = iter(merged)
            assert all(x in rest for x in part)
        assert len(merged) == len(a) + len(b) - lcs(a, b)


def test_schedule_embeds_every_program_and_is_the_stack_for_subsets():
    assert layer_schedule([(0, 2), (0, 1, 3)], 4) == (0, 1, 2, 3)
    schedule = layer_schedule(PROGRAMS, 4)
    member = program_membership(PROGRAMS, schedule, "cpu")
    for program, row in zip(PROGRAMS, member):
        assert tuple(schedule[s] for s in row.nonzero().squeeze(1).tolist()) == program
    assert len(schedule) < sum(map(len, PROGRAMS))


def test_schedule_adds_at_most_each_programs_departure_from_depth_order():
    """Each program p costs at most |p| - LIS(p) slots over the layers used (LIS: its longest strictly
    increasing subsequence, by patience sorting here), whatever the order the programs come in: a schedule
    folded in given order stacked misaligned runs (63 slots for the programs benchmark's 16, bound 46)."""
    def lis(program: tuple[int, ...]) -> int:
        tails: list[int] = []
        for x in program:
            i = bisect.bisect_left(tails, x)
            tails[i:i + 1] = [x]
        return len(tails)

    rng = np.random.default_rng(0)
    for _ in range(20):
        programs = [mutate(tuple(range(30)), int(rng.integers(8, 31)), 30, rng) for _ in range(16)]
        schedule = layer_schedule(programs, 30)
        member = program_membership(programs, schedule, "cpu")
        assert bool(member.any(0).all())  # no slot that no program runs
        bound = len(set().union(*programs)) + sum(len(p) - lis(p) for p in programs)
        assert len(schedule) <= bound
        assert layer_schedule(programs[::-1], 30) == schedule  # the input order does not matter


def test_program_rule_and_loop_family():
    assert check_custom_layers("mine", [0, 2, 2, 1]) == (0, 2, 2, 1)
    assert loop_program(6, 2, 3, 3) == (0, 1, 2, 3, 2, 3, 2, 3, 4, 5)
    ids = [c.config_id for c in loop_configs(6, {"starts": [2, 5], "lengths": [2], "repeats": [2]})]
    assert ids == ["loop-2-3-x2"]  # 5..6 does not fit a 6-layer model
    for layers, message in (([], "non-empty"), ([1, 2], "layer 0 is always executed"), ([0, 6], "out of range"),
                            ([0, -1], "non-negative")):
        with pytest.raises(ValueError, match=message) as caught:
            check_program("bad", layers, 6)
        assert "\n" not in str(caught.value)
    with pytest.raises(ValueError, match=r"\[loop\] repeats"):
        loop_configs(6, {"starts": [1], "lengths": [2], "repeats": [1]})
