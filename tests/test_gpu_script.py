"""`benchmarks/gpu.sh --cpu`: the GPU check's script runs end to end at tiny sizes and reports what it did."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_gpu_script_runs_on_cpu(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "DYNORACLE_DATA_DIR": os.environ.get("DYNORACLE_DATA_DIR", str(REPO.parent / "shared" / "data"))}
    done = subprocess.run(["bash", "benchmarks/gpu.sh", "--cpu", "--out", str(tmp_path)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((tmp_path / "gpu.json").read_text())
    assert "engine tokens/s" in done.stdout and "exactness (cpu, float32): 3/3 passed" in done.stdout
    # 1. the engine's exactness checks on the tiny OPT, both prefills
    assert report["exactness"]["tests"] == {
        "test_full_configuration_equals_hf_generate[tiny_opt]": "passed",
        "test_skipping_on_tiny_models_equals_reference[full-tiny_opt]": "passed",
        "test_skipping_on_tiny_models_equals_reference[skip-tiny_opt]": "passed"}
    # 2-3. one sweep per dtype on the 6-layer tiny OPT: 6 ULS configurations, every rate and fraction measured
    assert list(report["sweep"]) == ["float32", "bfloat16"]
    for dtype, figures in report["sweep"].items():
        assert figures["dtype"] == dtype and figures["layers"] == 6 and figures["configs"] == 6
        assert [(p["prompts"], p["rows"]) for p in figures["scan"]] == [(2, 12), (4, 24)]
        assert figures["best"] in figures["scan"]
        for key in ("engine_tok_s", "plain_tok_s", "study_tok_s", "matmul_fraction", "bandwidth_fraction"):
            assert figures[key] > 0, key
        assert figures["vs_plain"] == figures["plain_s"] / figures["engine_s"]
    # 4. the run: 4 Alpaca sequences x 6 ULS configurations, every row written once
    run = report["run"]
    assert (run["rows"], run["sequences"], run["configs"], run["rows_ok"]) == (24, 4, 6, True)
    assert run["mode"] == "in-process, no Ray"
    assert run["gen_tokens"] <= 24 * 4
