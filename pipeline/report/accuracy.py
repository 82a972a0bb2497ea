"""report.md's section for accuracy tasks: CoLa's two shares beside their permutation null (from the reducer's
summary.json, `cola_shares`; computed by `pipeline.analysis.shares`)."""

from __future__ import annotations


def _share(values: dict, name: str) -> str:
    return f"{values[name]:.3f} ({values[f'{name}_lo']:.3f}-{values[f'{name}_hi']:.3f})"


def cola_section(summary: dict) -> list[str]:
    """Markdown lines for CoLa's shares (none when the metric is not 0/1)."""
    cola = summary.get("cola_shares")
    if not cola:
        return []
    real, null = cola["real"], cola["null"]
    return [
        "",
        f"## CoLa's shares ({summary['metric']}), against a null without per-question skill",
        "",
        "| share | real (95% bootstrap interval) | permutation null (mean, 95% of 200 permutations) |",
        "|---|---|---|",
        f"| of the {real['wrong']} questions the full model gets wrong, some configuration gets right "
        f"| {_share(real, 'fixed')} | {_share(null, 'fixed')} |",
        f"| of the {real['right']} questions the full model gets right, a configuration of at most "
        f"{cola['max_cost']:g} layers gets right | {_share(real, 'shorter')} | {_share(null, 'shorter')} |",
        "",
        "The null permutes each configuration's answers across questions (same accuracy per configuration, the "
        "full model's answers in place): what the shares would be from luck alone.",
    ]
