"""Controllers: choose each sequence's configuration from its prompt features alone, judged on true scores.

Pure numpy / scikit-learn, no I/O. Inputs: features X (N x D), true scores S (N x K), configuration costs
c (K), budgets (B). Every learner is cross-fitted over sequences (k seeded folds): a sequence's choice
comes from a model fitted on the other folds only, and is then scored with its true score.

- Regression controllers ("ridge", "boosting") predict every configuration's score of a sequence; the
  predicted N x K matrix is allocated at each budget by the project's oracle solver (`pipeline.analysis.oracle`),
  so mean cost <= budget by construction (costs are known, only scores are predicted).
- The classifier ("classifier") predicts the configuration the oracle gives a sequence at the budget,
  learnt from the oracle's choices on the training folds' true scores; nothing bounds its mean cost.

Measures: at budget B the oracle's value, the best static configuration with cost <= B, and the share of
the oracle's gain a controller recovers, (controller - static) / (oracle - static): the "performance gap
recovered" of model-routing work (Ong et al. 2024, RouteLLM), with static in the weak model's place.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sklearn.decomposition import PCA
from sklearn.ensemble import GradientBoostingRegressor
from sklearn.linear_model import RidgeClassifier, RidgeCV
from sklearn.model_selection import KFold
from sklearn.multioutput import MultiOutputRegressor
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler

from pipeline.analysis.oracle import allocate, build_frontier

LEARNERS = ("ridge", "boosting", "classifier")
REGRESSORS = ("ridge", "boosting")
COMPONENTS = 16  # principal components the boosting and classifier learners see (few sequences, wide states)
MIN_GAIN = 1e-9  # oracle - static below this: no gain to recover, the share is undefined (NaN)


@dataclass(frozen=True)
class Curve:
    """A controller's cross-fitted choices and their true outcome at each budget."""

    learner: str
    choices: np.ndarray  # (B, N) configuration index of every sequence at each budget
    value: np.ndarray  # (B,) mean true score
    cost: np.ndarray  # (B,) mean cost (<= budget for the regression controllers)


def fold_splits(n: int, folds: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(train, test) index arrays of seeded shuffled k-fold over n sequences; the tests partition 0..n-1."""
    if not 2 <= folds <= n:
        raise ValueError(f"folds must be between 2 and the number of sequences ({n}), got {folds}")
    return list(KFold(n_splits=folds, shuffle=True, random_state=seed).split(np.zeros((n, 1))))


def _reducer(n_features: int, n_train: int, seed: int) -> list:
    return [StandardScaler(), PCA(n_components=min(COMPONENTS, n_features, n_train), random_state=seed)]


def make_regressor(learner: str, n_features: int, n_train: int, seed: int) -> Pipeline:
    """A multi-output regressor of the K scores: ridge (GCV-tuned per configuration) or gradient boosting."""
    if learner == "ridge":
        return make_pipeline(StandardScaler(), RidgeCV(alphas=np.logspace(-2, 5, 15), alpha_per_target=True))
    if learner == "boosting":
        boosting = GradientBoostingRegressor(n_estimators=60, max_depth=2, learning_rate=0.1, subsample=0.8,
                                             random_state=seed)
        return make_pipeline(*_reducer(n_features, n_train, seed), MultiOutputRegressor(boosting))
    raise ValueError(f"unknown regression learner '{learner}'; choose from {', '.join(REGRESSORS)}")


def cross_fit_scores(features: np.ndarray, scores: np.ndarray, splits: list[tuple[np.ndarray, np.ndarray]],
                     learner: str, seed: int = 0) -> np.ndarray:
    """(N, K) predicted scores, each row from the model fitted on the folds that do not hold it."""
    predicted = np.empty_like(scores, dtype=np.float64)
    for train, test in splits:
        model = make_regressor(learner, features.shape[1], train.size, seed).fit(features[train], scores[train])
        predicted[test] = model.predict(features[test])
    return predicted


def allocate_predicted(predicted: np.ndarray, costs: np.ndarray, budgets: np.ndarray) -> np.ndarray:
    """(B, N) the oracle solver's choices on predicted scores at each budget."""
    frontier = build_frontier(predicted, costs)
    return np.stack([allocate(frontier, b).choice for b in budgets])


def cross_fit_classifier(features: np.ndarray, scores: np.ndarray, costs: np.ndarray, budgets: np.ndarray,
                         splits: list[tuple[np.ndarray, np.ndarray]], seed: int = 0) -> np.ndarray:
    """(B, N) predicted oracle choices: per fold and budget, a linear classifier on principal components
    learns the oracle's choice at that budget over the training folds' true scores.

    RidgeClassifier (one least-squares fit for all classes) rather than a logistic regression: with one fit
    per fold and budget and up to K classes, it is ~10x faster at about the same accuracy here.
    """
    choices = np.empty((len(budgets), scores.shape[0]), dtype=np.intp)
    for train, test in splits:
        reducer = make_pipeline(*_reducer(features.shape[1], train.size, seed)).fit(features[train])
        z_train, z_test = reducer.transform(features[train]), reducer.transform(features[test])
        frontier = build_frontier(scores[train], costs)
        for b, budget in enumerate(budgets):
            labels = allocate(frontier, budget).choice
            if np.unique(labels).size == 1:  # one class: nothing to learn, every sequence gets it
                choices[b, test] = labels[0]
                continue
            model = RidgeClassifier(alpha=1.0).fit(z_train, labels)
            choices[b, test] = model.predict(z_test)
    return choices


def outcome(choices: np.ndarray, scores: np.ndarray, costs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean true score and mean cost (B,) of (B, N) choices."""
    rows = np.arange(scores.shape[0])
    return scores[rows, choices].mean(axis=1), costs[choices].mean(axis=1)


def run_controller(learner: str, features: np.ndarray, scores: np.ndarray, costs: np.ndarray,
                   budgets: np.ndarray, splits: list[tuple[np.ndarray, np.ndarray]], seed: int = 0) -> Curve:
    """One learner's cross-fitted curve over `budgets` (see the module docstring)."""
    features, scores = np.asarray(features, dtype=np.float64), np.asarray(scores, dtype=np.float64)
    costs, budgets = np.asarray(costs, dtype=np.float64), np.asarray(budgets, dtype=np.float64)
    if features.ndim != 2 or features.shape[0] != scores.shape[0]:
        raise ValueError(f"features must be N x D with one row per sequence ({scores.shape[0]}), got {features.shape}")
    if learner == "classifier":
        choices = cross_fit_classifier(features, scores, costs, budgets, splits, seed)
    elif learner in REGRESSORS:
        choices = allocate_predicted(cross_fit_scores(features, scores, splits, learner, seed), costs, budgets)
    else:
        raise ValueError(f"unknown learner '{learner}'; choose from {', '.join(LEARNERS)}")
    value, cost = outcome(choices, scores, costs)
    return Curve(learner, choices, value, cost)


def shuffled(features: np.ndarray, seed: int) -> np.ndarray:
    """The null: every sequence gets another sequence's features (a seeded permutation of the rows)."""
    return features[np.random.default_rng(seed).permutation(features.shape[0])]


def best_static(scores: np.ndarray, costs: np.ndarray, budgets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(B,) mean score and index of the best single configuration with cost <= budget (-1, NaN if none)."""
    means = scores.mean(axis=0)
    affordable = costs[None, :] <= np.asarray(budgets)[:, None] + 1e-9
    masked = np.where(affordable, means[None, :], -np.inf)
    index = np.where(affordable.any(axis=1), masked.argmax(axis=1), -1)
    return np.where(index >= 0, means[index], np.nan), index


def gain_share(controller: np.ndarray, static: np.ndarray, oracle: np.ndarray) -> np.ndarray:
    """(controller - static) / (oracle - static); NaN where the oracle gains less than MIN_GAIN over static."""
    gain = oracle - static
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(gain > MIN_GAIN, (controller - static) / gain, np.nan)


def overall_share(controller: np.ndarray, static: np.ndarray, oracle: np.ndarray) -> float | None:
    """One number per curve: the gain recovered summed over budgets over the oracle's gain summed over them.

    A ratio of sums, so budgets where the oracle barely beats static (tiny denominators) weigh little;
    None when the oracle gains nothing anywhere.
    """
    gain = np.nansum(np.asarray(oracle) - np.asarray(static))
    return float(np.nansum(np.asarray(controller) - np.asarray(static)) / gain) if gain > MIN_GAIN else None


def match_budget(budgets: np.ndarray, values: np.ndarray, target: float) -> float | None:
    """Least budget whose value reaches `target` (values need not rise with the budget); None if none does."""
    reached = np.flatnonzero(np.asarray(values) >= target)
    return float(budgets[reached[0]]) if reached.size else None


def bootstrap_match(budgets: np.ndarray, choices: np.ndarray, scores: np.ndarray, full: int, resamples: int,
                    seed: int, level: float = 0.95) -> tuple[float | None, float | None, float]:
    """Percentile interval of the least budget at which the choices match the full model's mean.

    Sequences are resampled with replacement (paired: the same resample for the controller and `full`,
    the configuration index of the full model), the choices held fixed. Returns (low, high, unmatched):
    `unmatched` is the share of resamples where no budget matches; a bound that falls among them is None.
    """
    n = scores.shape[0]
    chosen = scores[np.arange(n), choices]  # (B, N)
    matches = np.empty(resamples)
    for r, sample in enumerate(np.random.default_rng(seed).integers(0, n, (resamples, n))):
        reached = np.flatnonzero(chosen[:, sample].mean(axis=1) >= scores[sample, full].mean())
        matches[r] = budgets[reached[0]] if reached.size else np.inf
    low, high = np.quantile(matches, [(1 - level) / 2, (1 + level) / 2], method="inverted_cdf")
    return _finite(low), _finite(high), float(np.isinf(matches).mean())


def _finite(x: float) -> float | None:
    return float(x) if np.isfinite(x) else None
