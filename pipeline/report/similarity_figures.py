"""The report's hidden-state similarity figures and table, drawn from `similarity-<response>.parquet`.

As the study shows them: the final state's similarity to the full model against cost, one curve per
family (its figure 1a); and the similarity after every layer for a few budgets (its figures 4 and 5).
Bands are the summary's bootstrap intervals; RLS curves average the seeds' means and bounds.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from pipeline.analysis.similarity import RESPONSES, summary_path
from pipeline.generation.configs import FULL_ID
from pipeline.run.location import read_parquet

FAMILY_STYLE = {"uls": ("ULS (uniform skip)", "tab:blue"), "ee": ("EE (early exit)", "tab:orange"),
                "rls": ("RLS (random skip)", "tab:green")}
LAYER_FRACTIONS = (0.25, 0.5, 0.75)  # budgets of the layerwise figure, as fractions of L


def load_summary(run_dir: Path) -> tuple[str, pd.DataFrame] | None:
    """The first summary present, reference before full: (response, frame), or None when there is none."""
    for response in RESPONSES:
        path = summary_path(run_dir, response)
        if path.is_file():
            return response, read_parquet(path).to_pandas()
    return None


def _family_means(frame: pd.DataFrame) -> pd.DataFrame:
    """Mean over configurations of the same family, cost and layer (RLS seeds), with `full` as every family's end."""
    return frame.groupby(["family", "cost", "layer"], as_index=False)[["similarity", "lo", "hi"]].mean()


def plot_final_against_cost(frame: pd.DataFrame, num_layers: int, response: str, title: str) -> Figure:
    """The final state's (after the final norm) mean similarity to the full model against cost, per family."""
    final = _family_means(frame[frame["layer"] == num_layers])
    full = final[final["family"] == FULL_ID]
    fig = Figure(figsize=(9, 5), layout="constrained")
    ax = fig.add_subplot()
    for family, (label, color) in FAMILY_STYLE.items():
        curve = pd.concat([final[final["family"] == family], full]).sort_values("cost")
        if len(curve) < 2:
            continue
        ax.plot(curve["cost"], curve["similarity"], marker="o", ms=4, lw=1.3, color=color, label=label)
        ax.fill_between(curve["cost"], curve["lo"], curve["hi"], color=color, alpha=0.2, lw=0)
    ax.set_xlim(0, num_layers + 0.5)
    ax.set_xlabel("cost: executed layers")
    ax.set_ylabel("cosine similarity to the full model")
    ax.grid(alpha=0.3)
    ax.legend(frameon=False, fontsize=9)
    ax.set_title(f"{title}\nfinal hidden state (after the final norm) vs the full model's, teacher-forced on the "
                 f"{response} response; bands: 95% intervals", fontsize=10)
    return fig


def layer_budgets(frame: pd.DataFrame, num_layers: int) -> list[int]:
    """Budgets near LAYER_FRACTIONS of L that every family of the summary has."""
    families = [f for f in FAMILY_STYLE if f in set(frame["family"])]
    common = set.intersection(*(set(frame.loc[frame["family"] == f, "cost"]) for f in families)) if families else set()
    chosen = []
    for fraction in LAYER_FRACTIONS:
        if common:
            best = min(common, key=lambda c: (abs(c - fraction * num_layers), c))
            chosen.append(int(best))
    return sorted(set(chosen))


def plot_layers(frame: pd.DataFrame, num_layers: int, response: str, title: str) -> Figure:
    """Similarity after each layer (state carried through skipped layers) for a few budgets, one panel each."""
    budgets = layer_budgets(frame, num_layers)
    means = _family_means(frame[frame["layer"] < num_layers])
    fig = Figure(figsize=(4.2 * max(1, len(budgets)) + 1, 4.6), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, max(1, len(budgets)), sharey=True))
    for ax, budget in zip(axes, budgets):
        for family, (label, color) in FAMILY_STYLE.items():
            curve = means[(means["family"] == family) & (means["cost"] == budget)].sort_values("layer")
            if curve.empty:
                continue
            ax.plot(curve["layer"], curve["similarity"], lw=1.4, color=color, label=label)
            ax.fill_between(curve["layer"], curve["lo"], curve["hi"], color=color, alpha=0.2, lw=0)
        ax.set_title(f"{budget} of {num_layers} layers", fontsize=10)
        ax.set_xlabel("layer (0-based): state after it")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("cosine similarity to the full model")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=len(labels), frameon=False, fontsize=9)
    fig.suptitle(f"{title}: hidden state after each layer vs the full model's ({response} response; "
                 "bands: 95% intervals)", fontsize=10)
    return fig


def similarity_section(frame: pd.DataFrame, num_layers: int, response: str) -> list[str]:
    """report.md lines: the final state's similarity of ULS and EE at the layerwise figure's budgets."""
    final = _family_means(frame[frame["layer"] == num_layers])
    lines = ["## Hidden-state similarity to the full model", "",
             f"Teacher-forced on the {response} response, mean over tokens and sequences of the cosine similarity "
             "of the final hidden state (after the final norm, for every family) to the full model's; "
             "95% bootstrap intervals over sequences.", "",
             "| budget (layers) | " + " | ".join(FAMILY_STYLE[f][0] for f in FAMILY_STYLE if f in set(final["family"])) + " |",
             "|---|" + "---|" * sum(f in set(final["family"]) for f in FAMILY_STYLE)]
    for budget in layer_budgets(frame, num_layers):
        cells = []
        for family in FAMILY_STYLE:
            row = final[(final["family"] == family) & (final["cost"] == budget)]
            if family in set(final["family"]):
                cells.append(f"{row['similarity'].iloc[0]:.4f} ({row['lo'].iloc[0]:.4f} to {row['hi'].iloc[0]:.4f})"
                             if len(row) else "")
        lines.append(f"| {budget} | " + " | ".join(cells) + " |")
    return lines + [""]
