"""`dynoracle query`: DuckDB views over a hand-made run folder, output formats, one-line errors."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest
from handmade_run import CONFIGS, GENERATION_COLUMNS, make_run
from typer.testing import CliRunner

from pipeline.analysis.reduce import reduce_run
from pipeline.cli import app

N = 10


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run with its rougeL oracle, in a folder whose path holds `key=value` parts (hive-like)."""
    root = make_run(tmp_path_factory.mktemp("q") / "lr=0.1" / "run", num_sequences=N)
    reduce_run(root, "rougeL", match_full=True)
    return root


def query(*args: object):
    return CliRunner().invoke(app, ["query", *map(str, args)])


def as_json(*args: object) -> list[dict]:
    result = query(*args, "--format", "json")
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def test_count_by_config_is_every_sequence(run: Path) -> None:
    rows = as_json(run, "select config_id, count(*) as n, count(distinct seq_id) as seqs from generations group by 1")
    assert {r["config_id"] for r in rows} == {c.config_id for c in CONFIGS}
    assert all(r["n"] == N and r["seqs"] == N for r in rows)


def test_views_keep_the_contract_columns_and_each_files_own_shard(run: Path) -> None:
    described = as_json(run, "describe generations")
    assert [r["column_name"] for r in described] == [name for name, _ in GENERATION_COLUMNS]  # no hive columns
    shards = as_json(run, "select shard, count(distinct seq_id) as seqs from generations group by 1 order by 1")
    assert shards == [{"shard": 0, "seqs": N // 2}, {"shard": 1, "seqs": N // 2}]
    joined = as_json(run, "select count(*) as n from generations g join configs c using (config_id) "
                          "where g.cost = len(c.layers) and g.family = c.family")
    assert joined == [{"n": N * len(CONFIGS)}]


@pytest.mark.parametrize("budget", [2.0, 3.0, 5.0])
def test_allocated_rows_average_to_the_frontier_value(run: Path, budget: float) -> None:
    allocated = as_json(run, f"""select count(*) as n, avg(g.rougeL) as mean
        from allocations a join generations g using (seq_id, config_id) where a.budget = {budget}""")
    frontier = as_json(run, f"select value from frontier where budget = {budget} and kind = 'grid'")
    assert allocated[0]["n"] == N
    assert allocated[0]["mean"] == pytest.approx(frontier[0]["value"], abs=1e-12)


def test_csv_and_table_formats(run: Path) -> None:
    sql = ("select config_id, cost, avg(rougeL) as mean, any_value(output) as output from generations "
           "group by all order by cost, config_id")
    result = query(run, sql, "--format", "csv")
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(io.StringIO(result.output)))
    assert len(rows) == len(CONFIGS) and list(rows[0]) == ["config_id", "cost", "mean", "output"]
    assert "\n" in rows[0]["output"]  # CSV keeps the text whole, quoted
    expected = {r["config_id"]: r["mean"] for r in as_json(run, sql)}
    # full precision in the CSV: equal up to the order DuckDB's parallel avg() happened to sum in
    assert all(float(r["mean"]) == pytest.approx(expected[r["config_id"]], rel=1e-13) for r in rows)

    result = query(run, sql)  # the default: an aligned table, one line per row
    assert result.exit_code == 0, result.output
    lines = result.output.rstrip("\n").splitlines()
    assert lines[0].split() == ["config_id", "cost", "mean", "output"]
    assert set(lines[1].replace(" ", "")) == {"-"} and lines[-1] == f"({len(CONFIGS)} rows)"
    body = lines[2:-1]
    assert len(body) == len(CONFIGS) and all("\\n" in line for line in body)
    cost_end = lines[0].index("cost") + len("cost")  # numbers are right-aligned under their header
    assert all(line[cost_end - 1].isdigit() and line[cost_end] == " " for line in body)
    output_start = lines[0].index("output")  # text is left-aligned under its header
    assert all(line[output_start - 1] == " " and line[output_start] != " " for line in body)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["{run}", "selec * from generations"], 'Parser Error: syntax error at or near "selec"'),
        (["{run}", "select nope from generations"], 'Binder Error: Referenced column "nope" not found'),
        (["{run}", "select 1", "--format", "xml"], "unknown format 'xml'"),
        (["{run}", "select 1", "--metric", "bleu"], "unknown metric 'bleu'"),
        (["{run}", "select * from frontier", "--metric", "rouge2"], "view frontier is not available"),
        (["{missing}", "select 1"], "does not exist"),
        # refused on any view, not only an oracle's (it named a reduce command with the bad option)
        (["{run}", "select 1 from configs", "--degenerate", "drop"], "unknown degenerate mode 'drop'"),
        (["{run}", "select 1 from configs", "--cost", "wall"], "unknown cost mode 'wall'"),
    ],
)
def test_errors_are_one_line_exit_2(run: Path, tmp_path: Path, args: list[str], message: str) -> None:
    result = query(*(a.format(run=run, missing=tmp_path / "nope") for a in args))
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.output
    assert "Traceback" not in result.output


def test_missing_oracle_view_says_how_to_make_it(run: Path) -> None:
    result = query(run, "select count(*) from allocations", "--metric", "fidelity")
    assert result.exit_code == 2
    assert f"{run}/oracle/fidelity/allocations.parquet is missing" in result.output
    assert f"dynoracle reduce {run} --metric fidelity" in result.output
    for view, command in (("gates", f"dynoracle gates {run} --lambda"), ("token_oracle", f"dynoracle token-oracle {run}")):
        result = query(run, f"select count(*) from {view}")
        assert result.exit_code == 2 and f"view {view} is not available" in result.output
        assert command in result.output


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize(
    ("sql", "message"),
    [
        ("copy generations to '{shard}' (use_tmp_file false)",
         "query only reads the run: COPY statements are not allowed; use SELECT (or EXPLAIN)"),
        ("attach '{outside}/new.duckdb' as db", "query only reads the run: ATTACH statements are not allowed"),
        ("install httpfs", "query only reads the run: LOAD statements are not allowed"),
        ("load httpfs", "query only reads the run: LOAD statements are not allowed"),
        ("set enable_external_access = true", "query only reads the run: SET statements are not allowed"),
        ("select * from read_csv('/etc/hostname')", 'Permission Error: Cannot access file "/etc/hostname"'),
        ("select * from read_parquet('{shard}')", "Permission Error: Cannot access file"),
        ("select * from read_text('{outside}/secret.txt')", "Permission Error: Cannot access file"),
        ("select 1 from generations; copy configs to '{outside}/x.csv'", "COPY statements are not allowed"),
    ],
)
def test_query_cannot_write_attach_install_or_read_outside(run: Path, tmp_path: Path, sql: str, message: str) -> None:
    """Only SELECT/EXPLAIN run, and DuckDB itself has no file access: not even the run's own files by path."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("not yours")
    before, outside_before = _tree(run), _tree(outside)
    result = query(run, sql.format(shard=run / "generations" / "shard=00000.parquet", outside=outside))
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.output
    assert _tree(run) == before and _tree(outside) == outside_before
    assert not list(Path.home().glob(".duckdb/extensions/*/*/httpfs*"))
