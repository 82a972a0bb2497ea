"""The oracle: a multiple-choice knapsack over (sequence, configuration) scores, solved on its convex frontier.

Pure numpy, no I/O. Given scores S (N sequences x K configurations) and the shared costs c (K), the oracle
at budget B picks one configuration per sequence to maximise the mean score subject to mean cost <= B.

Its LP relaxation is solved exactly by a walk: every sequence starts at its cheapest best point and moves
along the upper convex hull of its (cost, score) points; the hull segments of all sequences, merged by
decreasing slope (score gained per unit of cost), are applied one after another while the budget lasts.
The LP optimum applies a prefix of that order plus a fraction of the next segment (the one *split*
sequence). The integral allocation used here is that prefix: the split sequence is rounded down to its
cheaper hull point. It is therefore feasible and within one segment of the LP bound, so
LP bound - value = gap <= (max score - min score) / N, and value >= exact optimum - gap.

Leftover budget below the next segment's cost is not spent: that keeps the integral value a
non-decreasing step function of B whose steps are the walk's breakpoints, which is what makes the
minimal matching budget exact and cheap (see `min_budget_to_match`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np


@dataclass(frozen=True, eq=False)
class Frontier:
    """The whole LP frontier: every hull segment of every sequence, sorted by decreasing slope.

    Breakpoint p (0..M) is the state after the first p segments: `mean_cost[p]` and `values[p]` are
    the mean cost and mean score of that integral allocation (also the LP value at that budget).
    """

    scores: np.ndarray = field(repr=False)  # (N, K) float64, as given
    costs: np.ndarray  # (K,) float64
    hull: np.ndarray = field(repr=False)  # (N, K) configuration indices of each sequence's hull, cheapest first
    seg_row: np.ndarray = field(repr=False)  # (M,) sequence of each segment, in walk order
    seg_from: np.ndarray = field(repr=False)  # (M,) configuration the segment leaves
    seg_to: np.ndarray = field(repr=False)  # (M,) configuration it reaches
    seg_dcost: np.ndarray = field(repr=False)  # (M,) cost added (> 0)
    seg_dscore: np.ndarray = field(repr=False)  # (M,) score added (> 0)
    mean_cost: np.ndarray = field(repr=False)  # (M+1,) non-decreasing
    values: np.ndarray = field(repr=False)  # (M+1,) non-decreasing
    base_counts: np.ndarray = field(repr=False)  # (K,) sequences per configuration at breakpoint 0
    entering: tuple[np.ndarray, np.ndarray] = field(repr=False)  # walk positions grouped by seg_to, group bounds
    leaving: tuple[np.ndarray, np.ndarray] = field(repr=False)  # the same grouped by seg_from

    @property
    def num_sequences(self) -> int:
        return self.scores.shape[0]

    @property
    def num_configs(self) -> int:
        return self.scores.shape[1]

    @property
    def num_segments(self) -> int:
        return self.seg_row.size

    @property
    def min_budget(self) -> float:
        """Cheapest feasible budget: every sequence at its cheapest configuration."""
        return float(self.mean_cost[0])


@dataclass(frozen=True, eq=False)
class Allocation:
    """The integral oracle at one budget, with its LP bound; `choice` is built only when asked for."""

    budget: float
    applied: int  # segments of the walk applied (breakpoint index)
    cost: float  # mean cost of the allocation (<= budget)
    value: float  # mean score of the allocation
    lp_bound: float  # LP relaxation optimum at this budget (>= exact integral optimum)
    gap: float  # lp_bound - value
    shares: np.ndarray  # (K,) fraction of sequences per configuration
    frontier: Frontier = field(repr=False)

    @cached_property
    def choice(self) -> np.ndarray:
        """(N,) configuration index chosen for every sequence."""
        return choice_at(self.frontier, self.applied)


_BLOCK_ROWS = 16384  # rows per block: a block's scores (a few MB) stay in cache while its columns are walked


def _hull_block(block: np.ndarray, costs: np.ndarray, order: np.ndarray, hull: np.ndarray, size: np.ndarray,
                work: np.ndarray, levels: np.ndarray) -> None:
    """Upper convex hull of every row of `block` at once: a monotone chain over the columns in cost order.

    A row's stack holds points of strictly increasing cost and score; a new point is skipped when it
    does not beat the top's score (dominated, ties to the cheaper / lower index), replaces a top of
    equal cost, and pops tops lying strictly below the chord (collinear points are kept, so rounding
    can stop at them). Slopes are always computed by the same expression, so within a row the kept
    slopes are non-increasing in floating point too. Writes the stacks into `hull` and `size`.

    The stacks live in `work` (4, K, W) and `levels` (K, W), reused from block to block (fresh pages
    are slow to fault in): level-major cells `level * W + row`, so a row's top is one gather away and a
    pop is just `size -= 1`.
    """
    n, k = block.shape
    w = work.shape[2]
    columns, score, cost, slope_in = work  # slope_in: slope of the segment ending at that level
    columns[:, :n] = block.T  # one pass over the block instead of a strided one per column
    score_, cost_, slope_, levels_ = score.ravel(), cost.ravel(), slope_in.ravel(), levels.ravel()
    first = order[0]
    levels[0, :n], score[0, :n], cost[0, :n], slope_in[0, :n] = first, columns[first, :n], costs[first], np.inf
    size[:] = 1
    best = columns[first, :n].copy()  # every stack's top is its row's best score so far
    for i, j in enumerate(order[1:]):
        column = columns[j, :n]
        rows = np.flatnonzero(column > best)
        if rows.size == 0:
            continue
        x, cj = column[rows], costs[j]
        top = (size[rows] - 1) * w + rows
        alone = np.zeros(0, dtype=np.intp)  # rows whose stack the new point empties
        if costs[order[i]] == cj:  # an equal-cost point may top a stack: the new one replaces it
            at = np.flatnonzero(cost_[top] == cj)
            size[rows[at]] -= 1
            alone = at[size[rows[at]] == 0]  # stack now empty: the new point becomes the base
            top[at] -= w
            top[alone] = rows[alone]  # any cell of the row: its slope is replaced by inf just below
            with np.errstate(divide="ignore", invalid="ignore"):
                slope = (x - score_[top]) / (cj - cost_[top])
            slope[alone] = np.inf
        else:
            slope = (x - score_[top]) / (cj - cost_[top])
        at = np.flatnonzero(slope > slope_[top])
        while at.size:  # the top lies strictly below the chord from the point beneath it to the new point
            below = top[at] - w
            size[rows[at]] -= 1
            top[at] = below
            slope[at] = s = (x[at] - score_[below]) / (cj - cost_[below])
            at = at[s > slope_[below]]
        push = top + w
        push[alone] = rows[alone]
        levels_[push], score_[push], cost_[push], slope_[push] = j, x, cj, slope
        size[rows] += 1
        best[rows] = x
    hull[:] = levels[:, :n].T


def _segments(block: np.ndarray, hull: np.ndarray, size: np.ndarray) -> tuple[np.ndarray, ...]:
    """Every hull segment of a block in (row, hull position) order: row, from, to and score added."""
    n, k = block.shape
    count = size - 1
    rows = np.repeat(np.arange(n, dtype=np.int32), count)
    ends = np.cumsum(count)
    first = rows.astype(np.intp) * k
    at = np.arange(ends[-1] if n else 0) - np.repeat(ends - count, count) + first  # flat index of `from`
    stack = hull.ravel()
    frm, to = stack[at], stack[at + 1]
    flat = block.ravel()
    return rows, frm, to, flat[first + to] - flat[first + frm]


def _walk_order(slope: np.ndarray) -> np.ndarray:
    """Indices sorted by decreasing slope, ties by index: what a stable argsort gives, several times faster.

    Positive float64 bit patterns order like the values, so the bits with their low end replaced by the
    index sort as one uint64 array; runs whose truncated keys collide are then put in exact order.
    """
    m = slope.size
    shift = np.uint64(max(1, (m - 1).bit_length()))
    key = np.uint64(0x7FF0000000000000) - slope.view(np.uint64)  # slopes are > 0: smaller key = steeper
    packed = ((key >> shift) << shift) | np.arange(m, dtype=np.uint64)
    packed.sort()
    order = (packed & ((np.uint64(1) << shift) - np.uint64(1))).astype(np.intp)
    coarse = packed >> shift
    # Equal coarse keys are contiguous and in index order, which is right where their exact keys are equal
    # too (repeated rows, as in bootstrap resamples); runs holding two different exact keys are re-sorted.
    same = coarse[1:] == coarse[:-1]
    differ = same & (key[order[1:]] != key[order[:-1]])
    if differ.any():
        run = np.concatenate(([0], np.cumsum(~same)))
        mixed = np.zeros(run[-1] + 1, dtype=bool)
        mixed[run[1:][differ]] = True
        loose = np.flatnonzero(mixed[run])
        members = order[loose]
        order[loose] = members[np.lexsort((members, key[members], coarse[loose]))]
    return order


def build_frontier(scores: np.ndarray, costs: np.ndarray) -> Frontier:
    """Hulls of all sequences (in cache-sized blocks), then all their segments merged by decreasing slope.

    Ties in slope keep (sequence, hull position) order, so the walk is deterministic and each sequence's
    segments stay in hull order.
    """
    scores = np.asarray(scores, dtype=np.float64)
    costs = np.asarray(costs, dtype=np.float64)
    if scores.ndim != 2 or scores.shape[0] == 0 or scores.shape[1] == 0:
        raise ValueError(f"scores must be a non-empty N x K matrix, got shape {scores.shape}")
    n, k = scores.shape
    if costs.shape != (k,):
        raise ValueError(f"costs must have one entry per configuration ({k}), got shape {costs.shape}")
    if not np.isfinite(costs).all():
        raise ValueError("costs must be finite (no NaN or inf)")
    order = np.argsort(costs, kind="stable")
    hull = np.empty((n, k), dtype=np.int8 if k <= 127 else np.int16 if k <= 32767 else np.int32)
    size = np.empty(n, dtype=np.intp)
    width = min(n, _BLOCK_ROWS)
    work, levels = np.empty((4, k, width)), np.empty((k, width), dtype=hull.dtype)
    parts = []
    for lo in range(0, n, width):
        hi = min(n, lo + width)
        block = np.ascontiguousarray(scores[lo:hi])
        if not np.isfinite(block).all():  # checked block by block, while the block is in cache
            raise ValueError("scores must be finite (no NaN or inf)")
        _hull_block(block, costs, order, hull[lo:hi], size[lo:hi], work, levels)
        rows, *rest = _segments(block, hull[lo:hi], size[lo:hi])
        parts.append((rows + lo, *rest))
    rows, frm, to, dscore = (np.concatenate(p) for p in zip(*parts))
    walk = _walk_order(dscore / (costs[to] - costs[frm]))  # the slope exactly as the hull computed it
    return assemble(scores, costs, hull, rows[walk], frm[walk], to[walk], dscore[walk])


def assemble(scores: np.ndarray, costs: np.ndarray, hull: np.ndarray, rows: np.ndarray, frm: np.ndarray,
             to: np.ndarray, dscore: np.ndarray) -> Frontier:
    """The Frontier of sequences `scores` (N, K) from their hulls and their segments in walk order.

    `build_frontier` calls it once; the bootstrap calls it once per resample with that resample's slice
    of a frontier built over many resamples stacked (the walk restricted to a slice is the slice's walk).
    """
    n = scores.shape[0]
    k = costs.size
    order = np.argsort(costs, kind="stable")
    dcost = costs[to] - costs[frm]
    base = hull[:, 0].astype(np.intp)
    # rounding can move sums of non-integer costs past the cheapest or dearest cost by an ulp: clip, so
    # that those two budgets always give every sequence its cheapest, resp. best, configuration
    total = n * costs[order[0]] + np.concatenate(([0.0], np.cumsum(dcost)))
    mean_cost = np.clip(total / n, costs[order[0]], costs[order[-1]])
    values = (scores[np.arange(n), base].sum() + np.concatenate(([0.0], np.cumsum(dscore)))) / n
    return Frontier(
        scores=scores,
        costs=costs,
        hull=hull,
        seg_row=rows,
        seg_from=frm,
        seg_to=to,
        seg_dcost=dcost,
        seg_dscore=dscore,
        mean_cost=mean_cost,
        values=values,
        base_counts=np.bincount(base, minlength=k),
        entering=_grouped(to, k),
        leaving=_grouped(frm, k),
    )


def _grouped(config: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Walk positions grouped by configuration (ascending within a group) and the group bounds.

    Lets `allocate` count the segments entering or leaving each configuration before a breakpoint
    with one binary search per configuration instead of a pass over the walk.
    """
    positions = np.argsort(config, kind="stable")  # a radix sort on the small integer labels
    return positions, np.concatenate(([0], np.cumsum(np.bincount(config, minlength=k))))


def choice_at(frontier: Frontier, applied: int) -> np.ndarray:
    """Configuration of every sequence after the first `applied` segments (O(N + applied))."""
    steps = np.bincount(frontier.seg_row[:applied], minlength=frontier.num_sequences)
    return frontier.hull[np.arange(frontier.num_sequences), steps].astype(np.intp)


def _shares_at(frontier: Frontier, applied: int) -> np.ndarray:
    counts = frontier.base_counts.copy()
    for (positions, bounds), sign in ((frontier.entering, 1), (frontier.leaving, -1)):
        for c in range(frontier.num_configs):
            counts[c] += sign * int(np.searchsorted(positions[bounds[c] : bounds[c + 1]], applied))
    return counts / frontier.num_sequences


def allocate(frontier: Frontier, budget: float) -> Allocation:
    """Integral oracle at `budget`: the longest prefix of the walk that fits, split sequence rounded down.

    O(K log M) per call; the per-sequence choice is computed lazily (`Allocation.choice`).
    """
    budget = float(budget)
    if not budget >= frontier.min_budget:
        raise ValueError(
            f"budget {budget:g} is below the cheapest configuration's cost {frontier.min_budget:g}"
        )
    applied = int(np.searchsorted(frontier.mean_cost, budget, side="right")) - 1
    value = float(frontier.values[applied])
    gap = 0.0
    if applied < frontier.num_segments:
        n = frontier.num_sequences
        fraction = min(1.0, (budget - frontier.mean_cost[applied]) * n / frontier.seg_dcost[applied])
        gap = float(fraction * frontier.seg_dscore[applied] / n)
    return Allocation(
        budget=budget,
        applied=applied,
        cost=float(frontier.mean_cost[applied]),
        value=value,
        lp_bound=value + gap,
        gap=gap,
        shares=_shares_at(frontier, applied),
        frontier=frontier,
    )


def values_at(frontier: Frontier, budgets: np.ndarray) -> np.ndarray:
    """The integral oracle's mean score at each budget (what `allocate(...).value` gives), vectorised.

    budgets: (B,) layers, each >= `frontier.min_budget`; returns (B,) float64.
    """
    applied = np.searchsorted(frontier.mean_cost, np.asarray(budgets, dtype=np.float64), side="right") - 1
    return frontier.values[applied]


def reaches(frontier: Frontier, applied: int, reference: np.ndarray, tolerance: float = 0.0) -> bool:
    """Whether the allocation after `applied` segments scores at least `reference`'s mean minus `tolerance`.

    Exact: the sign of sum(chosen scores) - sum(reference) is that of its correctly rounded value
    (`math.fsum`), so an oracle that equals the reference (e.g. every sequence keeps `full`) reaches it,
    whatever the rounding of the two means. reference: (N,) per-sequence scores. O(N + applied).
    """
    chosen = frontier.scores[np.arange(frontier.num_sequences), choice_at(frontier, applied)]
    excess = math.fsum(np.concatenate((chosen, -np.asarray(reference, dtype=np.float64))))
    return excess >= -float(tolerance) * frontier.num_sequences


def min_budget_to_match(frontier: Frontier, target: float | np.ndarray, tolerance: float = 0.0) -> float | None:
    """Smallest budget B at which the oracle's mean reaches `target` minus `tolerance`; None if unreachable.

    target: a mean score, or (N,) per-sequence scores whose mean is the target (the full model's column:
    then equality is decided exactly, see `reaches`). The integral value is constant between breakpoints
    and non-decreasing along the walk (every segment adds a positive score), so the answer is the mean
    cost of the first breakpoint that reaches the target. The float `values` locate it up to their
    rounding error; the breakpoints within that error of the threshold are then decided exactly, by
    binary search (usually one or two O(N) checks).
    """
    n, m = frontier.num_sequences, frontier.num_segments
    reference = np.broadcast_to(np.asarray(target, dtype=np.float64), (n,))
    threshold = float(reference.mean()) - float(tolerance)
    # |error| of values[p] and of the threshold: sums of at most n + m terms each bounded by 3 max|score|
    scale = max(float(np.abs(frontier.scores).max()), float(np.abs(reference).max()), abs(float(tolerance)))
    error = 8.0 * (n + m + 2) * np.finfo(np.float64).eps * scale
    lo = int(np.searchsorted(frontier.values, threshold - error, side="left"))
    hi = int(np.searchsorted(frontier.values, threshold + error, side="left"))  # reaches for sure from here
    if hi > m:  # beyond the float bracket no breakpoint is certain: decide the last one exactly
        if lo > m or not reaches(frontier, m, reference, tolerance):
            return None
        hi = m
    while lo < hi:  # first breakpoint in [lo, hi] that reaches; hi is known to reach
        mid = (lo + hi) // 2
        if reaches(frontier, mid, reference, tolerance):
            hi = mid
        else:
            lo = mid + 1
    return float(frontier.mean_cost[lo])
