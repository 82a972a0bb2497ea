"""The full model's noise ceiling: what best-of-K selection buys with no skipping at all.

K sampled outputs of the full model per sequence (family `sample`, `pipeline.generation.sampling`) are K
noisy draws of the same model. Their best per sequence, averaged, is what picking the best of K scores
gains by selection alone; the oracle's own gain at the full budget (oracle at L - full model) is the same
kind of selection over the skip configurations. Both gains, and the best-of-K mean as a second bar to
match, come with paired bootstrap percentile intervals over sequences on the reducer's resamples
(`pipeline.analysis.bootstrap.resample_indices` with the same seed, so the draws pair with the oracle's).
Pure numpy, no I/O.
"""

from __future__ import annotations

import numpy as np

from pipeline.analysis.bootstrap import DEFAULT_LEVEL, resample_indices


def best_of_k(samples: np.ndarray) -> np.ndarray:
    """(N,) each sequence's best score over its K samples; samples (N, K), K >= 1."""
    samples = np.asarray(samples, dtype=np.float64)
    if samples.ndim != 2 or samples.shape[1] < 1:
        raise ValueError(f"samples must be (N, K) with K >= 1, got shape {samples.shape}")
    return samples.max(axis=1)


def _interval(draws: np.ndarray, level: float) -> list[float]:
    tail = (1.0 - level) / 2.0
    lo, hi = np.quantile(draws, [tail, 1.0 - tail])
    return [float(lo), float(hi)]


def ceiling_summary(full: np.ndarray, samples: np.ndarray, resamples: int, seed: int = 0,
                    level: float = DEFAULT_LEVEL) -> dict:
    """The noise ceiling's numbers: full (N,) greedy scores, samples (N, K) sampled ones.

    Returns sample_mean (one sample's mean), best_of_k_mean, best_of_k_gain (best of K - full greedy),
    each with `_interval` ([lo, hi], None when resamples = 0).
    """
    full = np.asarray(full, dtype=np.float64)
    best = best_of_k(samples)
    values = {"sample_mean": np.asarray(samples).mean(axis=1), "best_of_k_mean": best, "best_of_k_gain": best - full}
    out: dict = {"samples": int(np.shape(samples)[1])}
    idx = resample_indices(len(full), resamples, seed) if resamples else None
    for name, per_sequence in values.items():
        out[name] = float(per_sequence.mean())
        out[f"{name}_interval"] = None if idx is None else _interval(per_sequence[idx].mean(axis=1), level)
    return out
