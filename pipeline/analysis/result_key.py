"""Where an analysis result lives: a folder named by what it was computed over, so no option replaces another's.

`oracle/<name>/` (reduce) and `controller/<name>/` (controller) are named by the metric, then `+option=value`
for every option that differs from its default, sorted by option name: `reduce --families uls --cost measured`
writes `oracle/rougeL+cost=measured+families=uls/` and leaves the all-family `oracle/rougeL/` as it was. With
every option at its default the name is the metric alone, the folder earlier versions wrote. A new option
slots in by adding its default to ORACLE_OPTIONS or CONTROLLER_OPTIONS (a value equal to the default, or
None, adds nothing, so existing folders keep their names).
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

from pipeline.analysis.degenerate import DEFAULT_MODE, MODES
from pipeline.generation.configs import FULL_ID, SAMPLE
from pipeline.run.location import RunPath

COST_MODES = ("nominal", "measured", "total")  # reduce --cost (pipeline.analysis.reduce)
# option -> default; None stands for "every one the run has" (families, learners, feature layers)
ORACLE_OPTIONS: dict[str, Any] = {"families": None, "cost": "nominal", "degenerate": DEFAULT_MODE}
CONTROLLER_OPTIONS: dict[str, Any] = {"families": None, "learners": None, "layers": None}
_RESERVED = set("/\\+=\0")


def result_name(metric: str, options: Mapping[str, Any], defaults: Mapping[str, Any]) -> str:
    """`metric` plus `+name=value` for each option unlike its default (lists: sorted, comma-joined).

    Raises ValueError for an option without a default (a caller's mistake) or a value that cannot be part of
    a folder name ('/', '\\', '+', '=')."""
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        raise ValueError(f"no default for result option {', '.join(unknown)}")
    parts = [metric]
    for name in sorted(options):
        value = options[name]
        if value is None or value == defaults[name]:
            continue
        text = ",".join(sorted(map(str, value))) or "none" if isinstance(value, (list, tuple, set, frozenset)) \
            else f"{value}"
        if _RESERVED & set(text) or not text:
            raise ValueError(f"{name} {text!r} cannot name a result folder (no '/', '\\', '+' or '=')")
        parts.append(f"{name}={text}")
    return "+".join(parts)


def chosen_or_all(chosen: Iterable[Any] | None, every: Iterable[Any]) -> list[Any] | None:
    """`chosen` as a sorted list, or None when it is absent or names exactly `every` (the default's folder)."""
    if chosen is None:
        return None
    chosen, every = sorted(set(chosen)), sorted(set(every))
    return None if chosen == every else chosen


def choice_families(present: Iterable[str]) -> list[str]:
    """The families of `present` an oracle chooses among by default: all but `full` (always in) and `sample`
    (the full model's samples, the noise ceiling, never a choice)."""
    return [f for f in present if f not in (FULL_ID, SAMPLE)]


def check_oracle_options(cost: str, degenerate: str) -> None:
    """Raises ValueError (one line) for a `--cost` or `--degenerate` that `reduce` does not know."""
    if cost not in COST_MODES:
        raise ValueError(f"unknown cost mode '{cost}'; choose from {', '.join(COST_MODES)}")
    if degenerate not in MODES:
        raise ValueError(f"unknown degenerate mode '{degenerate}'; choose from {', '.join(MODES)}")


def oracle_name(metric: str, families: Iterable[str] | None, present: Iterable[str], cost: str = "nominal",
                degenerate: str = DEFAULT_MODE) -> str:
    """The folder under oracle/ of a reduction over `families` (None: all of the run's `present` ones; `full`
    is always in and not named), with `cost` and `degenerate` as `reduce` took them. Raises ValueError (one
    line) for a cost or degenerate mode `reduce` does not know, so no reader points at a folder none can write."""
    check_oracle_options(cost, degenerate)
    wanted = None if families is None else [f for f in families if f != FULL_ID]
    return result_name(metric, {"families": chosen_or_all(wanted, choice_families(present)),
                                "cost": cost, "degenerate": degenerate}, ORACLE_OPTIONS)


def preferred_result(folder: RunPath, metric: str, file: str) -> RunPath | None:
    """`folder/<metric>/<file>` (default options) when present, else the most recently written
    `folder/<metric>+.../<file>`, else None: what `report` draws and `query` shows of a result kind
    (`folder`: a local or store path, e.g. RUN/controller)."""
    default = folder / metric / file
    if default.is_file():
        return default
    named = [p / file for p in folder.glob(f"{metric}+*")] if folder.is_dir() else []
    return max((p for p in named if p.is_file()), key=lambda p: p.stat().st_mtime_ns, default=None)
