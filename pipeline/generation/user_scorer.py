"""A user's own scorer: `module:function`, called as `function(output, reference, row)` for every generated
output on the workers; it returns a float (one column named after the function) or a dict of floats (one
column per key). `output` is the generated text (cut at the stop strings), `reference` the row's reference
text (a JSON list when it has several), `row` the dataset row as read (a dict of its columns).

The driver imports the scorer and calls it once before the run starts, on the first row with its
reference as the output, to learn its columns and to fail before anything is generated. A scorer that
raises, or returns other keys or a non-number, stops the run in one line naming the row (ScorerError, not
retried: the same row would fail again).
"""

from __future__ import annotations

import importlib
import json
import math
import re
from collections.abc import Callable, Sequence
from typing import Any

from pipeline.run.shard_task import ShardError

_COLUMN = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class ScorerError(ShardError):
    """The user's scorer failed on a row: the message names the scorer, the row and the configuration."""


def load_scorer(spec: str) -> Callable[[str, str, dict], Any]:
    """The function `spec` = `module:function` names; ValueError in one line when it cannot be imported."""
    module_name, _, name = spec.partition(":")
    if not module_name or not name:
        raise ValueError(f"scorer {spec!r} must be module:function (e.g. my_scores:answer_f1)")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # any failure of the user's module is its own one-line error
        raise ValueError(f"scorer {spec}: cannot import {module_name} ({type(exc).__name__}: {exc}); "
                         "is it on PYTHONPATH?") from None
    function = getattr(module, name, None)
    if not callable(function):
        raise ValueError(f"scorer {spec}: {module_name} has no function {name}")
    return function


def call_scorer(function: Callable[[str, str, dict], Any], spec: str, output: str, reference: str, row: dict,
                where: str) -> dict[str, float]:
    """The scorer's columns for one output; ScorerError naming `where` (row and configuration) on any failure."""
    try:
        value = function(output, reference, row)
    except Exception as exc:
        message = str(exc).strip().splitlines()
        raise ScorerError(f"scorer {spec} raised on {where}: {type(exc).__name__}"
                          f"{': ' + message[0] if message else ''}") from None
    values = value if isinstance(value, dict) else {spec.partition(":")[2]: value}
    for key, number in values.items():
        if isinstance(number, bool) or not isinstance(number, (int, float)) or not math.isfinite(float(number)):
            raise ScorerError(f"scorer {spec} returned {number!r} for {key!r} on {where}; it must return a finite "
                              "float or a dict of them")
    return {str(key): float(number) for key, number in values.items()}


def scorer_columns(spec: str, reference: str, row_json: str, seq_id: str, taken: Sequence[str]) -> tuple[str, ...]:
    """The scorer's columns, from one call on the driver (output = the reference); ValueError in one line when
    it fails or a column is not a plain name or is already a column (`taken`)."""
    try:
        values = call_scorer(load_scorer(spec), spec, reference, reference, json.loads(row_json or "{}"),
                             f"row {seq_id} (its reference as the output)")
    except ScorerError as exc:
        raise ValueError(str(exc)) from None
    for key in values:
        if not _COLUMN.fullmatch(key) or key in taken:
            raise ValueError(f"scorer {spec}: column {key!r} must be a plain name ([A-Za-z_][A-Za-z0-9_]*) and not "
                             f"one of {', '.join(taken)}")
    return tuple(values)
