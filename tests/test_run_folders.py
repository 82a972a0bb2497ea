"""Damaged, stray, foreign and partial run folders: every reader refuses in one line and changes nothing.

Each case asserts the exact one-line message, exit code 2, and that the folder's files (names, bytes,
modes) hash the same before and after.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from handmade_run import make_run
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.generation.task import GenerateTask
from pipeline.run import atomic
from pipeline.run.executor import shards_to_compute
from pipeline.run.rundir import RunDir, job_identity, write_shard

READERS = {
    "reduce": lambda run, *extra: ["reduce", str(run), *extra],
    "report": lambda run, *extra: ["report", str(run), *extra],
    "query": lambda run, *extra: ["query", str(run), "select count(*) from generations", *extra],
}
FIX = "rerun the run's `dynoracle run` command to regenerate it"


def folder_hash(root: Path) -> str:
    """Hash of every path under `root` with its bytes and permission bits: equal means nothing changed."""
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        digest.update(f"{path.relative_to(root)}\0{path.stat().st_mode:o}\0".encode())
        if path.is_file():
            digest.update(path.read_bytes())
    return digest.hexdigest()


def invoke(args: list[str]):
    return CliRunner().invoke(app, args)


def refused(args: list[str], root: Path, message: str) -> None:
    """The command exits 2 with exactly `error: message` and leaves `root` as it was."""
    before = folder_hash(root)
    result = invoke(args)
    assert (result.exit_code, result.output.strip()) == (2, f"error: {message}"), result.output
    assert folder_hash(root) == before


@pytest.fixture
def run(tmp_path: Path) -> Path:
    return make_run(tmp_path / "run")


def flip_bit(path: Path) -> None:
    """Flip one bit in the middle of the file's first column chunk (a data page of seq_id values)."""
    meta = pq.ParquetFile(path).metadata.row_group(0).column(0)
    offset = meta.data_page_offset + meta.total_compressed_size // 2
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x10
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("reader", READERS)
def test_a_flipped_bit_is_refused_by_every_reader(run: Path, reader: str) -> None:
    shard = run / "generations" / "shard=00001.parquet"
    flip_bit(shard)
    before = folder_hash(run)
    result = invoke(READERS[reader](run))
    assert result.exit_code == 2
    line = result.output.strip()
    assert line.startswith(f"error: shard file {shard} is damaged: unreadable (") and line.endswith(f"); {FIX}")
    assert "\n" not in line and folder_hash(run) == before


@pytest.mark.parametrize("reader", READERS)
def test_a_zero_byte_shard_is_refused(run: Path, reader: str) -> None:
    shard = run / "generations" / "shard=00000.parquet"
    shard.write_bytes(b"")
    refused(READERS[reader](run), run, f"shard file {shard} is damaged: unreadable (0 bytes); {FIX}")


@pytest.mark.parametrize("reader", READERS)
def test_a_stray_copy_in_generations_is_refused(run: Path, reader: str) -> None:
    copy = run / "generations" / "shard=00000 (copy).parquet"
    shutil.copy(run / "generations" / "shard=00000.parquet", copy)
    refused(READERS[reader](run), run,
            f"{copy} is not one of this run's 2 shard files; move it out of {run / 'generations'}")


@pytest.mark.parametrize("reader", READERS)
def test_a_shard_under_another_shards_name_is_refused(run: Path, reader: str) -> None:
    shard0, shard1 = (run / "generations" / f"shard={i:05d}.parquet" for i in (0, 1))
    shard1.write_bytes(shard0.read_bytes())
    refused(READERS[reader](run), run,
            f"shard file {shard1} holds shard 0, not shard 1; remove it, or move it to its own run folder")


@pytest.mark.parametrize("reader", READERS)
def test_a_shard_of_another_job_is_refused(run: Path, tmp_path: Path, reader: str) -> None:
    other = make_run(tmp_path / "other")
    record = json.loads((other / "run.json").read_text())
    record["identity"]["max_new_tokens"] = 7
    (other / "run.json").write_text(json.dumps(record))
    table = pq.read_table(run / "generations" / "shard=00001.parquet")
    write_shard(RunDir(other).shard_path(1), 1, table, job_identity(record))
    shutil.copy(other / "generations" / "shard=00001.parquet", run / "generations" / "shard=00001.parquet")
    refused(READERS[reader](run), run, f"shard file {run / 'generations' / 'shard=00001.parquet'} belongs to "
            "another job (identity.max_new_tokens differ); remove it, or move it to its own run folder")


def test_a_shard_without_job_identity_is_refused(run: Path) -> None:
    """A shard written by an older version (or by hand): no identity, so it cannot be trusted as this run's."""
    shard = run / "generations" / "shard=00000.parquet"
    pq.write_table(pq.read_table(shard).replace_schema_metadata(None), shard)
    refused(READERS["reduce"](run), run,
            f"shard file {shard} is damaged: carries no job identity (written by an older dynoracle?); {FIX}")


@pytest.mark.parametrize("reader", READERS)
def test_a_partial_run_is_refused_unless_asked(run: Path, reader: str) -> None:
    (run / "generations" / "shard=00001.parquet").unlink()
    refused(READERS[reader](run), run, f"{run} is incomplete: 1 of 2 shard files missing (first shard=00001.parquet);"
            " finish it with its `dynoracle run` command, or pass --partial")


def test_partial_reduce_says_so_and_covers_the_present_sequences(run: Path) -> None:
    (run / "generations" / "shard=00001.parquet").unlink()
    result = CliRunner().invoke(app, ["reduce", str(run), "--partial", "--json"])
    assert result.exit_code == 0, result.output
    assert "warning: partial run, 1 shard files missing" in result.output
    summary = json.loads((run / "oracle" / "rougeL" / "summary.json").read_text())
    assert (summary["num_sequences"], summary["missing_shards"]) == (5, 1)  # shard 0 holds the even 5 of 10


def test_a_run_without_run_json_is_refused(run: Path) -> None:
    (run / "run.json").unlink()
    refused(READERS["query"](run), run, f"{run / 'run.json'} is missing: {run} is not a dynoracle run folder "
            "(or one written before run.json recorded its shards); run `dynoracle run` into it")


def test_reduce_replaces_its_files_whole_or_not_at_all(run: Path, monkeypatch) -> None:
    assert invoke(["reduce", str(run)]).exit_code == 0
    oracle = run / "oracle"
    before = folder_hash(oracle)
    written, write_table = [], pq.write_table

    def full_disk_on_second_file(table, path, **options):
        written.append(path)
        if len(written) == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        write_table(table, path, **options)

    monkeypatch.setattr(atomic.pq, "write_table", full_disk_on_second_file)
    result = invoke(["reduce", str(run), "--budget", "3"])  # other budgets: other files, were they written
    assert (result.exit_code, result.output.strip()) == (
        2, f"error: cannot write {oracle / 'rougeL' / 'allocations.parquet'}: No space left on device")
    assert folder_hash(oracle) == before  # the old set, whole; no staging folder left behind


def test_runner_refuses_a_foreign_shard_before_deleting_or_writing(run: Path) -> None:
    """A rerun with another setting (run.json deleted) must not adopt or delete the old job's shards."""
    (run / "generations" / "shard=00000.parquet").write_bytes(b"")  # damaged: would be deleted...
    (run / "run.json").unlink()
    record = {"identity": {"max_new_tokens": 5, "model": "toy-lm"}, "dataset_fingerprint": "toy-data",
              "model_fingerprint": "toy-weights", "dtype": "float32"}
    before = folder_hash(run)
    with pytest.raises(ValueError) as caught:
        shards_to_compute(GenerateTask((), 1, "full", 1, 1), RunDir(run), [[], []], job_identity(record))
    assert str(caught.value) == (
        f"run folder {run} holds a shard file of a different job: {run / 'generations' / 'shard=00001.parquet'}: "
        "belongs to another job (identity.max_new_tokens differ); choose another --name or --out, or remove the folder")
    assert folder_hash(run) == before  # ...but nothing is touched once a foreign shard is found


def test_the_stale_file_sweep_deletes_only_files_a_run_writes(tmp_path: Path) -> None:
    run = RunDir(tmp_path)
    (tmp_path / "generations").mkdir()
    theirs = [tmp_path / ".notes.tmp", tmp_path / ".x.parquet.abc.tmp", tmp_path / "generations" / ".draft.tmp"]
    ours = [tmp_path / ".run.json.k2j4_x.tmp", tmp_path / "generations" / ".shard=00003.parquet.a1b2c3.tmp"]
    for path in theirs + ours:
        path.write_text("x")
    assert run.remove_stale_temp_files() == 2
    assert all(p.exists() for p in theirs) and not any(p.exists() for p in ours)


def test_a_full_disk_leaves_no_fresh_run_folder_and_names_the_file(tmp_path: Path, monkeypatch) -> None:
    run = RunDir(tmp_path / "outputs" / "fresh")
    configs = pq.read_table(make_run(tmp_path / "model") / "configs.parquet")

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(atomic.pq, "write_table", full_disk)
    with pytest.raises(OSError) as caught, run.lock():
        atomic.write_parquet(configs, run.configs)
    assert str(caught.value) == f"cannot write {run.configs}: No space left on device"
    assert not run.root.exists()

    monkeypatch.setattr(os, "pwrite", full_disk)  # the disk is full before even the lock's pid is written
    with pytest.raises(OSError) as caught, run.lock():
        pass
    assert str(caught.value) == f"cannot write {run.root / '.lock'}: No space left on device"
    assert not run.root.exists()
