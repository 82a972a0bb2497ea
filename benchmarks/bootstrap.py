"""Benchmark: the paired bootstrap of the reducer (pipeline.analysis.bootstrap) at the study's size and at N = 1,000,000.

1. The study's shape: N = 201 sequences x K = 88 configurations (ULS, EE, RLS and `full` of a 30-layer
   model), ROUGE-like scores rounded to 4 decimals, the reducer's 117 grid budgets, 1,000 resamples:
   the whole bootstrap (means, oracle at every budget, minimal matching budget per resample).
2. N = 1,000,000 x K = 30: a few resamples timed, the cost of 1,000 extrapolated (each resample is one
   full frontier of N rows, so the cost is linear in the resamples).

    python benchmarks/bootstrap.py [--resamples 1000] [--big-rows 1000000] [--big-resamples 2]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from pipeline.analysis.bootstrap import bootstrap_oracle
from pipeline.generation.configs import build_configs


def rouge_like(rng: np.random.Generator, rows: int, costs: np.ndarray) -> np.ndarray:
    """Scores in [0, 1] growing with depth on average, rounded like ROUGE F-measures of short texts (ties)."""
    return np.clip(0.6 * costs / costs.max() + rng.normal(0.0, 0.15, (rows, costs.size)), 0.0, 1.0).round(4)


def timed(scores: np.ndarray, costs: np.ndarray, budgets: np.ndarray, resamples: int) -> float:
    start = time.perf_counter()
    draws = bootstrap_oracle(scores, costs, budgets, resamples, seed=0)
    seconds = time.perf_counter() - start
    lo, hi = draws.interval(draws.match)
    print(f"  N={scores.shape[0]:,} K={scores.shape[1]}, {budgets.size} budgets, {resamples:,} resamples: "
          f"{seconds:.2f} s ({1e3 * seconds / resamples:.2f} ms per resample); matching budget 95% interval "
          f"{lo:.2f}-{hi:.2f} layers")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resamples", type=int, default=1000)
    parser.add_argument("--big-rows", type=int, default=1_000_000)
    parser.add_argument("--big-resamples", type=int, default=2)
    args = parser.parse_args()
    rng = np.random.default_rng(0)

    configs = build_configs(30, ("uls", "ee", "rls"), (0,))
    full = next(i for i, c in enumerate(configs) if c.config_id == "full")
    order = [full] + [i for i in range(len(configs)) if i != full]  # the reducer's order: `full` first
    costs = np.array([configs[i].cost for i in order], dtype=float)
    budgets = np.arange(1.0, 30.0 + 1e-9, 0.25)
    print("study shape (the reducer's default):")
    timed(rouge_like(rng, 201, costs), costs, budgets, args.resamples)

    costs = np.arange(30.0, 0.0, -1.0)  # `full` (30 layers) first, then 1..29
    print(f"N = {args.big_rows:,}:")
    seconds = timed(rouge_like(rng, args.big_rows, costs), costs, budgets, args.big_resamples)
    per = seconds / args.big_resamples
    print(f"  1,000 resamples at this size: about {1000 * per / 60:.0f} min on this machine "
          f"({per:.1f} s each, one frontier of {args.big_rows:,} rows per resample)")


if __name__ == "__main__":
    main()
