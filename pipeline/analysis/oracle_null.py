"""The oracle's null: how much of its gain is selection luck, with sequence difficulty and configuration quality kept.

The oracle takes the best of K noisy scores per sequence, so it beats every fixed choice even where no
sequence needs fewer layers than another. This null keeps what is not per-sequence skill and destroys what
is (issue 25): an additive fit, score[n, k] ~ mu + a[n] (sequence difficulty) + b[k] (configuration quality),
by least squares on the complete matrix (a = row means - mu, b = column means - mu, mu the grand mean);
its residuals are permuted across sequences within each configuration, independently per configuration,
and added back. A draw therefore has
- exactly each configuration's mean (a column's residuals sum to zero and are only reordered), the full
  model's included, so the bar to match is the real one;
- each sequence's mean in expectation (every residual column has mean 0);
- the real spread of noise per configuration, and no sequence x configuration interaction: whatever
  per-sequence structure the real scores hold is gone.
Permuting raw scores across sequences instead would also destroy sequence difficulty and inflate the
null's own gain. Scores are not clipped: a draw may leave the metric's [0, 1] range by a residual.

A 0/1 metric (acc, exact match) would leave {0, 1} that way, and a draw scoring above 1 is no null of an
oracle that cannot. For those (`binary=True`) a draw is the same additive model's independence form: each
entry right with probability clip(mu + a[n] + b[k], 0, 1), independently (`binary_null_matrix`): each
question's difficulty and each configuration's accuracy kept in expectation, no interaction, still 0/1.

The oracle (the project's solver) is recomputed on R seeded draws, stacked and solved together like the
bootstrap's resamples (`pipeline.analysis.bootstrap.resampled_frontiers`). Reported: the null's value at
each budget and its least matching budget, each as the median over draws with a percentile interval.
Pure numpy, no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.analysis.bootstrap import DEFAULT_LEVEL, resampled_frontiers
from pipeline.analysis.oracle import min_budget_to_match, values_at

DEFAULT_DRAWS = 200


@dataclass(frozen=True)
class AdditiveFit:
    """score[n, k] = grand + sequence[n] + config[k] + residual[n, k], least squares on a complete matrix."""

    grand: float
    sequence: np.ndarray  # (N,) row effects, summing to 0
    config: np.ndarray  # (K,) column effects, summing to 0
    residual: np.ndarray  # (N, K), every row and column summing to 0

    @property
    def fitted(self) -> np.ndarray:
        return self.grand + self.sequence[:, None] + self.config[None, :]


def additive_fit(scores: np.ndarray) -> AdditiveFit:
    """The two-way additive fit of `scores` (N, K) without interaction."""
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 2 or min(scores.shape) < 1:
        raise ValueError(f"scores must be a non-empty (N, K) matrix, got shape {scores.shape}")
    grand = float(scores.mean())
    sequence = scores.mean(axis=1) - grand
    config = scores.mean(axis=0) - grand
    return AdditiveFit(grand, sequence, config, scores - grand - sequence[:, None] - config[None, :])


def null_matrix(fit: AdditiveFit, rng: np.random.Generator) -> np.ndarray:
    """One null draw: the fit plus its residuals permuted across sequences, independently per configuration."""
    n, k = fit.residual.shape
    rows = rng.permuted(np.tile(np.arange(n)[:, None], (1, k)), axis=0)  # (N, K): an independent order per column
    return fit.fitted + np.take_along_axis(fit.residual, rows, axis=0)


def binary_null_matrix(fit: AdditiveFit, rng: np.random.Generator) -> np.ndarray:
    """One null draw of a 0/1 matrix: entry (n, k) is 1 with probability clip(fitted[n, k], 0, 1), independently."""
    return (rng.random(fit.residual.shape) < np.clip(fit.fitted, 0.0, 1.0)).astype(np.float64)


@dataclass(frozen=True)
class NullDraws:
    """The oracle on every null draw: values (R, B) at the budgets, least matching budgets (R,) (NaN: none)."""

    values: np.ndarray
    match: np.ndarray | None
    level: float

    def value_summary(self) -> np.ndarray:
        """(B, 3): median, lower and upper percentile bound of the null's value at each budget."""
        return _summary(self.values, self.level)

    def match_summary(self) -> tuple[float | None, float | None, float | None]:
        """Median and percentile interval of the least matching budget over draws; a draw that never matches
        counts as beyond every budget, and a bound there is None."""
        if self.match is None:
            return None, None, None
        return tuple(None if not np.isfinite(v) else float(v)
                     for v in _summary(np.where(np.isnan(self.match), np.inf, self.match)[:, None], self.level)[0])


def _summary(draws: np.ndarray, level: float) -> np.ndarray:
    """(B, 3) median and percentile bounds over axis 0, without interpolation (`inverted_cdf`: infinities, the
    draws that never match, stay apart from finite values)."""
    tail = (1.0 - level) / 2.0
    return np.quantile(draws, [0.5, tail, 1.0 - tail], axis=0, method="inverted_cdf").T


def oracle_null(scores: np.ndarray, costs: np.ndarray, budgets: np.ndarray, draws: int = DEFAULT_DRAWS,
                seed: int = 0, level: float = DEFAULT_LEVEL, match_full: bool = True,
                tolerance: float = 0.0, binary: bool = False) -> NullDraws:
    """The oracle over `draws` residual-permutation null matrices of `scores` (N, K; column 0 the full model),
    or, with `binary` (0/1 scores), over draws of its independence form (`binary_null_matrix`).

    costs: (K,); budgets: (B,) at least the cheapest cost. Draw d uses `default_rng([seed, d])`, so a draw
    does not depend on how many are asked. Each draw's least matching budget is against its own full-model
    column (whose mean is the real one). Raises ValueError for draws < 1 or a level outside (0, 1).
    """
    if draws < 1:
        raise ValueError(f"null draws must be >= 1, got {draws}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"confidence level must lie strictly between 0 and 1, got {level}")
    fit = additive_fit(scores)
    n = fit.residual.shape[0]
    draw = binary_null_matrix if binary else null_matrix
    stacked = np.concatenate([draw(fit, np.random.default_rng([seed, d])) for d in range(draws)])
    values = np.empty((draws, np.size(budgets)))
    match = np.empty(draws) if match_full else None
    indices = np.arange(draws * n).reshape(draws, n)
    for d, frontier in enumerate(resampled_frontiers(stacked, np.asarray(costs, dtype=np.float64), indices)):
        values[d] = values_at(frontier, np.asarray(budgets, dtype=np.float64))
        if match is not None:
            found = min_budget_to_match(frontier, frontier.scores[:, 0], tolerance)
            match[d] = np.nan if found is None else found
    return NullDraws(values, match, level)
