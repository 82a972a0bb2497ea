"""SQL over a run folder: DuckDB views named after the Parquet contract's tables.

The views are thin `read_parquet` wrappers, so a query reads only the columns and row groups it needs
and nothing is loaded up front. A view whose files are absent is left out, and a query that names it
is told which file is missing and how to make it, instead of DuckDB's bare "table does not exist".
A run in an object store is read through pyarrow's filesystem registered with DuckDB (read-only), and
DuckDB never installs or loads extensions at run time.
"""

from __future__ import annotations

import csv
import io
import json
import math
import numbers
import re
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

import duckdb
import pandas as pd

from pipeline.location import RunPath, StorePath, locate, read_only_fsspec
from pipeline.reduce import METRICS

FORMATS = ("table", "csv", "json")
CELL_WIDTH = 60  # table cells (outputs, references) are cut to this many characters


class QueryError(ValueError):
    """A query DuckDB refused, as one line."""


@dataclass
class RunDatabase:
    """An in-memory DuckDB with one view per table of a run; `missing` says why absent views are absent."""

    connection: duckdb.DuckDBPyConnection
    missing: dict[str, str]

    def fetch(self, sql: str) -> tuple[list[str], list[tuple]]:
        """Column names and rows of a query (none when the statement returns nothing)."""
        with self._one_line_errors():
            cursor = self.connection.execute(sql)
            if cursor.description is None:
                return [], []
            return [d[0] for d in cursor.description], cursor.fetchall()

    def frame(self, sql: str) -> pd.DataFrame:
        with self._one_line_errors():
            return self.connection.execute(sql).df()

    @contextmanager
    def _one_line_errors(self) -> Iterator[None]:
        """DuckDB's errors (some surface only while rows are fetched) as a one-line QueryError."""
        try:
            yield
        except duckdb.Error as exc:
            raise QueryError(self._explain(exc)) from None

    def _explain(self, exc: duckdb.Error) -> str:
        message = str(exc)
        unknown = re.search(r"Table with name (\w+) does not exist", message)
        if unknown and unknown.group(1).lower() in self.missing:
            name = unknown.group(1).lower()
            return f"view {name} is not available: {self.missing[name]}"
        # DuckDB adds a "LINE 1: ..." excerpt and a caret line that only make sense aligned; drop them.
        lines = [line.strip() for line in message.splitlines()]
        return " ".join(line for line in lines if line and not line.startswith("LINE ") and set(line) != {"^"})


def open_run(run_dir: str | RunPath, metric: str = "rougeL") -> RunDatabase:
    """Views generations, configs, and frontier/allocations of `metric`'s oracle, for whichever files exist."""
    if metric not in METRICS:
        raise ValueError(f"unknown metric '{metric}'; choose from {', '.join(METRICS)}")
    run_dir = locate(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run folder {run_dir} does not exist")
    oracle = run_dir / "oracle" / metric
    reduce_hint = f"run `dynoracle reduce {run_dir} --metric {metric}` first"
    sources = {
        "generations": (sorted((run_dir / "generations").glob("*.parquet")), f"no shard files in {run_dir / 'generations'}"),
        "configs": ([run_dir / "configs.parquet"], f"{run_dir / 'configs.parquet'} is missing"),
        "frontier": ([oracle / "frontier.parquet"], f"{oracle / 'frontier.parquet'} is missing; {reduce_hint}"),
        "allocations": ([oracle / "allocations.parquet"], f"{oracle / 'allocations.parquet'} is missing; {reduce_hint}"),
    }
    connection = duckdb.connect(config={"autoinstall_known_extensions": False, "autoload_known_extensions": False})
    if isinstance(run_dir, StorePath):
        connection.register_filesystem(read_only_fsspec(run_dir))
    missing = {}
    for name, (paths, why) in sources.items():
        paths = [p for p in paths if p.is_file()]
        if not paths:
            missing[name] = why
            continue
        # Explicit file lists (no glob, so odd characters in the folder name are harmless) and no hive
        # partitioning: `shard` is the column stored in each file, not one parsed from a path.
        listed = ", ".join("'" + str(p).replace("'", "''") + "'" for p in paths)
        connection.execute(f"create view {name} as select * from read_parquet([{listed}], hive_partitioning = false)")
    if {"generations", "configs"} <= missing.keys():
        connection.close()
        raise FileNotFoundError(f"{run_dir} is not a run folder: no configs.parquet and no generations")
    return RunDatabase(connection, missing)


def query_run(run_dir: str | RunPath, sql: str, metric: str = "rougeL") -> tuple[list[str], list[tuple]]:
    """Column names and rows of one query over a run, on a connection of its own."""
    db = open_run(run_dir, metric)
    try:
        return db.fetch(sql)
    finally:
        db.connection.close()


def render(columns: list[str], rows: list[tuple], fmt: str = "table") -> str:
    """Rows as an aligned text table, CSV with a header, or a JSON list of objects."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format '{fmt}'; choose from {', '.join(FORMATS)}")
    if fmt == "json":
        return json.dumps([{c: _plain(v) for c, v in zip(columns, row)} for row in rows], indent=1, default=str)
    if fmt == "csv":
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(columns)
        writer.writerows([_csv_cell(v) for v in row] for row in rows)
        return buffer.getvalue().rstrip("\n")
    return _table(columns, rows)


def _table(columns: list[str], rows: list[tuple]) -> str:
    cells = [[_table_cell(v) for v in row] for row in rows]
    widths = [max([len(c), *(len(r[i]) for r in cells)]) for i, c in enumerate(columns)]
    numeric = [bool(rows) and all(_is_number(row[i]) or row[i] is None for row in rows) for i in range(len(columns))]

    def line(values: list[str]) -> str:
        padded = (v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric))
        return "  ".join(padded).rstrip()

    body = [line(list(columns)), "  ".join("-" * w for w in widths), *(line(r) for r in cells)]
    return "\n".join(body + [f"({len(rows)} row{'' if len(rows) == 1 else 's'})"])


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Number) and not isinstance(value, bool)


def _table_cell(value: Any) -> str:
    if value is None:
        return "NULL"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:.6g}"
    text = json.dumps(_plain(value), default=str) if isinstance(value, (list, dict)) else str(value)
    text = text.replace("\r", "\\r").replace("\n", "\\n").replace("\t", "\\t")
    return text if len(text) <= CELL_WIDTH else text[: CELL_WIDTH - 1] + "…"


def _csv_cell(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, (list, dict)):
        return json.dumps(_plain(value), default=str)
    return value


def _plain(value: Any) -> Any:
    """JSON-friendly: decimals as floats, NaN and infinities as null, nested lists and structs kept."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if _is_number(value) and not isinstance(value, int):
        value = float(value)
        return value if math.isfinite(value) else None
    return value
