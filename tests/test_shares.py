"""CoLa's shares on hand-made answer matrices, and the permutation null's invariants."""

import numpy as np
import pytest

from pipeline.analysis.shares import cola_shares, null_shares, permutation_null


def test_shares_by_hand():
    # columns: full (cost 4), a (cost 2), b (cost 1); half the model = 2 layers
    correct = np.array([[1, 1, 0],   # right, a shorter config right
                        [1, 0, 0],   # right, no shorter one
                        [0, 0, 1],   # wrong, fixed by b
                        [0, 0, 0]])  # wrong, not fixed
    shares = cola_shares(correct, np.array([4, 2, 1]), full=0, max_cost=2, resamples=50)
    assert (shares.fixed, shares.wrong, shares.shorter, shares.right) == (0.5, 2, 0.5, 2)
    assert 0.0 <= shares.fixed_interval[0] <= shares.fixed_interval[1] <= 1.0


def test_null_keeps_accuracy_and_full_column():
    rng = np.random.default_rng(1)
    correct = rng.random((50, 6)) < 0.4
    null = permutation_null(correct, full=2, seed=3)
    np.testing.assert_array_equal(null.sum(0), correct.sum(0))
    np.testing.assert_array_equal(null[:, 2], correct[:, 2])
    np.testing.assert_array_equal(null, permutation_null(correct, full=2, seed=3))


def test_null_removes_planted_skill():
    # config 1 is right exactly where the full model is wrong: a real 'fixed' share of 1; the null's is ~0.5
    full = np.arange(40) % 2 == 0
    correct = np.stack([full, ~full], axis=1)
    assert cola_shares(correct, np.array([2, 1]), 0, 1, resamples=20).fixed == 1.0
    null = null_shares(correct, np.array([2, 1]), 0, 1, draws=100)
    assert 0.3 < null["fixed"] < 0.7 and null["fixed_hi"] < 1.0


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="correct must be"):
        cola_shares(np.zeros((3, 2)), np.array([1, 2, 3]), 0, 1)
