"""The search curve and CoLa's shares for searched and random programs: pure functions over the score matrix,
read and written by `pipeline.search.run.search_report`.

The curve (per arm, after m programs evaluated per sequence, m = 0 being the enumerated configurations
alone): the oracle's value at fixed budgets and its least budget matching the full model, over the
enumerated columns plus the arm's first m slots, each with a 95% paired percentile bootstrap interval over
sequences (`pipeline.analysis.bootstrap`). Search against random at the same m is the gain that is search;
random against m = 0 is the gain of selecting among more noisy tries.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from pipeline.analysis.bootstrap import DEFAULT_LEVEL, DEFAULT_RESAMPLES, bootstrap_oracle
from pipeline.analysis.oracle import build_frontier, min_budget_to_match, values_at
from pipeline.analysis.shares import Shares, cola_shares
from pipeline.generation.configs import SEARCH_FAMILIES


@dataclass(frozen=True)
class Columns:
    """A search run's matrix split: enumerated configurations (full first) and each arm's slots in order."""

    enumerated: np.ndarray  # (N, K) scores, column 0 the full model
    enumerated_costs: np.ndarray  # (K,)
    arms: dict[str, np.ndarray]  # arm -> (N, B) scores, slot order = evaluation order
    arm_costs: dict[str, np.ndarray]  # arm -> (B,)


def split_columns(scores: np.ndarray, costs: np.ndarray, config_ids: list[str], families: list[str]) -> Columns:
    """Split a (sequence x configuration) matrix, `full` in column 0, by family into enumerated and arms.
    Raises ValueError when an arm is missing."""
    enum = [k for k, f in enumerate(families) if f not in SEARCH_FAMILIES]
    arms, arm_costs = {}, {}
    for arm in SEARCH_FAMILIES:
        cols = sorted((k for k, f in enumerate(families) if f == arm), key=lambda k: config_ids[k])
        if not cols:
            raise ValueError(f"no {arm} columns: not a search run (see `dynoracle search`)")
        arms[arm], arm_costs[arm] = scores[:, cols], costs[cols]
    return Columns(scores[:, enum], costs[enum], arms, arm_costs)


def curve(columns: Columns, steps: list[int], budgets: list[float], resamples: int = DEFAULT_RESAMPLES,
          seed: int = 0, level: float = DEFAULT_LEVEL) -> pd.DataFrame:
    """One row per (arm, m in `steps`, budget): value, value_lo, value_hi at that budget, and the least matching
    budget with its interval (match, match_lo, match_hi; NaN where the oracle never matches)."""
    tail = (1.0 - level) / 2.0
    rows = []
    for arm, slot_scores in columns.arms.items():
        for m in steps:
            scores = np.hstack([columns.enumerated, slot_scores[:, :m]])
            costs = np.concatenate([columns.enumerated_costs, columns.arm_costs[arm][:m]])
            frontier = build_frontier(scores, costs)
            values = values_at(frontier, np.asarray(budgets, dtype=np.float64))
            match = min_budget_to_match(frontier, scores[:, 0])
            draws = bootstrap_oracle(scores, costs, np.asarray(budgets, dtype=np.float64), resamples, seed, level)
            v_lo, v_hi = np.quantile(draws.values, [tail, 1.0 - tail], axis=0)
            found = draws.match[~np.isnan(draws.match)]
            m_lo, m_hi = np.quantile(found, [tail, 1.0 - tail]) if found.size else (np.nan, np.nan)
            for b, budget in enumerate(budgets):
                rows.append({"arm": arm, "evaluated": m, "budget": float(budget), "value": float(values[b]),
                             "value_lo": float(v_lo[b]), "value_hi": float(v_hi[b]),
                             "match": np.nan if match is None else float(match),
                             "match_lo": float(m_lo), "match_hi": float(m_hi)})
    return pd.DataFrame(rows)


def arm_shares(columns: Columns, threshold: float, max_cost: float, resamples: int = DEFAULT_RESAMPLES,
               seed: int = 0) -> dict[str, Shares]:
    """CoLa's shares (`pipeline.analysis.shares`) with "right" = score >= `threshold`, for the enumerated
    configurations alone and with each arm's programs added."""
    out = {"enumerated": cola_shares(columns.enumerated >= threshold, columns.enumerated_costs, 0, max_cost,
                                     resamples, seed)}
    for arm, slot_scores in columns.arms.items():
        correct = np.hstack([columns.enumerated, slot_scores]) >= threshold
        costs = np.concatenate([columns.enumerated_costs, columns.arm_costs[arm]])
        out[arm] = cola_shares(correct, costs, 0, max_cost, resamples, seed)
    return out
