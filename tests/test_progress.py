"""The run's progress display: a live bar under a pseudo-terminal, plain lines into a pipe.

One tiny job (2 Alpaca sequences in one shard, 4 configurations, decoded one layer set per engine row
group so the engine reports tokens several times during the shard) runs once with stderr on a pty and
once with stderr on a pipe.
"""

from __future__ import annotations

import os
import pty
import re
import select
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("DYNORACLE_DATA_DIR") or REPO.parent / "shared" / "data")
JOB = f"""
name = "tiny_progress"
dtype = "float32"
families = ["uls", "ee", "rls"]
config_ids = ["uls-15", "ee-10", "rls-8-s0"]
max_new_tokens = 4
batch_size = 2
max_rows = 2
shard_size = 2
workers = 1

[dataset]
name = "alpaca"
limit = 2
data_dir = "{DATA}"
"""
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


@pytest.fixture(scope="module")
def job_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("jobs") / "tiny_progress.toml"
    path.write_text(JOB)
    return path


def command(job_file: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "pipeline.cli", "run", "--job", str(job_file), "--out", str(out)]


def env() -> dict[str, str]:
    return {**{k: v for k, v in os.environ.items() if k not in ("NO_COLOR", "FORCE_COLOR", "TTY_COMPATIBLE")},
            "TERM": "xterm-256color", "COLUMNS": "160"}


def run_on_pty(cmd: list[str]) -> tuple[int, str]:
    """Run with stderr on a pseudo-terminal; everything the terminal received, as text."""
    master, slave = pty.openpty()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env(), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=slave)
    os.close(slave)
    received = bytearray()
    try:
        while True:
            ready, _, _ = select.select([master], [], [], 0.2)
            if ready:
                try:
                    chunk = os.read(master, 65536)
                except OSError:  # EIO: every writer has closed the terminal
                    chunk = b""
                if not chunk:
                    break
                received += chunk
            elif proc.poll() is not None:
                break
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
    return proc.wait(60), received.decode(errors="replace")


def tokens_of(run_dir: Path) -> int:
    return sum(pq.read_table(run_dir / "generations", columns=["gen_tokens"]).column("gen_tokens").to_pylist())


def test_live_bar_on_a_terminal(job_file, tmp_path):
    out = tmp_path / "run"
    code, screen = run_on_pty(command(job_file, out))
    assert code == 0, screen[-2000:]
    assert ANSI.search(screen)  # the bar redraws itself in place
    text = ANSI.sub("", screen)
    done = text.index("shard 00000 done by worker 0")
    during = [int(n.replace(",", "")) for n in re.findall(r"shards 0/1 .*? 0/2 sequences \| ([\d,]+) tokens", text[:done])]
    assert during and max(during) > 0  # tokens counted while the shard was still running
    final = re.findall(r"shards 1/1 .*? 2/2 sequences \| ([\d,]+) tokens, \d+ tok/s \| ETA", text)
    assert final and int(final[-1].replace(",", "")) == tokens_of(out)


def test_plain_lines_into_a_pipe(job_file, tmp_path):
    out = tmp_path / "run"
    result = subprocess.run(command(job_file, out), cwd=REPO, env=env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert "\x1b" not in result.stderr and "sequences |" not in result.stderr
    shard_lines = [line for line in result.stderr.splitlines() if line.startswith("shard 0")]
    assert len(shard_lines) == 1
    assert re.fullmatch(r"shard 00000 done by worker 0 in [\d.]+ s \| 1/1 shards \| [\d.]+ seq/s \| \d+ tok/s \| "
                        r"ETA 0:00:00", shard_lines[0])
    assert pq.read_table(out / "generations").num_rows == 2 * 4
