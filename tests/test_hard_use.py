"""Hard use: racing drivers, path decoys, edited and bit-flipped files, unbounded work, hostile input, signals.

Each case decides in the function that owns the behaviour (the lock, the verifier, the query bounds, the job
checks) or through the CLI where the one-line refusal is the behaviour; none starts Ray.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
from handmade_run import make_run
from test_bad_jobs import TINY, refused_run, workdir  # noqa: F401 (fixture)
from test_run_folders import folder_hash, invoke, refused

from pipeline.analysis.reduce import reduce_run
from pipeline.data.adapters import DataError, DatasetSpec, load_records
from pipeline.generation.models import EMBEDDED_MODEL
from pipeline.report.query import QueryError, RunDatabase, open_run
from pipeline.run import cluster, reaper, rundir
from pipeline.run.job import job_from_dict, load_job
from pipeline.run.rundir import GENERATIONS_SCHEMA, RunDir, RunLocked, job_identity, table_problem
from pipeline.run.verify import RunFolderError, verify_run
from pipeline.training.out_folder import claim_out_folder

FIX = "rerun the run's `dynoracle run` command to regenerate it"


@pytest.fixture(autouse=True)
def no_ray_left_by_other_tests() -> None:
    """These tests check that a refused command starts no Ray (and that start-up honours its timeout and
    signals): a Ray that an earlier test module left initialised in this process would hide both."""
    if ray.is_initialized():
        ray.shutdown()


# --- locks -------------------------------------------------------------------------------------------------

def test_a_losing_driver_never_removes_the_winners_lock_or_folder(tmp_path: Path, monkeypatch) -> None:
    """The loser creates the folder, then the winner takes the lock before the loser opens it (the race)."""
    root = tmp_path / "outputs" / "race"
    real_open, winner = os.open, RunDir(root).lock()

    def open_after_the_winner(path, *args, **kwargs):
        monkeypatch.setattr(rundir.os, "open", real_open)
        winner.__enter__()  # the other driver slips in between the loser's mkdir and its flock
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(rundir.os, "open", open_after_the_winner)
    with pytest.raises(RunLocked, match="is in use by another dynoracle run"):
        with RunDir(root).lock():
            pass
    assert (root / ".lock").read_text() == f"{os.getpid()}\n"  # the winner's lock is still there ...
    with pytest.raises(RunLocked):  # ... and still excludes a third driver
        with RunDir(root).lock():
            pass
    winner.__exit__(None, None, None)
    assert (root / ".lock").read_text() == ""  # released: the lock names no holder (the loser made the folder)


def test_a_refused_rerun_leaves_the_lock_file_as_it_was(tmp_path: Path) -> None:
    run = make_run(tmp_path / "run")
    (run / ".lock").write_bytes(b"")
    os.utime(run / ".lock", ns=(10**18, 10**18))
    before = folder_hash(run)
    with pytest.raises(ValueError, match="another job"):
        with RunDir(run).lock():
            assert (run / ".lock").read_text() == f"{os.getpid()}\n"  # the holder is named while it holds
            raise ValueError("another job")  # as _check_same refuses
    assert folder_hash(run) == before and (run / ".lock").stat().st_mtime_ns == 10**18


# --- paths -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("target", ["elsewhere", "nowhere"])
def test_a_symlinked_run_folder_is_refused(workdir: Path, tmp_path: Path, target: str) -> None:  # noqa: F811
    elsewhere = tmp_path / target
    if target == "elsewhere":
        elsewhere.mkdir()
    (workdir / "outputs").mkdir()
    (workdir / "outputs" / "x").symlink_to(elsewhere)
    result = invoke(["run", *TINY, "--name", "x"])
    assert (result.exit_code, result.output) == (2, f"error: run folder outputs/x is a symbolic link (to {elsewhere}); "
                                                    "give the real folder as --out, or remove the link\n")
    assert sorted(p.name for p in tmp_path.rglob("*")) == sorted(["work", ".notes.tmp", "outputs", "x", target][
        : 5 if target == "elsewhere" else 4])
    assert not ray.is_initialized()


def test_names_with_control_characters_and_home_folders(workdir: Path, tmp_path: Path) -> None:  # noqa: F811
    job = tmp_path / "job.toml"
    job.write_text('name = "x\\ny"\n[dataset]\nname = "alpaca"\n')
    refused_run(["--job", str(job)], workdir, "job name 'x\\ny' holds a control character (a newline, a tab...); "
                "give a name of printable characters")
    assert load_job(dataset="alpaca", overrides={"out": "~/runs/x"}).out == os.path.expanduser("~/runs/x")


def test_finetune_out_must_be_empty_or_the_same_training(tmp_path: Path) -> None:
    from test_finetune import _spec

    foreign = tmp_path / "thesis"
    foreign.mkdir()
    (foreign / "config.json").write_text("mine")
    before = folder_hash(foreign)
    with pytest.raises(ValueError, match=f"^--out {foreign} is not empty and is not an unfinished fine-tune of "
                                         "dynoracle \\(it holds config.json\\); choose another --out$"):
        claim_out_folder(foreign, "trainer-checkpoints", _spec(tmp_path, foreign))
    assert folder_hash(foreign) == before
    out = tmp_path / "ft"
    claim_out_folder(out, "trainer-checkpoints", _spec(tmp_path, out))
    claim_out_folder(out, "trainer-checkpoints", _spec(tmp_path, out, eval_limit=2))  # the same training resumes
    stamped = folder_hash(out)
    for change in ({"lr": 5e-4, "seed": 1}, {"config_id": "ee-2"}):
        with pytest.raises(ValueError, match=f"^{out} holds checkpoints of another training \\("):
            claim_out_folder(out, "trainer-checkpoints", dataclasses.replace(_spec(tmp_path, out), **change))
    assert folder_hash(out) == stamped


# --- integrity ---------------------------------------------------------------------------------------------

def test_an_edited_configs_file_is_refused(tmp_path: Path) -> None:
    run = make_run(tmp_path / "run")
    table = pq.read_table(run / "configs.parquet")
    costs = table.column("cost").to_pylist()
    costs[1], costs[2] = costs[2], costs[1]  # a valid file with two costs swapped
    assert costs != table.column("cost").to_pylist()
    pq.write_table(table.set_column(4, "cost", pa.array(costs, pa.int16())), run / "configs.parquet")
    refused(["reduce", str(run)], run, f"{run / 'configs.parquet'} does not hold the configurations run.json "
            f"records (edited or replaced); {FIX}")


def test_a_damaged_identity_in_a_shards_footer_is_one_line_and_regenerated(tmp_path: Path) -> None:
    """A bit flip in the footer can leave the Parquet file readable with its identity stamp no longer UTF-8."""
    run = make_run(tmp_path / "run")
    shard = run / "generations" / "shard=00001.parquet"
    table = pq.read_table(shard)
    stamp = table.schema.metadata[rundir.SHARD_METADATA_KEY]
    damaged = bytes([stamp[0] ^ 0x80]) + stamp[1:]  # '{' becomes 0xfb: the stamp is not UTF-8
    pq.write_table(table.replace_schema_metadata({rundir.SHARD_METADATA_KEY: damaged}), shard)
    refused(["query", str(run), "select 1"], run,
            f"shard file {shard} is damaged: unreadable (its identity metadata is damaged); {FIX}")
    record = json.loads((run / "run.json").read_text())
    problem = table_problem(shard, GENERATIONS_SCHEMA, 1, ("seq_id",), set(), job_identity(record))
    assert problem == "unreadable (its identity metadata is damaged)"  # so `run` computes the shard again


# --- unbounded work ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("sql", ["", ";", "-- a comment alone", "  \n"])
def test_an_empty_query_is_one_line(tmp_path: Path, sql: str) -> None:
    run = make_run(tmp_path / "run", num_sequences=2)
    refused(["query", str(run), "--", sql], run,
            "the query holds no SQL statement (only blanks, ';' or comments); give a SELECT")


def test_queries_are_bounded_in_time_and_memory_and_stop_on_ctrl_c(tmp_path: Path) -> None:
    db = open_run(make_run(tmp_path / "run", num_sequences=4))
    assert db.fetch("select current_setting('memory_limit')")[1][0][0] in ("1.8 GiB", "1.9 GiB", "2.0 GiB")
    cross = "select count(*) from generations a, generations b, generations c, generations d, generations e"
    start = time.monotonic()
    with pytest.raises(QueryError, match="^the query ran past its 0.5 s limit and was stopped; narrow it"):
        db.fetch(cross, timeout_s=0.5)
    # Ctrl-C as a terminal sends it, to Python's own handler: in the full suite an earlier test's library (Ray's
    # start-up or Ray Train) can leave another one installed in this process, which is not what is tested here.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGINT)).start()
        with pytest.raises(KeyboardInterrupt):
            db.fetch(cross)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert time.monotonic() - start < 20


def test_a_huge_result_stops_at_the_row_cap(monkeypatch) -> None:
    import duckdb

    from pipeline.report import query

    monkeypatch.setattr(query, "MAX_ROWS", 1000)
    db = RunDatabase(duckdb.connect(), {})
    with pytest.raises(QueryError, match="^the query returns more than 1,000 rows; add a LIMIT or aggregate$"):
        db.fetch("select * from range(100000) a, range(100000) b")


def test_a_bootstrap_too_large_is_refused_before_allocating(tmp_path: Path) -> None:
    run = make_run(tmp_path / "run", num_sequences=2)
    before = folder_hash(run)
    result = invoke(["reduce", str(run), "--bootstrap", "100000000"])
    assert result.exit_code == 2 and result.output.count("\n") == 1, result.output
    assert result.output.startswith("error: 100,000,000 bootstrap resamples of 2 sequences need ")
    assert result.output.strip().endswith("fit in 1 GiB: ask for fewer (--bootstrap)")
    assert folder_hash(run) == before
    reduce_run(run, "rougeL", resamples=10)  # a bounded one runs


@pytest.mark.parametrize("layers", ["0", "-3", "100000"])
def test_configs_layers_are_bounded(layers: str) -> None:
    result = invoke(["configs", "--layers", layers])
    assert (result.exit_code, result.output) == (2, f"error: a model has 1 to 1024 decoder layers, got L={layers}\n")


def test_a_dead_address_fails_within_the_start_timeout() -> None:
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    start = time.monotonic()
    with pytest.raises(ConnectionError, match=f"^no Ray cluster answers at 127.0.0.1:{port} within 1 s"):
        with cluster.ray_session(f"127.0.0.1:{port}", timeout_s=1.0):
            pass
    assert 1.0 <= time.monotonic() - start < 5 and not ray.is_initialized()


# --- bad input ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ('start_timeout = "10"', "start_timeout must be a number, got '10'"),
        ('families = "ee"', 'families must be a list, got \'ee\' (write families = ["ee"])'),
        ('[checkpoints]\nnot-a-config = "embedded:smollm2-135m-instruct"',
         "checkpoints name configuration not-a-config, which this job does not run"),
        ('[configs]\na = [0, 3]\nb = [0, 3]', "custom configurations a and b execute the same layers [0, 3]; "
         "keep one of them in [configs]"),
    ],
)
def test_more_job_fields_are_checked(workdir: Path, tmp_path: Path, toml: str, message: str) -> None:  # noqa: F811
    job = tmp_path / "job.toml"
    job.write_text(f'families = ["uls"]\n{toml}\n[dataset]\nname = "alpaca"\n'.replace(
        'families = ["uls"]\nfamilies', "families"))
    refused_run(["--job", str(job), "--limit", "2", "--data-dir", str(TINY[-1])], workdir, message)


def test_start_timeout_takes_a_whole_number_and_out_must_be_a_string() -> None:
    assert load_job(dataset="alpaca", overrides={"start_timeout": 10}).start_timeout == 10
    with pytest.raises(ValueError, match="^out must be a string, got 5$"):
        load_job(dataset="alpaca", overrides={"out": 5, "name": "other"})


def test_non_utf8_job_and_data_files_name_the_line(workdir: Path, tmp_path: Path) -> None:  # noqa: F811
    job = tmp_path / "job.toml"
    job.write_bytes(b'[dataset]\nname = "alpaca"\n# caf\xe9\n')
    refused_run(["--job", str(job)], workdir, f"{job}: line 3 is not UTF-8 text (byte 0xe9); save the job file as UTF-8")
    data = tmp_path / "qa.jsonl"
    data.write_bytes(b'{"q": "a", "a": "b"}\n{"q": "caf\xe9", "a": "b"}\n')
    with pytest.raises(DataError, match=f"^{data}: line 2 is not UTF-8 text \\(byte 0xe9\\); save the file as UTF-8$"):
        load_records(DatasetSpec("file", path=str(data), prompt_column="q", reference_column="a"))


@pytest.mark.parametrize(("value", "shown"), [({"x": 1}, "dict \"{'x': 1}\""), (b"\xff\xfe", "bytes \"b'\\\\xff\\\\xfe'\""),
                                              (5, "int '5'"), (["ok", 3], "int '3'")])
def test_references_must_be_text(tmp_path: Path, value: object, shown: str) -> None:
    """A Parquet cell of bytes or numbers, a JSON object or a list with a number: one line naming the row."""
    if isinstance(value, (dict, list)):
        path, origin = tmp_path / "qa.jsonl", "qa.jsonl line 2"
        path.write_text("\n".join(json.dumps({"q": q, "a": a}) for q, a in (("fine", "fine"), ("odd", value))) + "\n")
    else:
        path, origin = tmp_path / "qa.parquet", "qa.parquet row 0"
        pq.write_table(pa.Table.from_pylist([{"q": "odd", "a": value}]), path)
    with pytest.raises(DataError) as caught:
        load_records(DatasetSpec("file", path=str(path), prompt_column="q", reference_column="a"))
    assert str(caught.value) == (f"{origin}: reference (column 'a') is {shown}, not text; "
                                 "a reference must be a text or a list of texts")


def test_duplicate_custom_sets_are_refused() -> None:
    with pytest.raises(ValueError, match="^custom configurations a and b execute the same layers"):
        job_from_dict({"dataset": {"name": "alpaca"}, "configs": {"a": [0, 1, 1], "b": [0, 1, 1]}})


# --- signals -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("swallowed", [False, True])
def test_sigterm_while_ray_starts_unwinds_and_shuts_ray_down(monkeypatch, swallowed: bool) -> None:
    """ray.init installs a bare sys.exit SIGTERM handler first thing, and parts of it swallow exceptions
    raised in callbacks; a SIGTERM while it starts must still unwind."""
    shutdowns = []

    def starting_ray(**kwargs) -> None:
        ray._private.utils.set_sigterm_handler(lambda signum, frame: sys.exit(signum))  # as ray.init does
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)  # the signal lands while Ray is still starting
        except BaseException:
            if not swallowed:
                raise

    monkeypatch.setattr(cluster.ray, "init", starting_ray)
    monkeypatch.setattr(cluster.ray, "shutdown", lambda: shutdowns.append(True))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    previous = signal.getsignal(signal.SIGTERM)
    try:
        with pytest.raises(KeyboardInterrupt):
            with cluster.ray_session(None):
                pytest.fail("the run went on")
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert shutdowns == [True]


def _gone(pid: int, within_s: float) -> bool:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            return True
        if state == "Z":
            return True
        time.sleep(0.1)
    return False


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="the reaper reads /proc")
def test_a_killed_drivers_ray_processes_are_reaped() -> None:
    """What a private Ray's driver starts under the mark (agents, workers) ends with the driver, even on SIGKILL."""
    driver = subprocess.Popen([sys.executable, "-c", (
        "import subprocess, sys, time\n"
        "from pipeline.run.reaper import Reaper\n"
        "reaper = Reaper()\n"
        "with reaper.marking():\n"
        "    agent = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'], start_new_session=True)\n"
        "print(agent.pid, flush=True)\n"
        "time.sleep(120)\n")], stdout=subprocess.PIPE, text=True)
    agent = int(driver.stdout.readline())
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    assert not _gone(agent, 1.0)  # alive while its driver lives
    driver.kill()
    driver.wait()
    assert _gone(agent, 30.0)
    assert bystander.poll() is None and reaper.MARK not in os.environ
    bystander.kill()
    bystander.wait()
