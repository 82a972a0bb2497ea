"""`dynoracle report` on a hand-made run: valid figures, headline numbers equal to the reducer's, staleness."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
from handmade_run import L, make_run
from PIL import Image
from typer.testing import CliRunner

from pipeline.analysis.reduce import reduce_run
from pipeline.cli import app
from pipeline.report.figures import HEADLINE_FRACTIONS, stale_reason

FIGURES = ("cost_quality.png", "oracle_shares.png", "lengths.png")
PRESENT = ["full", "uls", "ee", "rls"]


def report(*args: object):
    return CliRunner().invoke(app, ["report", *map(str, args)])


def number(pattern: str, text: str) -> list[float]:
    found = re.search(pattern, text)
    assert found, f"no match for {pattern!r} in report.md"
    return [float(g) for g in found.groups()]


def test_report_writes_valid_figures_and_the_reducers_numbers(tmp_path: Path) -> None:
    run = make_run(tmp_path / "run")
    result = report(run)
    assert result.exit_code == 0, result.output
    assert "reduced first: no oracle files yet" in result.output

    for name in FIGURES:
        data = (run / name).read_bytes()
        assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 10_000, name
        with Image.open(run / name) as image:
            image.verify()
        with Image.open(run / name) as image:
            width, height = image.size
            assert 900 <= width <= 2000 and 500 <= height <= 1200, (name, image.size)
            assert len(image.getcolors(1 << 16) or range(1 << 16)) > 50, name  # drawn, not blank

    text = (run / "report.md").read_text()
    assert all(f"![{name}]({name})" in text for name in FIGURES)  # relative paths, beside report.md
    reduced = reduce_run(run, "rougeL", match_full=True)  # the same inputs: the same numbers
    summary = reduced.summary
    assert number(r"\| sequences \| (\d+) \|", text) == [summary["num_sequences"]]
    assert number(r"\| layers L \| (\d+) \|", text) == [summary["num_layers"]]
    assert number(r"\| full-model mean rougeL \| ([\d.]+) \|", text)[0] == pytest.approx(summary["full_mean"], abs=5e-5)
    budget, percent = number(r"\| least budget matching the full model \| ([\d.]+) layers \(([\d.]+)% of L\) \|", text)
    assert budget == pytest.approx(summary["min_budget_to_match"], abs=5e-4)
    assert percent == pytest.approx(100 * summary["min_budget_fraction"], abs=5e-3)
    for fraction in HEADLINE_FRACTIONS:
        row = next(r for r in reduced.rows if r.kind == "grid" and r.budget == fraction * L)
        value, bound = number(rf"\| {fraction * L:.2f} \| {fraction:.0%} \| ([\d.]+) \| ([\d.]+) \|", text)
        assert (value, bound) == pytest.approx((row.value, row.lp_bound), abs=5e-5)


def test_oracle_files_are_reused_only_while_fresh_and_matching(tmp_path: Path) -> None:
    run = make_run(tmp_path / "run")
    assert stale_reason(run, "rougeL", None, PRESENT) == "no oracle files yet"
    reduce_run(run, "rougeL", match_full=True)
    assert stale_reason(run, "rougeL", None, PRESENT) is None
    assert stale_reason(run, "rougeL", ["uls", "ee", "rls"], PRESENT) is None
    assert stale_reason(run, "rougeL", ["uls"], PRESENT) == "no oracle files yet"  # oracle/rougeL+families=uls/

    shard = run / "generations" / "shard=00001.parquet"
    later = (run / "oracle" / "rougeL" / "summary.json").stat().st_mtime_ns + 10**9
    os.utime(shard, ns=(later, later))
    assert stale_reason(run, "rougeL", None, PRESENT) == "the generations are newer than the oracle files"
    os.utime(shard, ns=(later - 2 * 10**9, later - 2 * 10**9))  # back in the past for the checks below

    reduce_run(run, "rougeL", ["uls"], match_full=True)  # beside the all-family oracle, not over it
    assert stale_reason(run, "rougeL", ["uls"], PRESENT) is None
    assert stale_reason(run, "rougeL", None, PRESENT) is None
    summary = run / "oracle" / "rougeL" / "summary.json"
    summary.write_text(json.dumps({**json.loads(summary.read_text()), "families": ["full", "uls"]}))
    assert stale_reason(run, "rougeL", None, PRESENT) == "the oracle files cover other families"  # an older version's
    reduce_run(run, "rougeL", match_full=False)
    assert stale_reason(run, "rougeL", None, PRESENT) == "the oracle files lack the minimal matching budget"
    summary.write_text(json.dumps({**json.loads(summary.read_text()), "match_full": True, "cost_mode": "measured"}))
    assert stale_reason(run, "rougeL", None, PRESENT) == "the oracle files use measured cost"


def test_report_reuses_fresh_files_and_honours_families(tmp_path: Path) -> None:
    run = make_run(tmp_path / "run")
    reduce_run(run, "fidelity", ["uls"], match_full=True)
    summary_path = run / "oracle" / "fidelity+families=uls" / "summary.json"
    before = summary_path.stat().st_mtime_ns
    result = report(run, "--metric", "fidelity", "--families", "uls")
    assert result.exit_code == 0, result.output
    assert "reduced first" not in result.output and summary_path.stat().st_mtime_ns == before
    assert json.loads(summary_path.read_text())["families"] == ["full", "uls"]
    assert "families full, uls" in (run / "report.md").read_text()


@pytest.mark.parametrize(("args", "message"), [(["{missing}"], "does not exist"),
                                               (["{run}", "--families", "uls,xx"], "unknown family xx"),
                                               (["{run}", "--metric", "bleu"], "unknown metric 'bleu'")])
def test_errors_are_one_line_exit_2(tmp_path: Path, args: list[str], message: str) -> None:
    run = make_run(tmp_path / "run")
    result = report(*(a.format(run=run, missing=tmp_path / "nope") for a in args))
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.output
    assert not (run / "report.md").exists()
