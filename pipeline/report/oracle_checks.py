"""`report`'s view of how much of the oracle is real: its null and the full model's best-of-K beside it on the
cost-quality figure, a headline section with both and the degenerate picks, and a few of the oracle's picks at
the matching budget beside the full model's output for the same sequence (what "matches" means).

Numbers come from the reducer's files (`summary.json`: `oracle_null`, `noise_ceiling`, `degenerate`,
`total_cost`; `null.parquet`); outputs from the run's verified generations through `pipeline.report.query`.
"""

from __future__ import annotations

import pandas as pd

from pipeline.report.query import open_run
from pipeline.run.location import RunPath, read_parquet

PICKS_SHOWN = 4
PICK_CHARS = 200

OUTPUTS = 'select seq_id, config_id, cost, "{metric}" as score, output from generations where config_id in ({ids})'


def read_null(out_dir: RunPath) -> pd.DataFrame | None:
    """null.parquet of an oracle folder (budget, value, value_lo, value_hi), or None when the null was off."""
    path = out_dir / "null.parquet"
    return read_parquet(path).to_pandas().sort_values("budget") if path.is_file() else None


def draw_null_and_ceiling(ax, null: pd.DataFrame | None, summary: dict) -> None:
    """The null's oracle (median and percentile band) and the full model's best-of-K mean on a cost axis."""
    if null is not None:
        info = summary.get("oracle_null") or {}
        kind = str(info.get("kind", "residual permutation")).split(" (")[0]
        ax.plot(null["budget"], null["value"], color="tab:red", lw=1.3, ls="-.",
                label=f"oracle on the null ({kind}, {info.get('draws')} draws; band: 95% of draws)")
        ax.fill_between(null["budget"], null["value_lo"], null["value_hi"], color="tab:red", alpha=0.12, lw=0)
    ceiling = summary.get("noise_ceiling")
    if ceiling is not None:
        lo, hi = ceiling["best_of_k_mean_interval"] or (None, None)
        ax.axhline(ceiling["best_of_k_mean"], color="tab:cyan", ls="--", lw=1.5,
                   label=f"full model, best of {ceiling['samples']} samples ({ceiling['best_of_k_mean']:.4f})")
        if lo is not None:
            ax.axhspan(lo, hi, color="tab:cyan", alpha=0.1, lw=0)


def _span(pair, digits: str = ".3f") -> str:
    if not pair or any(v is None for v in pair):
        return "interval open" if pair else "no interval"
    return f"{format(pair[0], digits)} to {format(pair[1], digits)}"


def checks_section(summary: dict) -> list[str]:
    """report.md lines: the oracle's match beside its null's and beside the best-of-K bar, degenerate picks, total
    cost, and the small-sample warning."""
    L, match = summary["num_layers"], summary["min_budget_to_match"]
    lines = ["## How much of the oracle is real", "", "| quantity | value | 95% interval |", "|---|---|---|"]
    shown = "none" if match is None else f"{match:.3f} layers"
    lines.append(f"| least budget matching the full model (oracle) | {shown} | "
                 f"{_span(summary.get('min_budget_interval'))} |")
    null = summary.get("oracle_null")
    if null is not None:
        value = "never" if null["min_budget_to_match"] is None else f"{null['min_budget_to_match']:.3f} layers"
        lines.append(f"| the same on the null (median of {null['draws']} draws) | {value} | "
                     f"{_span(null['min_budget_interval'])} (of draws) |")
    ceiling = summary.get("noise_ceiling")
    if ceiling is not None:
        k = ceiling["samples"]
        bar = ceiling["min_budget_to_match_best_of_k"]
        bar_text = "none" if bar is None else f"{bar:.3f} layers"
        rows = [
            ("full model, mean of one sample", f"{ceiling['sample_mean']:.4f}", "sample_mean_interval"),
            (f"full model, best of {k} samples", f"{ceiling['best_of_k_mean']:.4f}", "best_of_k_mean_interval"),
            (f"selection gain of the full model alone (best of {k} - greedy)", f"{ceiling['best_of_k_gain']:+.4f}",
             "best_of_k_gain_interval"),
            (f"the oracle's gain at the full budget (oracle at {L:g} - full)",
             f"{ceiling['oracle_gain_at_full_budget']:+.4f}", "oracle_gain_at_full_budget_interval"),
        ]
        lines += [f"| {name} | {value} | {_span(ceiling[key], '.4f')} |" for name, value, key in rows]
        lines.append(f"| least budget matching the full model's best of {k} | {bar_text} | "
                     f"{_span(ceiling['min_budget_to_match_best_of_k_interval'])} |")
    degenerate = summary.get("degenerate") or {}
    if degenerate:
        picks = degenerate["picks_at_match"]
        lines.append(f"| degenerate rows (`--degenerate {degenerate['mode']}`) | {degenerate['rows']} of "
                     f"{degenerate['of_rows']} ({degenerate['full_rows']} of the full model's) | |")
        if picks is not None:
            lines.append(f"| degenerate picks of the oracle at the matching budget | {picks} of "
                         f"{degenerate['of_sequences']} | |")
    total = summary.get("total_cost") or {}
    if total.get("oracle_at_match") is not None:
        lines.append(f"| total cost at the matching budget, prompt pass included | {total['oracle_at_match']:.0f} "
                     f"layer-tokens per sequence, {total['fraction']:.1%} of the full model's "
                     f"{total['full_mean']:.0f} | |")
    lines += ["", "The figure's cost axis is nominal: executed layers per generated token after the first (under the "
              "`full` prefill the prompt and the first token run through all layers for every configuration; the "
              "total-cost row counts them). The null keeps each sequence's difficulty and each configuration's "
              "mean and shuffles their interaction; the best of K samples is what selection buys with no skipping."]
    if summary.get("warning"):
        lines += ["", f"**Warning:** {summary['warning']}."]
    return lines + [""]


def picks_section(run_dir: RunPath, out_dir: RunPath, metric: str, summary: dict, partial: bool = False) -> list[str]:
    """report.md lines: up to PICKS_SHOWN of the oracle's cheapest non-full picks at the matching budget (from
    `out_dir`'s allocations), each beside the full model's output for the same sequence (generation runs only:
    a multiple-choice run has no outputs)."""
    match = summary["min_budget_to_match"]
    if match is None:
        return []
    alloc = read_parquet(out_dir / "allocations.parquet").to_pandas()
    alloc = alloc[((alloc["budget"] - match).abs() < 1e-9) & (alloc["config_id"] != "full")]
    if alloc.empty:
        return []
    ids = ", ".join(f"'{c}'" for c in sorted({*alloc["config_id"], "full"}) if "'" not in c)
    db = open_run(run_dir, metric, partial)
    if db.table != "generations":
        db.connection.close()
        return []
    try:
        rows = db.frame(OUTPUTS.format(metric=metric, ids=ids))
    finally:
        db.connection.close()
    full = rows[rows["config_id"] == "full"].set_index("seq_id")
    picks = alloc.merge(rows, on=["seq_id", "config_id"]).sort_values(["cost", "seq_id"])
    lines = [f"## What matching means: the oracle's picks at {match:.3f} layers", "",
             f"The {min(PICKS_SHOWN, len(picks))} cheapest of the {len(picks)} sequences the oracle does not leave on "
             f"the full model, beside the full model's output ({metric} in brackets; outputs cut to {PICK_CHARS} "
             "characters).", "", "| sequence | pick | pick's output | full model's output |", "|---|---|---|---|"]
    for row in picks.head(PICKS_SHOWN).itertuples():
        lines.append(f"| {row.seq_id} | {row.config_id} ({row.cost} layers) | {_cell(row.output)} [{row.score:.3f}] | "
                     f"{_cell(full.at[row.seq_id, 'output'])} [{full.at[row.seq_id, 'score']:.3f}] |")
    return lines + [""]


def _cell(text: str) -> str:
    text = " ".join(str(text).split()).replace("`", "'").replace("|", "\\|")
    text = text if len(text) <= PICK_CHARS else text[: PICK_CHARS - 1] + "…"
    return f"`{text}`" if text else "*(empty)*"
