"""Run folders in an object store: `--out s3://...` against a local S3 server (moto) on 127.0.0.1.

The same tiny job runs once into a local folder (the reference) and once into the bucket, whose driver
is killed after its first shard and rerun; the bucket must end up with exactly the reference's rows,
and reduce, query and report must work on the URI as on the folder. The killed driver is a CLI process;
every other command runs in-process (typer's CliRunner, on one module Ray).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import boto3
import pyarrow as pa
import pytest
from moto.server import ThreadedMotoServer
from typer.testing import CliRunner, Result

from pipeline.cli import app
from pipeline.run.location import StorePath, locate, read_parquet
from pipeline.run.rundir import RunDir, RunLocked

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("DYNORACLE_DATA_DIR") or REPO.parent / "shared" / "data")
BUCKET = "runs"
SEQUENCES, SHARDS, CONFIG_IDS = 4, 2, ("full", "uls-15")
JOB = f"""
name = "tiny_store"
dtype = "float32"
families = ["uls"]
config_ids = ["uls-15"]
max_new_tokens = 2
batch_size = 2
shard_size = 2
workers = 1

[dataset]
name = "alpaca"
limit = {SEQUENCES}
data_dir = "{DATA}"
"""


def dynoracle(*args: object) -> Result:
    """The CLI in this process: exit_code, stdout and stderr as a `dynoracle ...` command gives them."""
    return CliRunner().invoke(app, [str(arg) for arg in args])


@pytest.fixture(scope="module")
def s3():
    """A moto S3 server on 127.0.0.1 with one bucket; AWS_* variables point pyarrow (here and in children) at it."""
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # the server logs every request
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    saved = dict(os.environ)
    os.environ.update(AWS_ACCESS_KEY_ID="test", AWS_SECRET_ACCESS_KEY="test", AWS_DEFAULT_REGION="us-east-1",
                      AWS_ENDPOINT_URL=f"http://{host}:{port}")
    client = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    client.create_bucket(Bucket=BUCKET)
    yield client
    os.environ.clear()
    os.environ.update(saved)
    server.stop()


@pytest.fixture(scope="module")
def job_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("jobs") / "tiny_store.toml"
    path.write_text(JOB)
    return path


def rows(run_dir: str | Path) -> list[dict]:
    table = pa.concat_tables([read_parquet(p) for p in sorted((locate(run_dir) / "generations").glob("*.parquet"))])
    return sorted(table.to_pylist(), key=lambda row: (row["seq_id"], row["config_id"]))


def keys(client, prefix: str) -> list[str]:
    """The objects under `prefix`, less the empty folder markers pyarrow keeps for emptied prefixes."""
    listing = client.list_objects_v2(Bucket=BUCKET, Prefix=prefix)
    return sorted(item["Key"] for item in listing.get("Contents", []) if not item["Key"].endswith("/"))


def _wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


@pytest.fixture(scope="module")
def reference(s3, local_ray, job_file, tmp_path_factory) -> tuple[Path, list[dict]]:
    out = tmp_path_factory.mktemp("local") / "run"
    result = dynoracle("run", "--job", job_file, "--out", out)
    assert result.exit_code == 0, result.output
    assert dynoracle("reduce", out, "--match-full").exit_code == 0
    return out, rows(out)


@pytest.fixture(scope="module")
def bucket_run(s3, job_file, reference) -> str:
    """The job into s3://runs/tiny: driver killed after the first shard object, then rerun to the end."""
    uri = f"s3://{BUCKET}/tiny"
    command = [sys.executable, "-m", "pipeline.cli", "run", "--job", str(job_file), "--out", uri]
    first = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(lambda: keys(s3, "tiny/generations/") or first.poll() is not None, 900, "the first shard object")
        assert first.poll() is None, first.communicate()[1]  # it must still be running, not have failed
        first.send_signal(signal.SIGKILL)
        first.wait(30)
    finally:
        if first.poll() is None:
            first.kill()
    shards = [k for k in keys(s3, "tiny/generations/") if k.endswith(".parquet")]
    assert 1 <= len(shards) < SHARDS
    assert "tiny/.lock" in keys(s3, "tiny/")  # a killed driver cannot clean up its lock ...

    rerun = dynoracle("run", "--job", job_file, "--out", uri)  # ... which this host takes over (its pid is gone)
    assert rerun.exit_code == 0, rerun.output
    assert (f"generations: {len(shards)} of {SHARDS} shards already complete (skipped), "
            f"computing {SHARDS - len(shards)}") in rerun.stderr
    assert f"next: dynoracle reduce {uri} --match-full" in rerun.stdout
    return uri


def test_killed_and_resumed_bucket_run_has_exactly_the_reference_rows(s3, bucket_run, reference):
    assert len(reference[1]) == SEQUENCES * len(CONFIG_IDS)
    assert rows(bucket_run) == reference[1]
    assert keys(s3, "tiny/") == ["tiny/configs.parquet", *(f"tiny/generations/shard={i:05d}.parquet"
                                                            for i in range(SHARDS)), "tiny/run.json"]  # lock gone
    record = json.loads(locate(bucket_run + "/run.json").read_text())
    local = json.loads((reference[0] / "run.json").read_text())
    assert record["finished"] and record["rows"] == local["rows"] == SEQUENCES * len(CONFIG_IDS)
    assert record["identity"] == local["identity"]


def test_reduce_query_report_on_the_uri(s3, bucket_run, reference):
    reduced = dynoracle("reduce", bucket_run, "--match-full", "--json")
    assert reduced.exit_code == 0, reduced.output
    local = json.loads((reference[0] / "oracle" / "rougeL" / "summary.json").read_text())
    assert json.loads(reduced.stdout) == local
    assert json.loads(locate(bucket_run + "/oracle/rougeL/summary.json").read_text()) == local

    counted = dynoracle("query", bucket_run, "select config_id, count(*) as n, sum(gen_tokens) as tokens "
                        "from generations group by 1 order by 1", "--format", "json")
    assert counted.exit_code == 0, counted.output
    expected = [{"config_id": c, "n": SEQUENCES, "tokens": sum(r["gen_tokens"] for r in reference[1]
                                                                if r["config_id"] == c)} for c in sorted(CONFIG_IDS)]
    assert json.loads(counted.stdout) == expected
    joined = dynoracle("query", bucket_run, "select count(*) as n from allocations a join generations g "
                       "using (seq_id, config_id)", "--format", "csv")
    assert joined.exit_code == 0 and joined.stdout.splitlines()[1] == str(
        len(read_parquet(reference[0] / "oracle" / "rougeL" / "allocations.parquet")))

    before = keys(s3, "tiny/")
    written = dynoracle("query", bucket_run, f"copy (select 1) to 's3://{BUCKET}/tiny/x.csv'")
    assert written.exit_code == 2 and "query only reads the run: COPY statements are not allowed" in written.stderr
    assert keys(s3, "tiny/") == before

    report = dynoracle("report", bucket_run)
    assert report.exit_code == 0, report.output
    assert f"wrote {bucket_run}/report.md" in report.stdout
    made = keys(s3, "tiny/")
    assert "tiny/report.md" in made and sum(k.endswith(".png") for k in made) >= 2
    assert locate(bucket_run + "/report.md").read_text().startswith("#")


def test_damaged_object_refused_then_recomputed(s3, job_file, bucket_run, reference):
    key = "tiny/generations/shard=00001.parquet"
    data = bytearray(s3.get_object(Bucket=BUCKET, Key=key)["Body"].read())
    footer = int.from_bytes(data[-8:-4], "little")  # Parquet: pages, then the footer (which holds the stamp)
    middle = (4 + len(data) - 8 - footer) // 2  # amid the pages, behind the leading magic
    data[middle : middle + 64] = bytes(b ^ 0xFF for b in data[middle : middle + 64])
    s3.put_object(Bucket=BUCKET, Key=key, Body=bytes(data))

    with pytest.raises((OSError, pa.ArrowException)):
        read_parquet(locate(f"s3://{BUCKET}/{key}"))
    refused = dynoracle("reduce", bucket_run)
    assert refused.exit_code == 2 and refused.stderr.startswith("error: ")

    rerun = dynoracle("run", "--job", job_file, "--out", bucket_run)
    assert rerun.exit_code == 0, rerun.output
    assert "generations shard 00001: unreadable" in rerun.stderr
    assert f"generations: {SHARDS - 1} of {SHARDS} shards already complete" in rerun.stderr
    assert rows(bucket_run) == reference[1]


def test_store_lock_single_writer_rule(s3):
    run = RunDir(f"s3://{BUCKET}/locked")
    assert isinstance(run.root, StorePath)
    with run.lock():
        with pytest.raises(RunLocked, match=f"in use by another dynoracle run \\(pid {os.getpid()} on "):
            with RunDir(f"s3://{BUCKET}/locked").lock():
                pass
    assert keys(s3, "locked/") == []

    lock = run.root / ".lock"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": int(dead.stdout), "token": "old"}))
    with run.lock():  # a dead driver of this host: taken over
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    lock.write_text(json.dumps({"host": "elsewhere", "pid": 1, "token": "other"}))
    with pytest.raises(RunLocked, match=f"on elsewhere since None\\); if that run is gone, delete s3://{BUCKET}/locked/.lock"):
        with run.lock():
            pass
    assert json.loads(lock.read_text())["token"] == "other"  # a refused run leaves the lock alone


def test_store_lock_is_a_conditional_write(s3, monkeypatch):
    """Two drivers that both found no lock (both checked before either wrote): only one may go on."""
    from pipeline.run import rundir

    run = RunDir(f"s3://{BUCKET}/raced")
    with run.lock():
        holder = (run.root / ".lock").read_text()
        monkeypatch.setattr(rundir, "_lock_holder", lambda lock: None)  # the other driver's check saw nothing
        with pytest.raises(RunLocked, match="in use by another dynoracle run"):
            with RunDir(f"s3://{BUCKET}/raced").lock():
                pass
        monkeypatch.undo()
        assert (run.root / ".lock").read_text() == holder  # the first driver's lock, untouched
    assert keys(s3, "raced/") == []
