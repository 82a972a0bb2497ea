"""What `report` adds for a paper: figure formats, named custom sets and checkpoint marks, readable share bands,
and the controller section of report.md.

Pure drawing and text over the frames `pipeline.report.figures` already reads; no file is read here.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.lines import Line2D

from pipeline.analysis.controller import overall_share
from pipeline.generation.configs import CUSTOM

FIGURE_FORMATS = ("png", "pdf", "svg")
NAMED_BANDS = 10  # share bands drawn in their own colour and named; the rest are grey, counted in the legend
CHECKPOINT_LABEL = "ran on its own checkpoint ([checkpoints])"


def figure_formats(text: str) -> tuple[str, ...]:
    """`png,pdf` as ("png", "pdf"); ValueError naming an unknown one (before any file is written)."""
    formats = tuple(dict.fromkeys(f.strip().lower() for f in text.split(",") if f.strip()))
    unknown = [f for f in formats if f not in FIGURE_FORMATS]
    if unknown or not formats:
        raise ValueError(f"unknown figure format {', '.join(unknown) or '(none)'}; choose from "
                         f"{', '.join(FIGURE_FORMATS)} (comma-separated)")
    return formats


def plot_named_configs(ax, per_config: pd.DataFrame, checkpoints: Mapping[str, str], column: str = "score") -> None:
    """Custom layer sets as points labelled with their names, and every configuration that ran on a checkpoint
    ringed and labelled, at (cost, `column`) (per_config: config_id, family, cost, `column`)."""
    custom = per_config[per_config["family"] == CUSTOM]
    if not custom.empty:
        ax.plot(custom["cost"], custom[column], ls="none", marker="D", ms=6, color="tab:olive",
                label="custom layer sets (named)")
    marked = per_config[per_config["config_id"].isin(list(checkpoints))]
    if not marked.empty:
        ax.plot(marked["cost"], marked[column], ls="none", marker="o", ms=13, mfc="none", mec="black", mew=1.6,
                zorder=6, label=CHECKPOINT_LABEL)
    for row in pd.concat([custom, marked]).drop_duplicates("config_id").itertuples():
        name = row.config_id + (" (checkpoint)" if row.config_id in checkpoints else "")
        ax.annotate(name, xy=(row.cost, getattr(row, column)), xytext=(6, -12), textcoords="offset points", fontsize=8,
                    zorder=7, bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none", "alpha": 0.8})


def band_colors(order: list[str], shares: Mapping[str, np.ndarray], families: Mapping[str, str],
                checkpoints: Mapping[str, str]) -> tuple[list, list]:
    """Colours of the stacked share bands (in `order`) and their legend handles.

    The NAMED_BANDS configurations with the largest mean share over the budgets get distinct colours and
    their names in the legend; the others are light grey, one legend entry saying how many.
    """
    top = sorted(order, key=lambda c: -float(np.mean(shares[c])))[:NAMED_BANDS]
    palette = colormaps["tab10"].colors
    colour = {c: palette[i % len(palette)] for i, c in enumerate(sorted(top, key=order.index))}
    colors = [colour.get(c, "0.85") for c in order]
    handles = [Line2D([], [], color=colour[c], lw=8,
                      label=f"{c} ({families[c]}{', checkpoint' if c in checkpoints else ''})")
               for c in sorted(top, key=order.index)]
    rest = len(order) - len(top)
    if rest:
        handles.append(Line2D([], [], color="0.85", lw=8, label=f"{rest} other configuration{'s' if rest > 1 else ''}"))
    return colors, handles


def checkpoint_section(checkpoints: Mapping[str, str]) -> list[str]:
    """report.md lines naming the configurations that ran on their own checkpoint (none: no lines)."""
    if not checkpoints:
        return []
    lines = ["## Configurations on their own checkpoints", "",
             "These ran on the model named beside them (the job's `[checkpoints]`), the others on the job's model; "
             "the figures ring them.", "", "| configuration | checkpoint |", "|---|---|"]
    return [*lines, *(f"| {c} | `{source}` |" for c, source in sorted(checkpoints.items())), ""]


def controller_section(curves: pd.DataFrame | None, num_layers: float) -> list[str]:
    """report.md lines for `dynoracle controller`'s curves (none when it has not run): per feature layer and
    learner, the share of the oracle's gain recovered over all budgets and at about L/2, real against the
    shuffled-feature null."""
    if curves is None or curves.empty:
        return []
    half = float(curves["budget"].iloc[np.argmin(np.abs(curves["budget"].to_numpy() - num_layers / 2))])
    lines = ["## Prompt-feature controllers", "",
             "Share of the oracle's gain over the best static configuration that a controller recovers, "
             "(controller - static) / (oracle - static), cross-fitted over sequences; the null sees shuffled "
             "features.", "",
             f"| feature layer | learner | share over all budgets (real / null) | share at {half:g} layers "
             "(real / null) |", "|---|---|---|---|"]

    def shares(rows: pd.DataFrame) -> tuple[str, str]:
        total = overall_share(rows["value"].to_numpy(), rows["static"].to_numpy(), rows["oracle"].to_numpy())
        at = rows.loc[np.isclose(rows["budget"], half), "share"]
        return (f"{total:.1%}" if total is not None else "n/a",
                f"{at.iloc[0]:.1%}" if len(at) and np.isfinite(at.iloc[0]) else "n/a")

    for (layer, learner), rows in curves.groupby(["layer", "learner"], sort=True):
        (real_all, real_half), (null_all, null_half) = shares(rows[~rows["null"]]), shares(rows[rows["null"]])
        where = "final" if layer >= num_layers else f"{layer}"
        lines.append(f"| {where} | {learner} | {real_all} / {null_all} | {real_half} / {null_half} |")
    return [*lines, ""]
