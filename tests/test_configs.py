"""Skip configurations follow DESIGN.md exactly, and `dynoracle configs` prints them."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.generation.configs import build_configs, ee_layers, rls_layers, uls_layers


def _configs_json(*args: str) -> list[dict]:
    result = CliRunner().invoke(app, ["configs", "--layers", "24", "--json", *args])
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def test_uls_examples_from_design():
    assert uls_layers(24, 12) == tuple(range(0, 24, 2))
    assert uls_layers(24, 6) == (0, 4, 8, 12, 16, 20)
    assert uls_layers(24, 20) == tuple(i for i in range(24) if i not in (1, 7, 13, 19))
    assert uls_layers(24, 24) == tuple(range(24))


@pytest.mark.parametrize("num_layers", [1, 2, 5, 24, 30, 32])
def test_every_budget_executes_exactly_c_layers_starting_at_layer_0(num_layers):
    for c in range(1, num_layers + 1):
        for layers in (uls_layers(num_layers, c), ee_layers(num_layers, c), rls_layers(num_layers, c, 3)):
            assert len(layers) == c and layers[0] == 0
            assert list(layers) == sorted(set(layers)) and layers[-1] < num_layers


def test_cli_json_lists_24_uls_configurations():
    uls = _configs_json("--family", "uls")
    assert len(uls) == 24  # budgets 1..23 plus `full`, which is ULS at c = 24
    by_id = {c["config_id"]: c for c in uls}
    assert by_id["uls-12"]["layers"] == list(range(0, 24, 2))
    assert by_id["uls-6"]["layers"] == [0, 4, 8, 12, 16, 20]
    assert sorted(set(range(24)) - set(by_id["uls-20"]["layers"])) == [1, 7, 13, 19]
    assert by_id["full"]["layers"] == list(range(24)) and by_id["full"]["cost"] == 24
    assert all(c["cost"] == len(c["layers"]) == c["budget"] for c in uls)


def test_cli_json_lists_ee_and_rls():
    ee = {c["config_id"]: c for c in _configs_json("--family", "ee")}
    assert ee["ee-8"]["layers"] == list(range(8))
    rls = [c for c in _configs_json("--family", "rls", "--rls-seeds", "2") if c["family"] == "rls"]
    assert len(rls) == 2 * 23
    assert {c["config_id"] for c in rls} == {f"rls-{c}-s{s}" for c in range(1, 24) for s in (0, 1)}
    seeds = {c["config_id"]: tuple(c["layers"]) for c in rls}
    assert any(seeds[f"rls-{c}-s0"] != seeds[f"rls-{c}-s1"] for c in range(2, 23))


def test_rls_is_identical_across_processes():
    code = "import json; from pipeline.generation.configs import build_configs; print(json.dumps([c.to_dict() for c in build_configs(24, ('rls',), (0, 7))]))"
    runs = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
            for _ in range(2)]
    assert runs[0] == runs[1]
    assert json.loads(runs[0]) == [c.to_dict() for c in build_configs(24, ("rls",), (0, 7))]


def test_bad_family_is_one_line_error():
    result = CliRunner().invoke(app, ["configs", "--layers", "24", "--family", "xyz"])
    assert result.exit_code == 2
    assert "unknown family xyz" in result.output and "Traceback" not in result.output
