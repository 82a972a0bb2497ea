"""`benchmarks/gpu.sh --cpu --steps profile`: one decode step profiled on a tiny random OPT, against a previous
engine's tree (here this tree), with its time split by kind and its host syncs counted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LAYERS = 6  # random:tiny-opt: 6 ULS configurations, one routed row per (prompt, configuration)


def test_profile_step_runs_on_cpu(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable,
           "DYNORACLE_DATA_DIR": os.environ.get("DYNORACLE_DATA_DIR", str(REPO.parent / "shared" / "data"))}
    done = subprocess.run(["bash", "benchmarks/gpu.sh", "--cpu", "--steps", "profile", "--baseline", str(REPO),
                           "--out", str(tmp_path)], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((tmp_path / "gpu.json").read_text())
    assert set(report) >= {"profile", "profile_baseline"} and "sweep" not in report and "exactness" not in report
    profile = json.loads((tmp_path / "profile.json").read_text())
    assert profile == report["profile"]
    assert "one decode step" in done.stdout and "profile, previous engine" in done.stdout
    for figures in (profile, report["profile_baseline"]):
        assert [(s["prompts"], s["rows"], s["step"]) for s in figures["steps"]] == [(2, 2 * LAYERS, 2),
                                                                                  (4, 4 * LAYERS, 2)]
        for step in figures["steps"]:
            kinds = step["kinds"]
            # the kinds split the step: the measured work plus the idle rest is the step's wall time
            assert abs(sum(kinds.values()) - step["wall_ms"]) < 1e-6 * step["wall_ms"] or kinds["idle (host, gaps)"] == 0
            for kind in ("decoder-layer matmuls", "LM head", "attention: shared prompt", "attention: own tokens",
                         "greedy pick", "element-wise"):
                assert kinds[kind] > 0, kind
            # no host sync inside the model's forward; between forwards only the EOS check (one `bool()`)
            assert step["syncs"]["ops"] == {"in_forward": 0, "between_forwards": 1}
