"""The oracle against independent exact solvers (scipy milp / linprog) and hand-worked cases."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.optimize import LinearConstraint, linprog, milp

from pipeline.analysis.oracle import _walk_order, allocate, build_frontier, min_budget_to_match

pytestmark = pytest.mark.filterwarnings("error")  # a numpy divide-by-zero or invalid value is a bug here


def exact_optimum(scores: np.ndarray, costs: np.ndarray, budget: float) -> float:
    """Best mean score with one configuration per sequence and mean cost <= budget (binary program)."""
    n, k = scores.shape
    one_each = LinearConstraint(np.kron(np.eye(n), np.ones(k)), 1, 1)
    spend = LinearConstraint(np.tile(costs, n)[None, :], -np.inf, budget * n)
    res = milp(-scores.ravel() / n, constraints=[one_each, spend], integrality=np.ones(n * k), bounds=(0, 1))
    assert res.success
    return -res.fun


def lp_optimum(scores: np.ndarray, costs: np.ndarray, budget: float) -> float:
    n, k = scores.shape
    res = linprog(
        -scores.ravel() / n,
        A_ub=np.tile(costs, n)[None, :],
        b_ub=[budget * n],
        A_eq=np.kron(np.eye(n), np.ones(k)),
        b_eq=np.ones(n),
        bounds=(0, 1),
    )
    assert res.success
    return -res.fun


def random_instance(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Small instances rich in ties: integer scores, repeated columns, equal and quarter-valued costs.

    Costs are multiples of 1/4 so every integral total cost is exact and far (>= 1/8) from the budgets
    drawn below, out of reach of the solvers' feasibility tolerance.
    """
    n, k = int(rng.integers(1, 9)), int(rng.integers(1, 6))
    kind = rng.integers(3)
    if kind == 0:
        scores = rng.integers(0, 4, size=(n, k)).astype(float)
    elif kind == 1:
        scores = rng.random((n, k))
    else:
        scores = rng.random((n, k)).round(1)
        scores[:, rng.integers(k)] = scores[:, rng.integers(k)]  # a duplicated column
    costs = rng.integers(1, 7, size=k).astype(float)
    if rng.random() < 0.3:
        costs = costs + rng.integers(0, 4, size=k) / 4
    if rng.random() < 0.3:
        costs[rng.integers(k)] = costs[rng.integers(k)]  # equal costs
    return scores, costs


def budgets_for(rng: np.random.Generator, costs: np.ndarray, n: int) -> list[float]:
    """The cheapest budget, the most expensive, exact quarter-grid totals (ties) and points between them."""
    lo, hi = costs.min(), costs.max()
    totals = np.arange(lo * n * 4, hi * n * 4 + 1) / 4  # every reachable multiple of 1/4 in total cost
    picks = rng.choice(totals, size=min(2, totals.size), replace=False) / n
    between = (rng.choice(totals, size=min(2, totals.size), replace=False) + 0.125) / n
    return [lo, hi, *picks, *between[between >= lo]]


def test_against_exact_solvers_on_random_instances() -> None:
    rng = np.random.default_rng(20240605)
    checked = 0
    for _ in range(200):
        scores, costs = random_instance(rng)
        n = scores.shape[0]
        frontier = build_frontier(scores, costs)
        assert (frontier.seg_dcost > 0).all() and (frontier.seg_dscore > 0).all()
        k = np.arange(costs.size)
        cheapest_best = [np.lexsort((k, -row, costs))[0] for row in scores]  # cheapest, best, lowest index
        assert allocate(frontier, costs.min()).choice.tolist() == cheapest_best
        spread = scores.max() - scores.min()
        for budget in budgets_for(rng, costs, n):
            a = allocate(frontier, budget)
            choice = a.choice
            assert choice.shape == (n,)
            assert costs[choice].mean() <= budget + 1e-12, "integral allocation over budget"
            assert a.value == pytest.approx(scores[np.arange(n), choice].mean(), abs=1e-12)
            assert a.cost == pytest.approx(costs[choice].mean(), abs=1e-12)
            np.testing.assert_allclose(a.shares, np.bincount(choice, minlength=costs.size) / n, atol=1e-12)
            opt = exact_optimum(scores, costs, budget)
            assert a.value <= opt + 1e-9
            assert a.value >= opt - a.gap - 1e-9
            assert a.lp_bound >= opt - 1e-9
            assert a.lp_bound == pytest.approx(lp_optimum(scores, costs, budget), abs=1e-9)
            assert 0.0 <= a.gap <= spread / n + 1e-12
            checked += 1
    assert checked > 800


def test_walk_order_equals_stable_argsort_with_ties_and_near_ties() -> None:
    rng = np.random.default_rng(7)
    base = rng.choice([0.5, 1.0, 1 / 3, 2.0], size=5000)
    near = base * (1 + rng.integers(-3, 4, size=base.size) * np.finfo(float).eps)  # equal in the top bits
    for slope in (base, near, rng.random(100_000) + 1e-3, np.array([]), np.array([1.5])):
        np.testing.assert_array_equal(_walk_order(slope), np.argsort(-slope, kind="stable"))


def test_budget_below_cheapest_raises() -> None:
    frontier = build_frontier(np.array([[0.1, 0.5], [0.3, 0.2]]), np.array([2.0, 4.0]))
    with pytest.raises(ValueError, match="below the cheapest"):
        allocate(frontier, 1.99)
    assert allocate(frontier, 2.0).choice.tolist() == [0, 0]


def test_budget_at_or_above_max_gives_each_sequence_its_best_cheapest_first() -> None:
    rng = np.random.default_rng(3)
    scores = rng.integers(0, 3, size=(400, 6)).astype(float)  # many ties in the best score
    costs = np.array([5.0, 1.0, 3.0, 3.0, 6.0, 2.0])
    frontier = build_frontier(scores, costs)
    k = np.arange(costs.size)
    # best score, then cheaper cost, then lower index: the last key of lexsort is the primary one
    expected = np.array([np.lexsort((k, costs, -row))[0] for row in scores])
    for budget in (costs.max(), costs.max() + 10):
        a = allocate(frontier, budget)
        np.testing.assert_array_equal(a.choice, expected)
        assert a.gap == 0.0
        assert a.value == pytest.approx(scores.max(axis=1).mean())


def test_budget_at_max_reaches_the_dearest_configuration_with_non_integer_costs() -> None:
    rng = np.random.default_rng(4)
    for _ in range(50):
        costs = rng.random(5) * 3 + 0.1  # sums of these round, and may overshoot the dearest cost
        scores = rng.random((int(rng.integers(1, 60)), 5))
        scores[:, np.argmax(costs)] += 1  # the dearest configuration is every sequence's best
        a = allocate(build_frontier(scores, costs), costs.max())
        assert (a.choice == np.argmax(costs)).all() and a.cost <= costs.max()


def test_min_budget_collinear_hull() -> None:
    # costs 1,2,3. Sequence 0 scores 0,1,2: collinear, so the hull keeps all three points and its two
    # segments (slope 1 each) are taken one at a time. Sequence 1 scores 2,2,2: best already at cost 1,
    # no segment. Full model = column 2: target mean (2+2)/2 = 2.
    # Walk: start (mean cost 1, mean 1) -> seq 0 to cost 2 (mean cost 1.5, mean 1.5)
    #       -> seq 0 to cost 3 (mean cost 2, mean 2). So 2.0 is the smallest budget reaching 2.
    frontier = build_frontier(np.array([[0.0, 1.0, 2.0], [2.0, 2.0, 2.0]]), np.array([1.0, 2.0, 3.0]))
    assert min_budget_to_match(frontier, 2.0) == 2.0
    assert allocate(frontier, 2.0).choice.tolist() == [2, 0]
    assert allocate(frontier, 1.99).value < 2.0
    # tolerance 0.5 asks only for mean >= 1.5, reached after the first segment at mean cost 1.5
    assert min_budget_to_match(frontier, 2.0, tolerance=0.5) == 1.5
    # 2.5 is above every sequence's best (mean of 2 and 2): unreachable
    assert min_budget_to_match(frontier, 2.5) is None


def test_min_budget_reached_only_at_max_budget() -> None:
    # costs 1,2,3. Sequence 0 scores 0,1,3: the point (2,1) lies below the chord (1,0)-(3,3), so its hull
    # is one segment of cost 2 and gain 3 (slope 1.5). Sequence 1 scores 0,2,4: collinear, two segments
    # of slope 2. Walk (steepest first): seq 1 to cost 2 -> mean cost 1.5, mean 1; seq 1 to cost 3 ->
    # mean cost 2, mean 2; seq 0 to cost 3 -> mean cost 3, mean 3.5 = full model's mean (3+4)/2.
    scores = np.array([[0.0, 1.0, 3.0], [0.0, 2.0, 4.0]])
    frontier = build_frontier(scores, np.array([1.0, 2.0, 3.0]))
    target = scores[:, 2].mean()
    assert min_budget_to_match(frontier, target) == 3.0
    assert allocate(frontier, 2.999).value == 2.0
    # at 2.5 the LP moves half of seq 0's segment (gain 3/2 per sequence * 1/2): bound 2.75, integral 2
    a = allocate(frontier, 2.5)
    assert (a.value, a.lp_bound, a.gap) == (2.0, 2.75, 0.75)
    assert a.choice.tolist() == [0, 2]
    # tolerance 1.5 lowers the threshold to 2.0, reached at mean cost 2
    assert min_budget_to_match(frontier, target, tolerance=1.5) == 2.0


def test_min_budget_when_skipping_beats_the_full_model() -> None:
    # costs 1,4. Sequence 0 scores 0.5 (cheap), 0.5 (full): cheap is as good, stays cheap. Sequence 1
    # scores 0, 1. Target = full mean (0.5+1)/2 = 0.75. Walk: start mean cost 1, mean 0.25; seq 1 to
    # full: mean cost (1+4)/2 = 2.5, mean 0.75. So 2.5 of 4 layers match the full model.
    frontier = build_frontier(np.array([[0.5, 0.5], [0.0, 1.0]]), np.array([1.0, 4.0]))
    assert min_budget_to_match(frontier, 0.75) == 2.5


def test_min_budget_is_the_first_breakpoint_reaching_the_target_on_random_data() -> None:
    rng = np.random.default_rng(11)
    scores = rng.random((300, 8)) + np.linspace(0.0, 1.0, 8)  # deeper is better on average
    costs = np.arange(1.0, 9.0)
    frontier = build_frontier(scores, costs)
    target = scores[:, -1].mean()
    budget = min_budget_to_match(frontier, target)
    assert budget is not None and costs[0] <= budget < costs[-1]
    assert allocate(frontier, budget).value >= target
    assert allocate(frontier, np.nextafter(budget, 0)).value < target
