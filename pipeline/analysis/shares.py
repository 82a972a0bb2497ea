"""CoLa's two shares over a (sequence x configuration) matrix of right/wrong answers, with intervals and a null.

CoLa ("Skip a Layer or Loop It?", 2025) reports, for a set of per-question layer configurations (or searched
programs):
- `fixed`: of the questions the full model gets wrong, the share that some configuration gets right;
- `shorter`: of the questions the full model gets right, the share that a configuration costing at most
  `max_cost` layers (e.g. half the model) also gets right.

With many configurations and few answer choices, much of both is luck: some configuration is right by chance.
`permutation_null` keeps each configuration's accuracy and destroys every per-question skill by permuting each
configuration's column across questions (the full model's column is left in place, so the question sets the
shares condition on are the real ones). Pure numpy; the intervals are paired percentile bootstraps over
questions with `pipeline.analysis.bootstrap.resample_indices`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.analysis.bootstrap import DEFAULT_LEVEL, DEFAULT_RESAMPLES, resample_indices


@dataclass(frozen=True)
class Shares:
    """Both shares, their percentile intervals and the counts they are shares of (NaN where a count is 0)."""

    fixed: float
    fixed_interval: tuple[float, float]
    wrong: int  # questions the full model gets wrong
    shorter: float
    shorter_interval: tuple[float, float]
    right: int  # questions the full model gets right

    def as_dict(self) -> dict:
        return {"fixed": self.fixed, "fixed_lo": self.fixed_interval[0], "fixed_hi": self.fixed_interval[1],
                "wrong": self.wrong, "shorter": self.shorter, "shorter_lo": self.shorter_interval[0],
                "shorter_hi": self.shorter_interval[1], "right": self.right}


def _check(correct: np.ndarray, costs: np.ndarray, full: int) -> np.ndarray:
    correct = np.asarray(correct)
    if correct.ndim != 2 or correct.shape[1] != len(costs) or not 0 <= full < correct.shape[1]:
        raise ValueError(f"correct must be (N, K) with K = {len(costs)} costs and 0 <= full < K, "
                         f"got {correct.shape} and full = {full}")
    return correct.astype(bool)


def share_counts(correct: np.ndarray, costs: np.ndarray, full: int, max_cost: float) -> tuple[np.ndarray, ...]:
    """Per question (N,): full right, any configuration right, any configuration of cost <= max_cost right.

    correct: (N, K) 1 where configuration k answers question n right; costs: (K,) layers per token; full: the
    full model's column. The full model's own column counts for `any` (a question it gets right is not
    'fixed'), not for `cheap` unless its cost is <= max_cost.
    """
    correct = _check(correct, np.asarray(costs), full)
    cheap = np.asarray(costs) <= max_cost
    return correct[:, full], correct.any(axis=1), correct[:, cheap].any(axis=1)


def _ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        return numerator / denominator


def cola_shares(correct: np.ndarray, costs: np.ndarray, full: int, max_cost: float,
                resamples: int = DEFAULT_RESAMPLES, seed: int = 0, level: float = DEFAULT_LEVEL) -> Shares:
    """CoLa's two shares of `correct` (N, K) with paired bootstrap percentile intervals over the N questions."""
    full_right, any_right, cheap_right = share_counts(correct, costs, full, max_cost)
    wrong, right = ~full_right, full_right
    idx = resample_indices(len(full_right), resamples, seed)
    fixed_draws = _ratio((any_right & wrong)[idx].sum(1), wrong[idx].sum(1))
    shorter_draws = _ratio((cheap_right & right)[idx].sum(1), right[idx].sum(1))
    tail = (1.0 - level) / 2.0

    def interval(draws: np.ndarray) -> tuple[float, float]:
        draws = draws[~np.isnan(draws)]
        if draws.size == 0:
            return (float("nan"), float("nan"))
        lo, hi = np.quantile(draws, [tail, 1.0 - tail])
        return (float(lo), float(hi))

    return Shares(
        fixed=float(_ratio((any_right & wrong).sum(), wrong.sum())), fixed_interval=interval(fixed_draws),
        wrong=int(wrong.sum()),
        shorter=float(_ratio((cheap_right & right).sum(), right.sum())), shorter_interval=interval(shorter_draws),
        right=int(right.sum()),
    )


def permutation_null(correct: np.ndarray, full: int, seed: int = 0) -> np.ndarray:
    """`correct` (N, K) with every column but `full` permuted across rows, independently, seeded.

    Keeps each configuration's accuracy and the full model's per-question answers; leaves no per-question
    skill in the other configurations.
    """
    correct = np.asarray(correct)
    rng = np.random.default_rng(seed)
    out = correct.copy()
    for k in range(correct.shape[1]):
        if k != full:
            out[:, k] = correct[rng.permutation(correct.shape[0]), k]
    return out


def null_shares(correct: np.ndarray, costs: np.ndarray, full: int, max_cost: float, draws: int = 200,
                seed: int = 0, level: float = DEFAULT_LEVEL) -> dict[str, float]:
    """The two shares under `permutation_null`, over `draws` seeded permutations: mean and percentile interval."""
    fixed, shorter = np.empty(draws), np.empty(draws)
    for d in range(draws):
        full_right, any_right, cheap_right = share_counts(permutation_null(correct, full, seed + d), costs, full,
                                                          max_cost)
        fixed[d] = _ratio((any_right & ~full_right).sum(), (~full_right).sum())
        shorter[d] = _ratio((cheap_right & full_right).sum(), full_right.sum())
    tail = (1.0 - level) / 2.0
    out = {}
    for name, values in (("fixed", fixed), ("shorter", shorter)):
        lo, hi = np.quantile(values, [tail, 1.0 - tail]) if not np.isnan(values).all() else (np.nan, np.nan)
        out |= {name: float(np.mean(values)), f"{name}_lo": float(lo), f"{name}_hi": float(hi)}
    return out
