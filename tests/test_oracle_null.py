"""The oracle's residual-permutation null: what it keeps, its seed, and that it tells selection from skill."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.analysis.bootstrap import bootstrap_oracle
from pipeline.analysis.oracle import build_frontier, min_budget_to_match
from pipeline.analysis.oracle_null import additive_fit, binary_null_matrix, null_matrix, oracle_null

L = 24
COSTS = np.array([L, *range(1, L)], dtype=np.float64)  # full first, then ULS 1..23


def _additive(seed: int, n: int = 200) -> np.ndarray:
    """The issue's matrix: difficulty + configuration quality (cheaper is worse by up to 0.25) + noise sd 0.08."""
    rng = np.random.default_rng(seed)
    difficulty = rng.normal(0.3, 0.1, n)
    quality = -0.25 * (1 - COSTS / L)
    return difficulty[:, None] + quality[None, :] + rng.normal(0, 0.08, (n, len(COSTS)))


def _planted(seed: int, n: int = 200) -> np.ndarray:
    """Half the sequences truly need few layers: one cheap configuration (cost 2-8, its own per sequence) scores
    exactly as the full model; everything else as in `_additive`, cheaper worse by up to 0.3, noise sd 0.03."""
    rng = np.random.default_rng(seed)
    full = rng.normal(0.3, 0.1, n)
    scores = full[:, None] - 0.3 * (1 - COSTS / L)[None, :] + rng.normal(0, 0.03, (n, len(COSTS)))
    scores[:, 0] = full
    easy = np.arange(n // 2)
    scores[easy, rng.integers(2, 9, easy.size)] = full[easy]  # column c holds cost c for c = 1..23
    return scores


def test_null_keeps_configuration_means_exactly_and_sequence_means_in_expectation():
    scores = _additive(1, 60)
    fit = additive_fit(scores)
    np.testing.assert_allclose(fit.fitted + fit.residual, scores, atol=1e-12)
    np.testing.assert_allclose(fit.residual.sum(axis=0), 0, atol=1e-12)
    np.testing.assert_allclose(fit.residual.sum(axis=1), 0, atol=1e-12)
    draws = [null_matrix(fit, np.random.default_rng([0, d])) for d in range(400)]
    for draw in draws[:20]:
        np.testing.assert_allclose(draw.mean(axis=0), scores.mean(axis=0), atol=1e-12)
        for k in range(scores.shape[1]):  # each column holds the same residuals, reordered
            np.testing.assert_allclose(np.sort(draw[:, k] - fit.fitted[:, k]), np.sort(fit.residual[:, k]), atol=1e-12)
    row_means = np.mean([d.mean(axis=1) for d in draws], axis=0)
    spread = fit.residual.std() / np.sqrt(scores.shape[1] * len(draws))
    assert np.abs(row_means - scores.mean(axis=1)).max() < 6 * spread
    assert np.abs(draws[0].mean(axis=1) - scores.mean(axis=1)).max() > 6 * spread  # one draw does move them


def test_null_is_reproducible_with_its_seed():
    scores = _additive(2, 50)
    budgets = np.array([4.0, 8.0, 12.0])
    a = oracle_null(scores, COSTS, budgets, draws=20, seed=5)
    b = oracle_null(scores, COSTS, budgets, draws=20, seed=5)
    c = oracle_null(scores, COSTS, budgets, draws=20, seed=6)
    np.testing.assert_array_equal(a.values, b.values)
    np.testing.assert_array_equal(a.match, b.match)
    assert not np.array_equal(a.values, c.values)
    head = oracle_null(scores, COSTS, budgets, draws=5, seed=5)  # draw d does not depend on how many are asked
    np.testing.assert_array_equal(head.values, a.values[:5])
    single = build_frontier(null_matrix(additive_fit(scores), np.random.default_rng([5, 3])), COSTS)
    assert a.match[3] == min_budget_to_match(single, single.scores[:, 0])  # the stacked solve = a plain one


def _real_and_null(scores: np.ndarray):
    frontier = build_frontier(scores, COSTS)
    real = min_budget_to_match(frontier, scores[:, 0])
    boot = bootstrap_oracle(scores, COSTS, np.array([float(L)]), resamples=300, seed=0)
    real_interval = boot.interval(boot.match)
    null = oracle_null(scores, COSTS, np.array([float(L)]), draws=100, seed=0).match_summary()
    return real, real_interval, null


@pytest.mark.parametrize("seed", [3, 4])
def test_without_per_sequence_structure_real_and_null_agree(seed):
    real, (lo, hi), (null, null_lo, null_hi) = _real_and_null(_additive(seed))
    assert real < 0.6 * L  # the oracle alone looks impressive (the issue: 9.3 of 24 layers)...
    assert lo <= null <= hi  # ...and the null reaches the same, within the real one's interval: all of it is
    assert null_lo <= hi and lo <= null_hi  # selection


@pytest.mark.parametrize("seed", [3, 4])
def test_with_planted_structure_the_real_oracle_is_clearly_ahead(seed):
    real, (lo, hi), (null, null_lo, null_hi) = _real_and_null(_planted(seed))
    assert hi < null_lo  # the whole bootstrap interval below the null's
    assert null - real > 1.5  # by more than a layer and a half


def test_binary_null_draws_stay_zero_one_and_keep_accuracies_in_expectation():
    rng = np.random.default_rng(3)
    difficulty = rng.random(400)[:, None]
    scores = (rng.random((400, 6)) < np.clip(difficulty + np.linspace(-0.3, 0.2, 6)[None, :], 0, 1)).astype(float)
    fit = additive_fit(scores)
    draw = binary_null_matrix(fit, np.random.default_rng(0))
    assert set(np.unique(draw)) <= {0.0, 1.0}
    np.testing.assert_allclose(draw.mean(axis=0), scores.mean(axis=0), atol=0.06)
    null = oracle_null(scores, np.arange(6, 0, -1.0), np.array([1.0, 3.0, 6.0]), draws=20, binary=True)
    assert (null.values <= 1.0).all()
