"""The search curve figure: the oracle's least matching budget and its value at fixed budgets against the
number of programs evaluated per sequence, search against the random-program null, with 95% bands."""

from __future__ import annotations

import pandas as pd
from matplotlib.figure import Figure

ARM_STYLE = {"search": ("local search", "tab:blue"), "random": ("random programs (null)", "tab:gray")}


def plot_search_curve(frame: pd.DataFrame, num_layers: int, title: str) -> Figure:
    """frame: `pipeline.search.curve.curve`'s rows. Left: least budget matching the full model; right: the
    oracle's value at each fixed budget (one line style per budget)."""
    fig = Figure(figsize=(11, 4.2))
    left, right = fig.subplots(1, 2)
    styles = ["-", "--", ":", "-."]
    for arm, (label, color) in ARM_STYLE.items():
        rows = frame[frame["arm"] == arm]
        per_m = rows.drop_duplicates("evaluated").sort_values("evaluated")
        left.plot(per_m["evaluated"], per_m["match"], marker="o", color=color, label=label)
        left.fill_between(per_m["evaluated"], per_m["match_lo"], per_m["match_hi"], color=color, alpha=0.2)
        for style, (budget, part) in zip(styles, rows.groupby("budget")):
            part = part.sort_values("evaluated")
            right.plot(part["evaluated"], part["value"], style, color=color, label=f"{label}, {budget:g} layers")
            right.fill_between(part["evaluated"], part["value_lo"], part["value_hi"], color=color, alpha=0.12)
    left.set_xlabel("programs evaluated per sequence (besides the enumerated configurations)")
    left.set_ylabel(f"least budget matching the full model (of {num_layers} layers)")
    right.set_xlabel("programs evaluated per sequence")
    right.set_ylabel("oracle's mean score at the budget")
    left.legend(fontsize=8)
    right.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    return fig
