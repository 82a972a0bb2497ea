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
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import PercentFormatter

from pipeline.analysis.gate_curves import read_gates
from pipeline.analysis.reduce import reduce_run
from pipeline.analysis.token_oracle import read_token_oracle
from pipeline.analysis.result_key import choice_families, oracle_name
from pipeline.generation.configs import CUSTOM, FULL_ID, KNOWN_FAMILIES, LOOP
from pipeline.report.accuracy import cola_section
from pipeline.report.oracle_checks import checks_section, draw_null_and_ceiling, picks_section, read_null
from pipeline.report.paper import (
    band_colors,
    checkpoint_section,
    controller_section,
    figure_formats,
    plot_named_configs,
)
from pipeline.report.query import open_run
from pipeline.report.token_figures import plot_gates, plot_token_oracle
from pipeline.report.similarity_figures import load_summary, plot_final_against_cost, plot_layers, similarity_section
from pipeline.run.atomic import write_atomic
from pipeline.run.location import RunPath, locate, read_parquet

ORACLE_FILES = ("frontier.parquet", "allocations.parquet", "config_means.parquet", "summary.json")
HEADLINE_FRACTIONS = (0.25, 0.5, 0.75)
# family -> legend label, line colour
STYLE = {
    "uls": ("ULS (uniform skip)", "tab:blue"),
    "ee": ("EE (early exit)", "tab:orange"),
    "rls": ("RLS (random skip)", "tab:green"),
    CUSTOM: ("custom layer sets", "tab:purple"),
    LOOP: ("loop (a block repeated)", "tab:brown"),
    "search": ("searched programs (per-sequence slots)", "tab:red"),
    "random": ("random programs (the search's null)", "tab:gray"),
    FULL_ID: ("full model", "0.3"),
}
# One row per configuration; each has every sequence (the reducer checks that), so means of means are fair.
CONFIG_MEANS = """
    select config_id, family, cost, avg("{metric}") as score, avg(gen_tokens) as gen_tokens,
           avg(case when finish_reason = 'eos' then 1.0 else 0.0 end) as eos_rate
    from generations group by config_id, family, cost order by family, cost, config_id
"""
CHOICE_CONFIG_MEANS = """
    select config_id, family, cost, avg("{metric}") as score
    from choices group by config_id, family, cost order by family, cost, config_id
"""


@dataclass(frozen=True)
class Report:
    markdown: RunPath
    figures: list[RunPath]
    summary: dict
    reduced: str | None  # why the reducer ran first; None when its files were reused


def build_report(run_dir: str | RunPath, metric: str | None = None, families: list[str] | None = None,
                 partial: bool = False, formats: tuple[str, ...] = ("png",)) -> Report:
    """Reduce if needed, then write cost_quality, oracle_shares, lengths and report.md, plus the hidden-state
    similarity figures when `dynoracle similarity` has run, each figure in every one of `formats` (png, pdf,
    svg); report.md gains the controller and checkpoint sections when the run has them.

    `partial` allows a run with shard files missing (see `pipeline.run.verify`); the report then covers the
    sequences present. A multiple-choice run (metric default acc) has no lengths.png; with a 0/1 metric the
    report adds CoLa's shares against their null (`pipeline.report.accuracy`).
    """
    run_dir = locate(run_dir)
    formats = figure_formats(",".join(formats))
    db = open_run(run_dir, metric, partial)
    metric, generations = db.metric, db.table == "generations"
    try:
        present = db.frame("select distinct family from configs")["family"].tolist()
        per_config = db.frame((CONFIG_MEANS if generations else CHOICE_CONFIG_MEANS).format(metric=metric))
    finally:
        db.connection.close()
    reason = stale_reason(run_dir, metric, families, present, db.table)
    out = run_dir / "oracle" / oracle_name(metric, families, present)
    if reason is not None:  # keep the budgets the stale reduction was asked for
        reduce_run(run_dir, metric, families, requested_budgets(out), match_full=True, partial=partial)
    summary = json.loads((out / "summary.json").read_text())
    frontier = read_parquet(out / "frontier.parquet").to_pandas()
    intervals = read_parquet(out / "config_means.parquet", columns=["config_id", "mean_lo", "mean_hi"]).to_pandas()
    per_config = per_config[per_config["family"].isin(summary["families"])].merge(intervals, on="config_id")
    job = _job(run_dir)
    title = _describe(job, run_dir)
    checkpoints = dict(job.get("checkpoints") or {})

    from pipeline.analysis.controller_run import read_curves  # scikit-learn is imported only when a report is made

    curves = read_curves(run_dir, metric)
    figures = {
        "cost_quality.png": plot_cost_quality(per_config, frontier, summary, title, curves, checkpoints,
                                              read_gates(run_dir, metric), read_null(out),
                                              "generated token after the first" if generations else "scored token"),
        "oracle_shares.png": plot_shares(per_config, frontier, summary, title, checkpoints),
    }
    if generations:
        figures["lengths.png"] = plot_lengths(per_config, summary, title, job.get("max_new_tokens"))
    token_oracle = read_token_oracle(run_dir)
    if token_oracle is not None:
        figures["token_oracle.png"] = plot_token_oracle(*token_oracle, summary, title)
    similarity = load_summary(run_dir)
    extra: list[str] = [*checks_section(summary), *picks_section(run_dir, out, metric, summary, partial),
                        *cola_section(summary)]
    if similarity is not None:
        response, frame = similarity
        L = int(round(summary["num_layers"]))
        figures["similarity_cost.png"] = plot_final_against_cost(frame, L, response, title)
        figures["similarity_layers.png"] = plot_layers(frame, L, response, title)
        extra += similarity_section(frame, L, response)
    extra = [*checkpoint_section(checkpoints), *controller_section(curves, summary["num_layers"]), *extra]
    paths = []
    for name, fig in figures.items():
        for fmt in formats:
            paths.append(run_dir / name.replace(".png", f".{fmt}"))
            write_atomic(paths[-1], lambda tmp, fig=fig, fmt=fmt: fig.savefig(tmp, format=fmt, dpi=130))
    shown = [name.replace(".png", f".{formats[0]}") for name in figures]
    text = markdown(summary, frontier, per_config, title, shown, extra)
    write_atomic(run_dir / "report.md", lambda tmp: tmp.write_text(text))
    return Report(run_dir / "report.md", paths, summary, reason)


def requested_budgets(out: RunPath) -> list[float]:
    """The budgets `reduce --budget` asked for in the oracle folder `out` (none when it has no readable summary)."""
    try:
        summary = json.loads((out / "summary.json").read_text())
    except (OSError, json.JSONDecodeError):
        return []
    return [float(b["budget"]) for b in summary.get("budgets") or []]


def stale_reason(run_dir: RunPath, metric: str, families: list[str] | None, present: list[str],
                 table: str = "generations") -> str | None:
    """Why the oracle files of `metric` cannot serve the report (None when they can).

    They must exist, be newer than every input (a rewritten or deleted shard touches the generations
    folder), use nominal cost, include the minimal matching budget, and cover the wanted families
    (default: every family the run has, as the reducer's default).
    """
    out = run_dir / "oracle" / oracle_name(metric, families, present)
    outputs = [out / name for name in ORACLE_FILES]
    if not all(p.is_file() for p in outputs):
        return "no oracle files yet"
    rows = run_dir / table
    inputs = [run_dir / "configs.parquet", rows, *rows.glob("*.parquet")]
    if max(p.stat().st_mtime_ns for p in inputs if p.exists()) > min(p.stat().st_mtime_ns for p in outputs):
        return f"the {table} are newer than the oracle files"
    try:
        summary = json.loads(outputs[-1].read_text())
    except (OSError, json.JSONDecodeError):
        return "summary.json is unreadable"
    if summary.get("cost_mode") != "nominal":
        return "the oracle files use measured cost"
    if summary.get("missing_shards", 0):
        return "the oracle files cover a partial run"
    if not summary.get("match_full"):
        return "the oracle files lack the minimal matching budget"
    if "degenerate" not in summary:
        return "the oracle files predate the null, the noise ceiling and the degenerate rule"
    wanted = set([FULL_ID, *(choice_families(present) if families is None else families)])
    if set(summary.get("families", ())) != wanted | {FULL_ID}:
        return "the oracle files cover other families"
    return None


def family_curves(per_config: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """Each static family's means by cost (RLS seeds and custom sets of one cost averaged), ending at the full
    model: budget L is `full`."""
    full = per_config[per_config["family"] == FULL_ID]
    curves = {}
    for family in KNOWN_FAMILIES:
        rows = per_config[per_config["family"] == family]
        if rows.empty:
            continue
        averaged = [c for c in ("score", "gen_tokens", "eos_rate", "mean_lo", "mean_hi") if c in per_config]  # choice
        means = rows.groupby("cost", as_index=False).agg(  # rows have no lengths
            **{c: (c, "mean") for c in averaged}, configs=("config_id", "count"))
        curves[family] = pd.concat([means, full.assign(configs=1)[means.columns]], ignore_index=True)
    return curves


def _label(family: str, curve: pd.DataFrame) -> str:
    seeds = int(curve["configs"].max())
    return STYLE[family][0] + (f", mean of {seeds} {'sets' if family == CUSTOM else 'seeds'}" if seeds > 1 else "")


def plot_cost_quality(per_config: pd.DataFrame, frontier: pd.DataFrame, summary: dict, title: str,
                      controllers: pd.DataFrame | None = None, checkpoints: dict[str, str] | None = None,
                      gates: pd.DataFrame | None = None, null: pd.DataFrame | None = None,
                      per: str = "generated token after the first") -> Figure:
    """The study's figure 2: static families and the oracle frontier against cost, with the matching budget,
    the oracle's null and the full model's best-of-K (`pipeline.report.oracle_checks`), the prompt-feature
    controllers (`dynoracle controller`) and the per-token gates (`dynoracle gates`, cost = layers run per
    decode token) when the run has them. Custom layer sets are named points (not a curve); configurations
    that ran on a checkpoint are ringed."""
    L, metric, full_mean = summary["num_layers"], summary["metric"], summary["full_mean"]
    fig = Figure(figsize=(10, 5.5), layout="constrained")
    ax = fig.add_subplot()
    plot_named_configs(ax, per_config, checkpoints or {})
    for family, curve in family_curves(per_config).items():
        if family == CUSTOM:
            continue
        ax.plot(curve["cost"], curve["score"], marker="o", ms=4, lw=1.3, color=STYLE[family][1],
                label=_label(family, curve))
        ax.fill_between(curve["cost"], curve["mean_lo"], curve["mean_hi"], color=STYLE[family][1], alpha=0.15, lw=0)
    ax.axhline(full_mean, color="0.3", ls=":", lw=1.5, label=f"full model, {L:g} layers ({full_mean:.4f})")
    line = frontier.drop_duplicates("budget").sort_values("budget")
    ax.plot(line["budget"], line["lp_bound"], color="black", ls="--", lw=0.9, alpha=0.6, label="oracle, LP bound")
    ax.plot(line["budget"], line["value"], color="black", lw=2, label="oracle, one configuration per sequence")
    if summary.get("bootstrap"):
        ax.fill_between(line["budget"], line["value_lo"], line["value_hi"], color="black", alpha=0.15, lw=0,
                        label=f"{summary['bootstrap']['level']:.0%} bootstrap intervals (bands)")
    if controllers is not None:
        plot_controllers(ax, controllers, L)
    if gates is not None and len(gates):
        plot_gates(ax, gates)
    draw_null_and_ceiling(ax, null, summary)

    match = summary["min_budget_to_match"]
    if match is None:
        ax.text(0.99, 0.02, no_match_sentence(summary), transform=ax.transAxes, ha="right", va="bottom",
                fontsize=10, color="tab:red")
    else:
        value = float(frontier.loc[frontier["kind"] == "match_full", "value"].iloc[0])
        ax.plot(match, value, marker="*", ms=17, color="tab:red", mec="black", zorder=5,
                label="least budget matching the full model")
        if summary.get("min_budget_interval"):
            lo, hi = summary["min_budget_interval"]
            ax.errorbar(match, value, xerr=[[match - lo], [hi - match]], color="tab:red", capsize=4, lw=1.5, zorder=4)
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
    ax.set_xlabel(f"cost (nominal): layers per {per} (mean)")  # per: the run's token (generated or scored)
    ax.set_ylabel(f"mean {metric}")
    top = ax.secondary_xaxis("top", functions=(lambda x: x / L, lambda f: f * L))
    top.xaxis.set_major_formatter(PercentFormatter(1.0))
    top.set_xlabel(f"share of the model's {L:g} layers")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), frameon=False, fontsize=9)
    ax.set_title(f"{title}\n{metric} against cost: static configurations and the per-sequence oracle", fontsize=11)
    return fig


CONTROLLER_COLORS = {"ridge": "tab:purple", "boosting": "tab:brown", "classifier": "tab:pink"}


def plot_controllers(ax, curves: pd.DataFrame, num_layers: float) -> None:
    """The controllers on the cheapest stored feature layer at their true (mean score, mean cost), and the
    shuffled-feature null of the first of them, dotted."""
    layer = int(curves["layer"].min())
    where = f"after layer {layer}" if layer < num_layers else "final layer"
    on_layer = curves[curves["layer"] == layer]
    learners = list(dict.fromkeys(on_layer["learner"]))
    for learner in learners:
        curve = on_layer[(on_layer["learner"] == learner) & ~on_layer["null"]].sort_values("budget")
        ax.plot(curve["cost"], curve["value"], color=CONTROLLER_COLORS[learner], lw=1.4, marker=".", ms=3,
                label=f"controller: {learner}, prompt features {where}")
    null = on_layer[(on_layer["learner"] == learners[0]) & on_layer["null"]].sort_values("budget")
    ax.plot(null["cost"], null["value"], color=CONTROLLER_COLORS[learners[0]], lw=1.2, ls=":",
            label=f"controller: {learners[0]}, shuffled features (null)")


def plot_shares(per_config: pd.DataFrame, frontier: pd.DataFrame, summary: dict, title: str,
                checkpoints: dict[str, str] | None = None) -> Figure:
    """Which configurations the oracle gives its sequences at each grid budget, as stacked shares.

    Bands are ordered by family and cost; the configurations that matter (the largest mean shares) get
    their own colours and names in the legend, the rest are grey (`pipeline.report.paper.band_colors`).
    """
    grid = frontier[frontier["kind"] == "grid"].sort_values("budget")
    shares: dict[str, np.ndarray] = {}
    for i, row_shares in enumerate(grid["shares"]):
        for item in row_shares:
            shares.setdefault(item["config_id"], np.zeros(len(grid)))[i] = item["share"]
    meta = per_config.set_index("config_id")
    rank = {f: i for i, f in enumerate((*KNOWN_FAMILIES, FULL_ID))}
    order = sorted(shares, key=lambda c: (rank[meta.at[c, "family"]], meta.at[c, "cost"], c))
    colors, handles = band_colors(order, shares, meta["family"].to_dict(), checkpoints or {})

    fig = Figure(figsize=(10, 5.5), layout="constrained")
    ax = fig.add_subplot()
    ax.stackplot(grid["budget"], [shares[c] for c in order], colors=colors, edgecolor="white", linewidth=0.3)
    match = summary["min_budget_to_match"]
    if match is not None:
        ax.axvline(match, color="tab:red", ls="--", lw=1.5)
        handles.append(Line2D([], [], color="tab:red", ls="--", label=f"least budget matching full ({match:.2f})"))
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1), frameon=False, fontsize=9,
              title="largest shares, by family and cost", title_fontsize=9)
    ax.set_xlim(grid["budget"].min(), grid["budget"].max())
    ax.set_ylim(0, 1)
    ax.yaxis.set_major_formatter(PercentFormatter(1.0))
    ax.set_xlabel("budget: mean executed layers per sequence")
    ax.set_ylabel("share of sequences")
    ax.set_title(f"{title}\nthe oracle's choice of configuration at each budget ({summary['metric']})", fontsize=11)
    return fig


def plot_lengths(per_config: pd.DataFrame, summary: dict, title: str, max_new_tokens: int | None) -> Figure:
    """Output length and EOS rate per configuration: skipped models that never stop show up here."""
    L = summary["num_layers"]
    full = per_config[per_config["family"] == FULL_ID].iloc[0]
    fig = Figure(figsize=(11, 4.8), layout="constrained")
    axes = fig.subplots(1, 2, sharex=True)
    for ax, column in zip(axes, ("gen_tokens", "eos_rate")):
        plot_named_configs(ax, per_config, {}, column)
    for family, curve in family_curves(per_config).items():
        if family == CUSTOM:  # named points above, not a curve
            continue
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


def markdown(summary: dict, frontier: pd.DataFrame, per_config: pd.DataFrame, title: str, figures: list[str],
             extra: list[str] = ()) -> str:
    """report.md: headline numbers from the reducer's summary and frontier, `extra` sections, then the figures."""
    L, metric = summary["num_layers"], summary["metric"]
    match = summary["min_budget_to_match"]
    within = f" (within {summary['tolerance']:g})" if summary["tolerance"] else ""
    if match is None:
        matching = [f"| least budget matching the full model{within} | none: {no_match_sentence(summary)} |"]
    else:
        at_match = frontier.loc[frontier["kind"] == "match_full", "value"].iloc[0]
        matching = [f"| least budget matching the full model{within} | {match:.3f} layers "
                    f"({summary['min_budget_fraction']:.2%} of L) |",
                    f"| oracle mean {metric} at that budget | {at_match:.4f} |"]
    boot = summary.get("bootstrap")
    if boot:
        level = f"{boot['level']:.0%}"
        lo, hi = summary["full_mean_interval"]
        matching.append(f"| {level} interval of the full-model mean | {lo:.4f} to {hi:.4f} |")
        if summary.get("min_budget_interval"):
            lo, hi = summary["min_budget_interval"]
            matching.append(f"| {level} interval of the least matching budget | {lo:.3f} to {hi:.3f} layers |")
        note = (f"Intervals: paired bootstrap over sequences, {boot['resamples']} resamples (seed {boot['seed']}), "
                "percentile; each resample recomputes the full model and the oracle.")
    else:
        note = "No intervals: the reducer ran with `--bootstrap 0`."
    lines = [
        f"# dynoracle report: {title}",
        "",
        f"Oracle over {metric} with families {', '.join(summary['families'])}; cost = executed layers "
        f"({summary['cost_mode']}). Numbers from `oracle/{summary.get('result', metric)}/summary.json` and `frontier.parquet`. {note}",
        "",
        "## Headline",
        "",
        "| quantity | value |",
        "|---|---|",
        f"| sequences | {summary['num_sequences']} |",
        f"| configurations | {summary['num_configs']} |",
        f"| layers L | {L:g} |",
        f"| full-model mean {metric} | {summary['full_mean']:.4f} |",
        *matching,
        "",
        "## The oracle at fractions of L",
        "",
        f"| budget (layers) | of L | oracle mean {metric} | LP bound | best single configuration with cost <= budget "
        "| interval of the oracle mean |",
        "|---|---|---|---|---|---|",
    ]
    for fraction in HEADLINE_FRACTIONS:
        budget = fraction * L
        row = frontier[np.isclose(frontier["budget"], budget, rtol=0, atol=1e-9)]
        static = per_config[per_config["cost"] <= budget + 1e-9].sort_values("score", ascending=False)
        best = f"{static['config_id'].iloc[0]}: {static['score'].iloc[0]:.4f}" if len(static) else "none"
        if row.empty:  # grid budgets start at the cheapest configuration's cost
            lines.append(f"| {budget:.2f} | {fraction:.0%} | below the cheapest configuration | | {best} | |")
        else:
            lo, hi = row["value_lo"].iloc[0], row["value_hi"].iloc[0]
            interval = f"{lo:.4f} to {hi:.4f}" if boot else ""
            lines.append(f"| {budget:.2f} | {fraction:.0%} | {row['value'].iloc[0]:.4f} | "
                         f"{row['lp_bound'].iloc[0]:.4f} | {best} | {interval} |")
    captions = {
        "cost_quality.png": f"Mean {metric} against cost: static families, the full model, the oracle frontier "
                            "(bands: bootstrap intervals).",
        "oracle_shares.png": "The oracle's share of each configuration at each budget.",
        "lengths.png": "Mean output length and EOS rate per configuration.",
        "similarity_cost.png": "Final hidden state's similarity to the full model against cost, per family.",
        "similarity_layers.png": "Similarity to the full model after each layer, at a few budgets.",
        "token_oracle.png": "Per-token oracle (optimistic: full-model states for earlier tokens) against the "
                            "per-sequence oracle's least matching budget, and over output positions.",
    }
    lines += ["", *extra, "## Figures", ""]
    for name in figures:
        lines += [captions[name.rsplit(".", 1)[0] + ".png"], "", f"![{name}]({name})", ""]
    return "\n".join(lines)


def no_match_sentence(summary: dict) -> str:
    """What the report says when no budget matches the full model."""
    return (f"no budget up to {summary['num_layers']:g} layers brings the oracle to the full model's mean "
            f"{summary['metric']} ({summary['full_mean']:.4f})")


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
