"""SQL over a run folder: DuckDB views named after the Parquet contract's tables, read only.

The views are Arrow datasets over the run's own files, verified first (`pipeline.run.verify`: exactly the
run's shard files, page checksums checked), so a query reads only the columns and row groups it needs.
DuckDB itself gets no file system at all: external access is off (no file reads or writes, no ATTACH,
no extension install or load), extension autoloading is off, the configuration is locked, and only
SELECT and EXPLAIN statements run. A view whose files are absent is left out, and a query that names it
is told which file is missing and how to make it, instead of DuckDB's bare "table does not exist".
A run in an object store is read the same way: the Arrow datasets read through pyarrow's filesystem, so
DuckDB needs no extension for it.
"""

from __future__ import annotations

import csv
import io
import json
import math
import numbers
import re
import threading
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import Any, Callable, Iterator, TypeVar

import duckdb
import pandas as pd
import pyarrow as pa

from pipeline.analysis import gate_curves, token_oracle
from pipeline.analysis.degenerate import DEFAULT_MODE
from pipeline.analysis.features import FEATURES_FOLDER
from pipeline.analysis.metrics import check_metric
from pipeline.analysis.result_key import oracle_name, preferred_result
from pipeline.analysis.similarity import RESPONSES, summary_path
from pipeline.run.location import RunPath, parquet_dataset, read_parquet
from pipeline.run.rundir import ShardProblem, job_identity, read_shard
from pipeline.run.verify import RunFolderError, VerifiedRun, verify_run

FORMATS = ("table", "csv", "json")
CELL_WIDTH = 60  # table cells (outputs, references) are cut to this many characters
READ_STATEMENTS = (duckdb.StatementType.SELECT, duckdb.StatementType.EXPLAIN)
# Bounds of one query: DuckDB's working memory, the wall time (then it is interrupted), the rows it returns.
MEMORY_LIMIT = "2GB"
TIMEOUT_S = 300.0
MAX_ROWS = 1_000_000
# Shard tasks' row tables a run may hold: (view name, folder, schema, the command that writes them)
TASK_TABLES = (("gates", gate_curves.FOLDER, gate_curves.SHARD_SCHEMA, "dynoracle gates {run} --lambda <cost weight>"),
               ("token_oracle", token_oracle.FOLDER, token_oracle.SHARD_SCHEMA, "dynoracle token-oracle {run}"))
# DuckDB settings of a query connection: bounded memory, no file system, no extensions, nothing changeable afterwards.
LOCKED_DOWN = (("memory_limit", f"'{MEMORY_LIMIT}'"), ("enable_external_access", "false"), ("lock_configuration", "true"))


T = TypeVar("T")


class QueryError(ValueError):
    """A query DuckDB refused, as one line."""


@dataclass
class RunDatabase:
    """An in-memory DuckDB with one view per table of a run; `missing` says why absent views are absent."""

    connection: duckdb.DuckDBPyConnection
    missing: dict[str, str]
    table: str = "generations"  # the scored rows' view: generations, or choices for a multiple-choice run
    metric: str = "rougeL"  # the metric whose oracle files are viewed

    def fetch(self, sql: str, timeout_s: float = TIMEOUT_S) -> tuple[list[str], list[tuple]]:
        """Column names and rows of a query (none when the statement returns nothing).

        Raises QueryError for an empty query, a statement that is not SELECT or EXPLAIN, more than MAX_ROWS
        rows, or a query still running after `timeout_s` seconds (it is interrupted); KeyboardInterrupt on
        Ctrl-C, after interrupting the query (DuckDB alone would not stop on it).
        """
        with self._one_line_errors():
            statements = duckdb.extract_statements(sql)
            if not statements:
                raise QueryError("the query holds no SQL statement (only blanks, ';' or comments); give a SELECT")
            refused = [str(st.type).rsplit(".", 1)[-1] for st in statements if st.type not in READ_STATEMENTS]
            if refused:
                raise QueryError(f"query only reads the run: {', '.join(refused)} statements are not allowed; "
                                 "use SELECT (or EXPLAIN)")
            return self._interruptible(lambda: self._rows(sql), timeout_s)

    def _rows(self, sql: str) -> tuple[list[str], list[tuple]]:
        cursor = self.connection.execute(sql)
        if cursor.description is None:
            return [], []
        rows: list[tuple] = []
        while chunk := cursor.fetchmany(10_000):  # streamed, so a huge result stops at the cap, not at memory's end
            rows += chunk
            if len(rows) > MAX_ROWS:
                raise QueryError(f"the query returns more than {MAX_ROWS:,} rows; add a LIMIT or aggregate")
        return [d[0] for d in cursor.description], rows

    def _interruptible(self, work: Callable[[], T], timeout_s: float) -> T:
        """`work()` on a helper thread while this one waits (a wait Ctrl-C can break, unlike DuckDB's own)."""
        box: dict[str, Any] = {}

        def target() -> None:
            try:
                box["result"] = work()
            except BaseException as exc:  # handed to the waiting thread
                box["error"] = exc

        thread = threading.Thread(target=target, daemon=True)
        thread.start()
        try:
            thread.join(timeout_s)
        except KeyboardInterrupt:
            self.connection.interrupt()
            thread.join()
            raise
        if thread.is_alive():
            self.connection.interrupt()
            thread.join()
            raise QueryError(f"the query ran past its {timeout_s:g} s limit and was stopped; narrow it "
                             "(a LIMIT, a WHERE) or give it more time (--timeout)")
        if "error" in box:
            raise box["error"]
        return box["result"]

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


def open_run(run_dir: str | RunPath, metric: str | None = None, partial: bool = False,
             families: list[str] | tuple[str, ...] | None = None, cost: str = "nominal",
             degenerate: str = DEFAULT_MODE) -> RunDatabase:
    """Views the scored rows (`generations`, or `choices` for a multiple-choice run) and configs, and, for
    whichever files exist: frontier, allocations and config_means of the oracle of `metric` (None: the run's
    default metric) over `families` and `cost` (`reduce`'s folder for those options), controller_curves and
    controller_matches (`controller`'s default folder, else its newest), similarity (`similarity`'s summary,
    reference response before full) and features (`features`).

    The run is verified first (`verify_run`; `partial` allows missing shard files), and every other file is
    read once with page checksums. Raises FileNotFoundError, RunFolderError or ValueError, one line each.
    """
    run = verify_run(run_dir, partial)
    metric = check_metric(run.record, metric, run.root)
    present = read_parquet(run.root / "configs.parquet", columns=["family"]).column("family").unique().to_pylist()
    oracle = run.root / "oracle" / oracle_name(metric, families, present, cost, degenerate)
    options = "".join([f" --families {','.join(families)}" if families is not None else "",
                       f" --cost {cost}" if cost != "nominal" else "",
                       f" --degenerate {degenerate}" if degenerate != DEFAULT_MODE else ""])
    hints = {"oracle": f"run `dynoracle reduce {run.root} --metric {metric}{options}` first",
             "controller": f"run `dynoracle controller {run.root} --metric {metric}` first",
             "similarity": f"run `dynoracle similarity {run.root}` first",
             "features": f"run `dynoracle features {run.root}` first"}
    shown = preferred_result(run.root / "controller", metric, "curves.parquet")  # as `report` draws it
    controller = run.root / "controller" / metric if shown is None else shown.parent
    similarity = next((p for p in (summary_path(run.root, r) for r in RESPONSES) if p.is_file()),
                      summary_path(run.root, RESPONSES[0]))
    optional = {"frontier": ("oracle", [oracle / "frontier.parquet"]),
                "allocations": ("oracle", [oracle / "allocations.parquet"]),
                "config_means": ("oracle", [oracle / "config_means.parquet"]),
                "controller_curves": ("controller", [controller / "curves.parquet"]),
                "controller_matches": ("controller", [controller / "matches.parquet"]),
                "similarity": ("similarity", [similarity]),
                "features": ("features", sorted((run.root / FEATURES_FOLDER).glob("shard=*.parquet")) or
                             [run.root / FEATURES_FOLDER / "shard=00000.parquet"])}
    sources = {run.table: run.shards, "configs": [run.root / "configs.parquet"]}
    missing = {}
    for name, (kind, paths) in optional.items():
        absent = next((path for path in paths if not path.is_file()), None)
        if absent is not None:
            missing[name] = f"{absent} is missing; {hints[kind]}"
            continue
        for path in paths:
            try:
                read_parquet(path)
            except (OSError, pa.ArrowException) as exc:
                raise RunFolderError(f"{path} is damaged ({str(exc).splitlines()[0][:120]}); "
                                     f"{hints[kind].replace('first', 'again')}") from None
        sources[name] = paths
    for name, folder, schema, command in TASK_TABLES:
        paths, problem = _task_shards(run, folder, schema, command.format(run=run.root))
        if problem:
            missing[name] = problem
        elif paths:
            sources[name] = paths
    connection = duckdb.connect(config={"autoload_known_extensions": False, "autoinstall_known_extensions": False})
    for name, paths in sources.items():
        # Explicit file lists, no partitioning: `shard` is the column stored in each file, not a path's.
        connection.register(name, parquet_dataset(paths))
    for setting, value in LOCKED_DOWN:
        connection.execute(f"set {setting} = {value}")
    return RunDatabase(connection, missing, run.table, metric)


def _task_shards(run: VerifiedRun, folder: str, schema: pa.Schema, command: str) -> tuple[list[RunPath], str | None]:
    """A shard task's files (one per shard of the run, each verified against the run's job), or why not."""
    root = run.root / folder
    if not root.is_dir():
        return [], f"{root} is missing; run `{command}` first"
    paths = [root / f"shard={i:05d}.parquet" for i in range(int(run.record["shards"]))]
    absent = [p for p in paths if not p.is_file()]
    if absent:
        return [], f"{absent[0]} is missing: finish `{command}`"
    for i, path in enumerate(paths):
        try:
            read_shard(path, i, job_identity(run.record), schema)
        except ShardProblem as problem:
            raise RunFolderError(f"shard file {path}: {problem.reason}; rerun `{command}`") from None
    return paths, None


def query_run(run_dir: str | RunPath, sql: str, metric: str | None = None, partial: bool = False,
              families: list[str] | tuple[str, ...] | None = None,
              cost: str = "nominal", timeout_s: float = TIMEOUT_S,
              degenerate: str = DEFAULT_MODE) -> tuple[list[str], list[tuple]]:
    """Column names and rows of one read-only query over a run, on a connection of its own (`RunDatabase.fetch`)."""
    db = open_run(run_dir, metric, partial, families, cost, degenerate)
    try:
        return db.fetch(sql, timeout_s)
    finally:
        with suppress(duckdb.Error):  # after a Ctrl-C DuckDB may still call the connection busy
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
