"""Figures of the per-token experiments: the trained gates on the cost-quality plot (`dynoracle gates`) and the
per-token oracle against the per-sequence one (`dynoracle token-oracle`)."""

from __future__ import annotations

import pandas as pd
from matplotlib.figure import Figure


GATE_STYLE = {"hidden": ("tab:green", "o", "hidden state h^(l-1)"), "fixed": ("tab:olive", "s", "fixed input (control)")}
FAMILY_COLORS = {"uls": "tab:blue", "ee": "tab:orange", "rls": "tab:green", "custom": "tab:gray"}


def plot_gates(ax, gates: pd.DataFrame) -> None:
    """One curve per gate input over the lambda sweep: mean score against mean layers run per decode token,
    each point with its bootstrap intervals in both directions."""
    for gate_input, frame in gates.groupby("gate_input"):
        color, marker, label = GATE_STYLE[gate_input]
        frame = frame.sort_values("cost")
        ax.errorbar(frame["cost"], frame["mean"], xerr=[frame["cost"] - frame["cost_lo"], frame["cost_hi"] - frame["cost"]],
                    yerr=[frame["mean"] - frame["mean_lo"], frame["mean_hi"] - frame["mean"]], color=color,
                    marker=marker, ms=6, lw=1.6, capsize=3, zorder=4,
                    label=f"per-token gates, {label} (lambda {', '.join(f'{v:g}' for v in sorted(frame['lam']))})")


def plot_token_oracle(summary: pd.DataFrame, positions: pd.DataFrame, sequence_oracle: dict, title: str) -> Figure:
    """Left: each family's per-token oracle (mean layers per token, 95% interval) beside the per-sequence oracle's
    least budget matching the full model. Right: the per-token oracle's mean cost over the output positions."""
    L = float(sequence_oracle["num_layers"])
    fig = Figure(figsize=(11, 4.5), layout="constrained")
    left, right = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    labels, values, errors, colors = [], [], [[], []], []
    for row in summary.sort_values("family").itertuples():
        labels.append(f"per token, {row.family}")
        values.append(row.mean_cost)
        errors[0].append(row.mean_cost - row.mean_cost_lo)
        errors[1].append(row.mean_cost_hi - row.mean_cost)
        colors.append(FAMILY_COLORS.get(row.family, "tab:gray"))
    match = sequence_oracle.get("min_budget_to_match")
    if match is not None:
        lo, hi = sequence_oracle.get("min_budget_interval") or (match, match)
        labels.append("per sequence (all families),\nleast budget matching full")
        values.append(match)
        errors[0].append(match - lo)
        errors[1].append(hi - match)
        colors.append("black")
    left.barh(labels, values, xerr=errors, color=colors, alpha=0.8, capsize=4)
    for y, v in enumerate(values):
        left.text(v, y, f" {v:.2f}", va="center", ha="left", fontsize=9)
    left.set_xlim(0, L)
    left.set_xlabel(f"layers (of {L:g}) per generated token")
    left.invert_yaxis()
    left.set_title("oracle cost: per token (optimistic: full-model states\nfor earlier tokens) vs per sequence", fontsize=10)
    for family, frame in positions.groupby("family"):
        frame = frame.sort_values("bucket")
        mid = (frame["first_position"] + frame["last_position"]) / 2
        right.plot(mid, frame["mean_cost"], marker="o", color=FAMILY_COLORS.get(family, "tab:gray"), label=family)
        right.plot(mid, frame["share_full"] * L, ls=":", color=FAMILY_COLORS.get(family, "tab:gray"),
                   label=f"{family}: share of tokens needing all {L:g} layers (x {L:g})")
    right.set_ylim(0, L)
    right.set_xlabel("position of the generated token")
    right.set_ylabel("mean layers per token")
    right.grid(alpha=0.3)
    right.legend(fontsize=8, frameon=False)
    right.set_title("per-token oracle over positions", fontsize=10)
    fig.suptitle(title, fontsize=11)
    return fig
