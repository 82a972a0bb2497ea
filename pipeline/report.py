"""`dynoracle report`: the study's figures and headline numbers, written into a run folder.

Oracle numbers are the reducer's own files (it is rerun first when they are absent, older than the
generations, or made with other settings), so nothing of the oracle is recomputed here; the static
configurations' means come from SQL over the generations. Figures are drawn on matplotlib `Figure`
objects, which render with Agg and touch no global pyplot state.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import PercentFormatter

from pipeline.configs import FAMILIES, FULL_ID
from pipeline.query import open_run
from pipeline.reduce import reduce_run
from pipeline.atomic import write_atomic
from pipeline.location import RunPath, locate, read_parquet

ORACLE_FILES = ("frontier.parquet", "allocations.parquet", "summary.json")
HEADLINE_FRACTIONS = (0.25, 0.5, 0.75)
# family -> legend label, line colour, colormap of its bands in the shares plot
STYLE = {
    "uls": ("ULS (uniform skip)", "tab:blue", "Blues"),
    "ee": ("EE (early exit)", "tab:orange", "Oranges"),
    "rls": ("RLS (random skip)", "tab:green", "Greens"),
    FULL_ID: ("full model", "0.3", "Greys"),
}
# One row per configuration; each has every sequence (the reducer checks that), so means of means are fair.
CONFIG_MEANS = """
    select config_id, family, cost, avg("{metric}") as score, avg(gen_tokens) as gen_tokens,
           avg(case when finish_reason = 'eos' then 1.0 else 0.0 end) as eos_rate
    from generations group by config_id, family, cost order by family, cost, config_id
"""


@dataclass(frozen=True)
class Report:
    markdown: RunPath
    figures: list[RunPath]
    summary: dict
    reduced: str | None  # why the reducer ran first; None when its files were reused


def build_report(run_dir: str | RunPath, metric: str = "rougeL", families: list[str] | None = None,
                 partial: bool = False) -> Report:
    """Reduce if needed, then write cost_quality.png, oracle_shares.png, lengths.png and report.md.

    `partial` allows a run with shard files missing (see `pipeline.verify`); the report then covers the
    sequences present.
    """
    run_dir = locate(run_dir)
    db = open_run(run_dir, metric, partial)
    try:
        present = db.frame("select distinct family from configs")["family"].tolist()
        per_config = db.frame(CONFIG_MEANS.format(metric=metric))
    finally:
        db.connection.close()
    reason = stale_reason(run_dir, metric, families, present)
    if reason is not None:
        reduce_run(run_dir, metric, families, match_full=True, partial=partial)
    out = run_dir / "oracle" / metric
    summary = json.loads((out / "summary.json").read_text())
    frontier = read_parquet(out / "frontier.parquet").to_pandas()
    per_config = per_config[per_config["family"].isin(summary["families"])]
    job = _job(run_dir)
    title = _describe(job, run_dir)

    figures = {
        "cost_quality.png": plot_cost_quality(per_config, frontier, summary, title),
        "oracle_shares.png": plot_shares(per_config, frontier, summary, title),
        "lengths.png": plot_lengths(per_config, summary, title, job.get("max_new_tokens")),
    }
    paths = []
    for name, fig in figures.items():
        paths.append(run_dir / name)
        write_atomic(paths[-1], lambda tmp, fig=fig: fig.savefig(tmp, format="png", dpi=130))
    text = markdown(summary, frontier, per_config, title, list(figures))
    write_atomic(run_dir / "report.md", lambda tmp: tmp.write_text(text))
    return Report(run_dir / "report.md", paths, summary, reason)


def stale_reason(run_dir: RunPath, metric: str, families: list[str] | None, present: list[str]) -> str | None:
    """Why the oracle files of `metric` cannot serve the report (None when they can).

    They must exist, be newer than every input (a rewritten or deleted shard touches the generations
    folder), use nominal cost, include the minimal matching budget, and cover the wanted families
    (default: every family the run has, as the reducer's default).
    """
    out = run_dir / "oracle" / metric
    outputs = [out / name for name in ORACLE_FILES]
    if not all(p.is_file() for p in outputs):
        return "no oracle files yet"
    generations = run_dir / "generations"
    inputs = [run_dir / "configs.parquet", generations, *generations.glob("*.parquet")]
    if max(p.stat().st_mtime_ns for p in inputs if p.exists()) > min(p.stat().st_mtime_ns for p in outputs):
        return "the generations are newer than the oracle files"
    try:
        summary = json.loads(outputs[-1].read_text())
    except (OSError, json.JSONDecodeError):
        return "summary.json is unreadable"
    if summary.get("cost_mode") != "nominal":
        return "the oracle files use measured cost"
    if summary.get("missing_shards", 0):
        return "the oracle files cover a partial run"
    if summary.get("min_budget_to_match") is None:
        return "the oracle files lack the minimal matching budget"
    wanted = set(present if families is None else [FULL_ID, *families])
    if set(summary.get("families", ())) != wanted | {FULL_ID}:
        return "the oracle files cover other families"
    return None


def family_curves(per_config: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """Each static family's means by cost (RLS seeds averaged), ending at the full model: budget L is `full`."""
    full = per_config[per_config["family"] == FULL_ID]
    curves = {}
    for family in FAMILIES:
        rows = per_config[per_config["family"] == family]
        if rows.empty:
            continue
        means = rows.groupby("cost", as_index=False).agg(
            score=("score", "mean"), gen_tokens=("gen_tokens", "mean"), eos_rate=("eos_rate", "mean"),
            configs=("config_id", "count"))
        curves[family] = pd.concat([means, full.assign(configs=1)[means.columns]], ignore_index=True)
    return curves


def _label(family: str, curve: pd.DataFrame) -> str:
    seeds = int(curve["configs"].max())
    return STYLE[family][0] + (f", mean of {seeds} seeds" if seeds > 1 else "")


def plot_cost_quality(per_config: pd.DataFrame, frontier: pd.DataFrame, summary: dict, title: str) -> Figure:
    """The study's figure 2: static families and the oracle frontier against cost, with the matching budget."""
    L, metric, full_mean = summary["num_layers"], summary["metric"], summary["full_mean"]
    fig = Figure(figsize=(10, 5.5), layout="constrained")
    ax = fig.add_subplot()
    for family, curve in family_curves(per_config).items():
        ax.plot(curve["cost"], curve["score"], marker="o", ms=4, lw=1.3, color=STYLE[family][1],
                label=_label(family, curve))
    ax.axhline(full_mean, color="0.3", ls=":", lw=1.5, label=f"full model, {L:g} layers ({full_mean:.4f})")
    line = frontier.drop_duplicates("budget").sort_values("budget")
    ax.plot(line["budget"], line["lp_bound"], color="black", ls="--", lw=0.9, alpha=0.6, label="oracle, LP bound")
    ax.plot(line["budget"], line["value"], color="black", lw=2, label="oracle, one configuration per sequence")

    match = summary["min_budget_to_match"]
    value = float(frontier.loc[frontier["kind"] == "match_full", "value"].iloc[0])
    ax.plot(match, value, marker="*", ms=17, color="tab:red", mec="black", zorder=5,
            label="least budget matching the full model")
    # Up and to the left of the marker is free: the oracle never decreases and beats every static
    # configuration it can afford. Near the left edge, go right instead (the white box keeps it legible).
    left = match > 0.35 * L
    ax.annotate(f"matches the full model at\n{match:.2f} of {L:g} layers ({match / L:.1%})", xy=(match, value),
                xytext=(-14 if left else 14, 16), textcoords="offset points", ha="right" if left else "left",
                va="bottom", fontsize=10, color="tab:red", zorder=6,
                bbox={"boxstyle": "round,pad=0.3", "fc": "white", "ec": "none", "alpha": 0.85})
    low, high = ax.get_ylim()
    ax.set_ylim(low, high + 0.2 * (high - low))  # headroom for the note

    ax.set_xlim(0, L + 0.5)
    ax.set_xlabel("cost: executed layers per sequence (mean)")
    ax.set_ylabel(f"mean {metric}")
    top = ax.secondary_xaxis("top", functions=(lambda x: x / L, lambda f: f * L))
    top.xaxis.set_major_formatter(PercentFormatter(1.0))
    top.set_xlabel(f"share of the model's {L:g} layers")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), frameon=False, fontsize=9)
    ax.set_title(f"{title}\n{metric} against cost: static configurations and the per-sequence oracle", fontsize=11)
    return fig


def plot_shares(per_config: pd.DataFrame, frontier: pd.DataFrame, summary: dict, title: str) -> Figure:
    """Which configurations the oracle gives its sequences at each grid budget, as stacked shares.

    Bands are coloured by family and shaded by cost (light = few layers), so dozens of configurations
    stay readable with one legend entry per family.
    """
    L = summary["num_layers"]
    grid = frontier[frontier["kind"] == "grid"].sort_values("budget")
    shares: dict[str, np.ndarray] = {}
    for i, row_shares in enumerate(grid["shares"]):
        for item in row_shares:
            shares.setdefault(item["config_id"], np.zeros(len(grid)))[i] = item["share"]
    meta = per_config.set_index("config_id")
    rank = {f: i for i, f in enumerate((*FAMILIES, FULL_ID))}
    order = sorted(shares, key=lambda c: (rank[meta.at[c, "family"]], meta.at[c, "cost"], c))
    colors = [_shade(meta.at[c, "family"], meta.at[c, "cost"] / L) for c in order]

    fig = Figure(figsize=(10, 5.5), layout="constrained")
    ax = fig.add_subplot()
    ax.stackplot(grid["budget"], [shares[c] for c in order], colors=colors, edgecolor="white", linewidth=0.3)
    match = summary["min_budget_to_match"]
    ax.axvline(match, color="tab:red", ls="--", lw=1.5)
    used = pd.Series([meta.at[c, "family"] for c in order]).value_counts()
    handles = [Patch(color=_shade(f, 1.0 if f == FULL_ID else 0.6),
                     label=f"{STYLE[f][0]}: {used[f]} configuration{'s' if used[f] > 1 else ''} used")
               for f in sorted(used.index, key=rank.get)]
    handles.append(Line2D([], [], color="tab:red", ls="--", label=f"least budget matching full ({match:.2f})"))
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1), frameon=False, fontsize=9,
              title="shade: lighter = fewer layers", title_fontsize=9)
    ax.set_xlim(grid["budget"].min(), grid["budget"].max())
    ax.set_ylim(0, 1)
    ax.yaxis.set_major_formatter(PercentFormatter(1.0))
    ax.set_xlabel("budget: mean executed layers per sequence")
    ax.set_ylabel("share of sequences")
    ax.set_title(f"{title}\nthe oracle's choice of configuration at each budget ({summary['metric']})", fontsize=11)
    return fig


def _shade(family: str, depth: float) -> tuple:
    """A family's colour, lighter for shallower configurations (depth = cost / L).

    The range stops short of both ends of the colormap: near-white and near-black bands lose their hue.
    """
    return colormaps[STYLE[family][2]](0.3 + 0.55 * depth)


def plot_lengths(per_config: pd.DataFrame, summary: dict, title: str, max_new_tokens: int | None) -> Figure:
    """Output length and EOS rate per configuration: skipped models that never stop show up here."""
    L = summary["num_layers"]
    full = per_config[per_config["family"] == FULL_ID].iloc[0]
    fig = Figure(figsize=(11, 4.8), layout="constrained")
    axes = fig.subplots(1, 2, sharex=True)
    for family, curve in family_curves(per_config).items():
        for ax, column in zip(axes, ("gen_tokens", "eos_rate")):
            ax.plot(curve["cost"], curve[column], marker="o", ms=4, lw=1.3, color=STYLE[family][1],
                    label=_label(family, curve))
    for ax, column in zip(axes, ("gen_tokens", "eos_rate")):
        ax.plot(L, full[column], marker="*", ms=15, color="black", ls="none", zorder=5, label="full model")
        ax.set_xlim(0, L + 0.5)
        ax.set_xlabel("cost: executed layers")
        ax.grid(alpha=0.3)
    if max_new_tokens:
        axes[0].axhline(max_new_tokens, color="0.4", ls=":", label=f"max_new_tokens ({max_new_tokens})")
    axes[0].set_ylim(0, 1.08 * max(max_new_tokens or 0, per_config["gen_tokens"].max()))  # the cap stays visible
    axes[0].set_ylabel("mean generated tokens")
    axes[0].set_title("output length", fontsize=10)
    axes[1].set_ylim(-0.03, 1.03)
    axes[1].yaxis.set_major_formatter(PercentFormatter(1.0))
    axes[1].set_ylabel("outputs ending with EOS")
    axes[1].set_title("EOS rate (the rest ran out of tokens)", fontsize=10)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=len(labels), frameon=False, fontsize=9)
    fig.suptitle(f"{title}: output length and stopping per configuration", fontsize=11)
    return fig


def markdown(summary: dict, frontier: pd.DataFrame, per_config: pd.DataFrame, title: str, figures: list[str]) -> str:
    """report.md: headline numbers from the reducer's summary and frontier, then the figures."""
    L, metric = summary["num_layers"], summary["metric"]
    match = summary["min_budget_to_match"]
    at_match = frontier.loc[frontier["kind"] == "match_full", "value"].iloc[0]
    within = f" (within {summary['tolerance']:g})" if summary["tolerance"] else ""
    lines = [
        f"# dynoracle report: {title}",
        "",
        f"Oracle over {metric} with families {', '.join(summary['families'])}; cost = executed layers "
        f"({summary['cost_mode']}). Numbers from `oracle/{metric}/summary.json` and `frontier.parquet`.",
        "",
        "## Headline",
        "",
        "| quantity | value |",
        "|---|---|",
        f"| sequences | {summary['num_sequences']} |",
        f"| configurations | {summary['num_configs']} |",
        f"| layers L | {L:g} |",
        f"| full-model mean {metric} | {summary['full_mean']:.4f} |",
        f"| least budget matching the full model{within} | {match:.3f} layers ({summary['min_budget_fraction']:.2%} of L) |",
        f"| oracle mean {metric} at that budget | {at_match:.4f} |",
        "",
        "## The oracle at fractions of L",
        "",
        f"| budget (layers) | of L | oracle mean {metric} | LP bound | best single configuration with cost <= budget |",
        "|---|---|---|---|---|",
    ]
    for fraction in HEADLINE_FRACTIONS:
        budget = fraction * L
        row = frontier[np.isclose(frontier["budget"], budget, rtol=0, atol=1e-9)]
        static = per_config[per_config["cost"] <= budget + 1e-9].sort_values("score", ascending=False)
        best = f"{static['config_id'].iloc[0]}: {static['score'].iloc[0]:.4f}" if len(static) else "none"
        if row.empty:  # grid budgets start at the cheapest configuration's cost
            lines.append(f"| {budget:.2f} | {fraction:.0%} | below the cheapest configuration | | {best} |")
        else:
            lines.append(f"| {budget:.2f} | {fraction:.0%} | {row['value'].iloc[0]:.4f} | "
                         f"{row['lp_bound'].iloc[0]:.4f} | {best} |")
    captions = {
        "cost_quality.png": f"Mean {metric} against cost: static families, the full model, the oracle frontier.",
        "oracle_shares.png": "The oracle's share of each configuration at each budget.",
        "lengths.png": "Mean output length and EOS rate per configuration.",
    }
    lines += ["", "## Figures", ""]
    for name in figures:
        lines += [captions[name], "", f"![{name}]({name})", ""]
    return "\n".join(lines)


def _job(run_dir: RunPath) -> dict:
    """The job spec stored in run.json, or {} when there is none (hand-made folders): only titles use it."""
    try:
        return json.loads((run_dir / "run.json").read_text()).get("job", {})
    except (OSError, json.JSONDecodeError, AttributeError):
        return {}


def _describe(job: dict, run_dir: RunPath) -> str:
    dataset = job.get("dataset") or {}
    if not job.get("model") or not dataset.get("name"):
        return run_dir.resolve().name
    split = f" ({dataset['split']})" if dataset.get("split") else ""
    return f"{job['model']} on {dataset['name']}{split}"
