"""Paired bootstrap over sequences: confidence intervals for the means, the oracle and the matching budget.

Pure numpy, no I/O. A resample draws N sequences with replacement; every statistic of the reducer is
recomputed on it from the same rows (paired): each configuration's mean score, the full model's mean,
the oracle's value at each budget and the minimal budget matching the full model, both by the project's
own solver (`pipeline.analysis.oracle`) on the resampled matrix. Intervals are percentile intervals (Efron and
Tibshirani 1993, ch. 13) at the given level.

Vectorised: many resamples are stacked into one matrix and solved by one `build_frontier` call. A
sequence's hull does not depend on the other rows and the walk orders segments by (slope, row), so the
stacked walk restricted to one resample's rows is exactly that resample's own walk; each resample's
frontier is assembled from its slice (`pipeline.analysis.oracle.assemble`), equal to `build_frontier(scores[idx])`
bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np

from pipeline.analysis.oracle import Frontier, assemble, build_frontier, min_budget_to_match, values_at

DEFAULT_RESAMPLES = 1000
DEFAULT_LEVEL = 0.95
MAX_BYTES = 1 << 30  # the most a bootstrap's index and draw arrays may take; more is refused before allocating
STACKED_ROWS = 1 << 17  # rows per stacked solve: ~100 MB of scores at K = 88, the frontier's blocks stay cached


@dataclass(frozen=True)
class BootstrapDraws:
    """Every resample's statistics; `interval` turns a column of them into a percentile interval."""

    config_means: np.ndarray  # (R, K) each configuration's mean score
    values: np.ndarray  # (R, B) the oracle's mean score at each budget
    match: np.ndarray | None  # (R,) least budget matching the full model (column 0); None if not asked
    level: float
    target_match: np.ndarray | None = None  # (R, T) least budget matching each extra target; None if none given

    def interval(self, draws: np.ndarray) -> np.ndarray:
        """(..., 2) lower and upper percentile bounds over the resamples (axis 0) of `draws` (R, ...)."""
        tail = (1.0 - self.level) / 2.0
        return np.moveaxis(np.quantile(draws, [tail, 1.0 - tail], axis=0), 0, -1)


def check_resamples(resamples: int, num_sequences: int, numbers_per_resample: int) -> None:
    """Refuse, before allocating, a bootstrap whose arrays (8 bytes x numbers_per_resample per resample) would
    pass MAX_BYTES; the message names the most resamples that fit."""
    need = 8 * resamples * max(numbers_per_resample, 1)
    if need > MAX_BYTES:
        most = MAX_BYTES // (8 * max(numbers_per_resample, 1))
        raise ValueError(f"{resamples:,} bootstrap resamples of {num_sequences:,} sequences need {need / 2**30:.1f} GiB "
                         f"of draws; at most {most:,} fit in {MAX_BYTES / 2**30:g} GiB: ask for fewer (--bootstrap)")


def resample_indices(num_sequences: int, resamples: int = DEFAULT_RESAMPLES, seed: int = 0) -> np.ndarray:
    """(R, N) row indices, N draws with replacement per resample, from numpy's PCG64 seeded with `seed`.

    Raises ValueError for no sequence or resample, or indices past MAX_BYTES (`check_resamples`)."""
    if num_sequences < 1 or resamples < 1:
        raise ValueError(f"bootstrap needs at least one sequence and one resample, got {num_sequences}, {resamples}")
    check_resamples(resamples, num_sequences, num_sequences)
    return np.random.default_rng(seed).integers(0, num_sequences, (resamples, num_sequences))


def resampled_frontiers(scores: np.ndarray, costs: np.ndarray, indices: np.ndarray) -> Iterator[Frontier]:
    """The oracle frontier of every resample `scores[indices[r]]`, in order, solved STACKED_ROWS rows at a time.

    scores: (N, K); costs: (K,); indices: (R, N). Yields R frontiers equal to `build_frontier(scores[idx])`.
    """
    n = indices.shape[1]
    per_solve = max(1, STACKED_ROWS // n)
    for start in range(0, indices.shape[0], per_solve):
        chunk = indices[start : start + per_solve]
        stacked = build_frontier(scores[chunk.ravel()], costs)
        resample = stacked.seg_row // n
        order = np.argsort(resample, kind="stable")  # keeps walk order within each resample
        bounds = np.searchsorted(resample[order], np.arange(len(chunk) + 1))
        for r in range(len(chunk)):
            segments = order[bounds[r] : bounds[r + 1]]
            rows = slice(r * n, (r + 1) * n)
            yield assemble(stacked.scores[rows], stacked.costs, stacked.hull[rows], stacked.seg_row[segments] - r * n,
                           stacked.seg_from[segments], stacked.seg_to[segments], stacked.seg_dscore[segments])


def bootstrap_oracle(scores: np.ndarray, costs: np.ndarray, budgets: np.ndarray, resamples: int = DEFAULT_RESAMPLES,
                     seed: int = 0, level: float = DEFAULT_LEVEL, match_full: bool = True,
                     tolerance: float = 0.0, targets: np.ndarray | None = None) -> BootstrapDraws:
    """Paired bootstrap of the reducer's statistics; column 0 of `scores` is the full model.

    targets: (T, N) extra per-sequence bars (e.g. the full model's best of K samples); each resample's least
    budget matching each of them, on the same resampled rows, goes to `target_match` (NaN: none).

    scores: (N, K) per-sequence scores; costs: (K,) layers; budgets: (B,) layers, each at least the cheapest
    cost. Each resample's matching budget is `min_budget_to_match` against that resample's own full-model
    column (exact at ties). Raises ValueError on a level outside (0, 1), an empty matrix, or draws past MAX_BYTES.
    """
    if not 0.0 < level < 1.0:
        raise ValueError(f"confidence level must lie strictly between 0 and 1, got {level}")
    scores = np.asarray(scores, dtype=np.float64)
    budgets = np.asarray(budgets, dtype=np.float64)
    check_resamples(resamples, scores.shape[0], scores.shape[0] + scores.shape[1] + budgets.size + 1)
    indices = resample_indices(scores.shape[0], resamples, seed)
    means = np.empty((resamples, scores.shape[1]))
    values = np.empty((resamples, budgets.size))
    match = np.empty(resamples) if match_full else None
    extra = None if targets is None else np.asarray(targets, dtype=np.float64).reshape(-1, scores.shape[0])
    target_match = None if extra is None else np.empty((resamples, extra.shape[0]))
    for r, frontier in enumerate(resampled_frontiers(scores, costs, indices)):
        means[r] = frontier.scores.mean(axis=0)
        values[r] = values_at(frontier, budgets)
        if match is not None:
            found = min_budget_to_match(frontier, frontier.scores[:, 0], tolerance)
            match[r] = np.nan if found is None else found
        if extra is not None:
            for t, target in enumerate(extra):
                found = min_budget_to_match(frontier, target[indices[r]], tolerance)
                target_match[r, t] = np.nan if found is None else found
    return BootstrapDraws(means, values, match, level, target_match)
