"""The installed wheel means what the checkout means: `--dataset alpaca` resolves to the same job.

The wheel is built from a copy of the sources, installed into a fresh virtual environment outside the
checkout that borrows this environment's dependencies through a .pth file (no downloads), and run there.
"""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.run.job import JOBS_DIR, load_job, named_jobs

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("DYNORACLE_DATA_DIR") or REPO.parent / "shared" / "data")
TINY = ["--limit", "2", "--configs", "uls-15", "--max-new-tokens", "2", "--workers", "1", "--data-dir", str(DATA)]


def _env() -> dict[str, str]:
    """This environment without anything that would put the checkout on the path."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "RAY_ADDRESS")}
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if not p.startswith(sys.prefix))
    return env


@pytest.fixture(scope="module")
def wheel_venv(tmp_path_factory) -> Path:
    """A fresh venv holding only the built wheel, with this environment's site-packages appended to its path."""
    root = tmp_path_factory.mktemp("wheel")
    source = root / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, source / name)
    for name in ("pipeline", "jobs"):
        shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(root / "dist"), str(source)], check=True, capture_output=True, timeout=300)
    (wheel,) = (root / "dist").glob("dynoracle-*.whl")

    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps",
                    str(wheel)], check=True, capture_output=True, timeout=300)
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True).stdout.strip()
    # Plain path lines: the dependencies become importable, this environment's own .pth files (an editable
    # install of the checkout among them) are not processed.
    Path(purelib, "zz_borrowed_dependencies.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    return venv


def test_wheel_carries_every_named_job(wheel_venv):
    python = wheel_venv / "bin" / "python"
    probe = "import json, pipeline.run.job as j; print(json.dumps([j.__file__, str(j.JOBS_DIR), j.named_jobs()]))"
    module, jobs_dir, names = json.loads(subprocess.run([str(python), "-c", probe], cwd=wheel_venv, env=_env(),
                                                        check=True, capture_output=True, text=True).stdout)
    assert Path(module).is_relative_to(wheel_venv) and Path(jobs_dir) == Path(module).parents[1] / "jobs"
    assert names == named_jobs() == sorted(p.stem for p in (REPO / "jobs").glob("*.toml"))
    for name in names:
        assert Path(jobs_dir, f"{name}.toml").read_bytes() == (REPO / "jobs" / f"{name}.toml").read_bytes()


def test_dataset_alpaca_same_job_from_wheel_and_checkout(wheel_venv, local_ray, tmp_path):
    """The wheel's command in its own process (with its own Ray); the checkout's in this one, on the module's Ray."""
    installed = subprocess.run([str(wheel_venv / "bin" / "dynoracle"), "run", "--dataset", "alpaca", *TINY,
                                "--out", str(tmp_path / "from_wheel")], cwd=tmp_path, env=_env(),
                               capture_output=True, text=True, timeout=600)
    assert installed.returncode == 0, installed.stderr
    checkout = CliRunner().invoke(app, ["run", "--dataset", "alpaca", *TINY, "--out", str(tmp_path / "from_checkout")])
    assert checkout.exit_code == 0, checkout.output

    wheel_run = json.loads((tmp_path / "from_wheel" / "run.json").read_text())
    checkout_run = json.loads((tmp_path / "from_checkout" / "run.json").read_text())
    assert wheel_run["identity"] == checkout_run["identity"]
    assert wheel_run["dataset_fingerprint"] == checkout_run["dataset_fingerprint"]
    assert wheel_run["rows"] == checkout_run["rows"] == 2 * 2
    shipped = tomllib.loads((REPO / "jobs" / "alpaca.toml").read_text())  # the fields the flags left alone
    for key in ("model", "prefill", "families", "rls_seeds"):
        assert wheel_run["identity"][key] == (sorted(shipped[key]) if isinstance(shipped[key], list) else shipped[key])
    for key in ("split", "prompt_format", "prompt_budget"):
        assert wheel_run["identity"]["dataset"][key] == shipped["dataset"][key]
    assert wheel_run["job"]["batch_size"] == shipped["batch_size"] and wheel_run["git_sha"] is None


def test_unknown_named_job_lists_the_known_ones(wheel_venv, tmp_path):
    result = subprocess.run([str(wheel_venv / "bin" / "dynoracle"), "run", "--dataset", "alpacca"], cwd=tmp_path,
                            env=_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and not list(tmp_path.iterdir())
    assert result.stderr == (f"error: no job named 'alpacca'; named jobs: {', '.join(named_jobs())} "
                             "(or a dataset kind without one: file, hub, lm_eval)\n")
    with pytest.raises(ValueError, match="no job named 'alpacca'"):
        load_job(dataset="alpacca")
    assert JOBS_DIR == REPO / "jobs"
