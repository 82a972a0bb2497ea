"""One run = one folder (DESIGN.md, Parquet contract): the lock, run.json, configs.parquet and the shard files.

A shard file is the completion marker of its unit of work: it is written under a temporary name in the
same folder, fsynced, then renamed into place, so a file that exists is whole. Each shard carries its
job's identity (the run.json fields that decide its rows) and its index in its Parquet metadata, so a
file of another job, or one copied under another shard's name, is recognised as foreign. A rerun trusts
a shard only after reading it back (page checksums on) and finding its identity and exactly the expected
rows; a damaged one is deleted and computed again, a foreign one makes the run refuse. Only the driver
writes here, under the lock.

The folder may be an object-store URI (`pipeline.run.location`): there a shard is uploaded whole, a rerun
finds the complete shards by listing `generations/` once, and the lock is an object (see `_store_lock`).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import socket
import uuid
from contextlib import contextmanager, suppress
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import pyarrow as pa

from pipeline.data.adapters import Example
from pipeline.generation.configs import SkipConfig
from pipeline.generation.engine import Generation
from pipeline.generation.scoring import SCORE_COLUMNS
from pipeline.run.atomic import write_parquet
from pipeline.run.location import RunPath, StorePath, locate, read_parquet

# Every scored row (generation or choice) starts with its key, its configuration's family and cost, and its prompt.
SCORED_ROW_FIELDS = [
    ("seq_id", pa.string()),
    ("shard", pa.int32()),
    ("config_id", pa.string()),
    ("family", pa.string()),
    ("cost", pa.int16()),
    ("prompt_tokens", pa.int32()),
]
GENERATIONS_SCHEMA = pa.schema([
    *SCORED_ROW_FIELDS,
    ("prompt_truncated", pa.bool_()),
    ("gen_tokens", pa.int32()),
    ("finish_reason", pa.string()),
    ("output", pa.string()),
    ("reference", pa.string()),
    *((name, pa.float64()) for name in SCORE_COLUMNS),
    ("layers_per_token", pa.float64()),
])


def generations_schema(metric_columns: Sequence[str] = ()) -> pa.Schema:
    """The generation rows' schema: GENERATIONS_SCHEMA, then a run's task-dependent metric columns (float64,
    named in run.json's `metric_columns`; none for a plain ROUGE run)."""
    return pa.schema([*GENERATIONS_SCHEMA, *((name, pa.float64()) for name in metric_columns)])


# Multiple-choice rows (pipeline.generation.choice_task): per choice its summed log-likelihood after the
# context (nats), its continuation's tokens, and the choice string's characters and UTF-8 bytes; per row the
# predictions and the metrics of pipeline.analysis.metrics. layers_per_token = the configuration's cost.
CHOICES_SCHEMA = pa.schema([
    *SCORED_ROW_FIELDS,
    ("gold", pa.int16()),
    ("loglik", pa.list_(pa.float64())),
    ("choice_tokens", pa.list_(pa.int32())),
    ("choice_chars", pa.list_(pa.int32())),
    ("choice_bytes", pa.list_(pa.int32())),
    ("pred", pa.int16()),
    ("pred_norm", pa.int16()),
    ("acc", pa.float64()),
    ("acc_norm", pa.float64()),
    ("acc_bytes", pa.float64()),
    ("prob_gold", pa.float64()),
    ("layers_per_token", pa.float64()),
])
# The scored rows of each task (tasks.TASKS): the folder of its shard files and their schema.
SCORED_TABLES = {"generate": ("generations", GENERATIONS_SCHEMA), "choice": ("choices", CHOICES_SCHEMA)}
CONFIGS_SCHEMA = pa.schema([
    ("config_id", pa.string()),
    ("family", pa.string()),
    ("budget", pa.int16()),
    ("layers", pa.list_(pa.int16())),
    ("cost", pa.int16()),
])


SHARD_METADATA_KEY = b"dynoracle.shard"  # Parquet key-value metadata: {"shard": i, "job": job_identity(run.json)}
_JOB_KEYS = ("identity", "scoring", "dataset_fingerprint", "model_fingerprint", "dtype", "configs_fingerprint")
# Keys a shard or run.json written before they existed may lack; then the others (which decided the rows) are compared.
_LATER_KEYS = ("configs_fingerprint",)
# The temporary files `write_atomic` makes for the files a run writes (`.<name>.<random>.tmp`).
OWN_TEMP = re.compile(r"\.(run\.json|configs\.parquet)\.[A-Za-z0-9_]+\.tmp")  # in the run folder
OWN_SHARD_TEMP = re.compile(r"\.shard=\d{5}\.parquet\.[A-Za-z0-9_]+\.tmp")  # in a task folder


class RunLocked(RuntimeError):
    """Another live process holds the run folder."""


class ShardProblem(ValueError):
    """A shard file that cannot be used: `foreign` when it belongs to another job, else damaged."""

    def __init__(self, path: RunPath, reason: str, foreign: bool = False):
        super().__init__(f"{path}: {reason}")
        self.path, self.reason, self.foreign = path, reason, foreign


def job_identity(record: Mapping[str, Any]) -> dict[str, Any]:
    """What decides a run's rows (job fields, data, model weights, dtype), as run.json records it."""
    return {key: record.get(key) for key in _JOB_KEYS}


def _differing(a: Mapping[str, Any], b: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Dotted names of the fields where two identities differ (nested tables walked)."""
    names = []
    for key in sorted(set(a) | set(b)):
        x, y = a.get(key), b.get(key)
        if isinstance(x, Mapping) and isinstance(y, Mapping):
            names += _differing(x, y, f"{prefix}{key}.")
        elif x != y:
            names.append(f"{prefix}{key}")
    return names


def read_shard(path: RunPath, shard: int, job: Mapping[str, Any], schema: pa.Schema | None = None) -> pa.Table:
    """Read one shard file with page checksums verified and check it is shard `shard` of the job `job`.

    `schema`: the task's exact schema (default: the generations').

    Raises ShardProblem (damaged: unreadable, 0 bytes, other columns, no identity; foreign: another job's
    identity or another shard's index).
    """
    try:
        table = read_parquet(path)
    except (OSError, ValueError, pa.ArrowException) as exc:  # ValueError: e.g. footer metadata that is not UTF-8
        reason = "0 bytes" if path.is_file() and path.stat().st_size == 0 else str(exc).splitlines()[0][:120]
        raise ShardProblem(path, f"unreadable ({reason})") from None
    if not table.schema.equals(schema or GENERATIONS_SCHEMA, check_metadata=False):
        raise ShardProblem(path, "unexpected columns or types")
    raw = (table.schema.metadata or {}).get(SHARD_METADATA_KEY)
    try:
        stamp = json.loads(raw) if raw else None
    except ValueError:  # not JSON, or not even UTF-8 (a damaged footer)
        raise ShardProblem(path, "unreadable (its identity metadata is damaged)") from None
    if not isinstance(stamp, dict) or not isinstance(stamp.get("job"), dict):
        raise ShardProblem(path, "carries no job identity (written by an older dynoracle?)")
    unrecorded = {k for k in _LATER_KEYS if stamp["job"].get(k) is None or job.get(k) is None}
    differ = _differing({k: v for k, v in stamp["job"].items() if k not in unrecorded},
                        {k: v for k, v in job.items() if k not in unrecorded})
    if differ:
        raise ShardProblem(path, f"belongs to another job ({', '.join(differ[:4])} differ)", foreign=True)
    if stamp.get("shard") != shard or set(table.column("shard").to_pylist()) - {shard}:
        raise ShardProblem(path, f"holds shard {stamp.get('shard')}, not shard {shard}", foreign=True)
    return table


def shard_table(shard: int, examples: list[Example], configs: list[SkipConfig],
                generations: list[list[Generation]], scores: dict[str, list[float]],
                metric_columns: Sequence[str] = ()) -> pa.Table:
    """The rows of one shard, example-major then in configuration order; `scores` is flat in that order and
    holds SCORE_COLUMNS and the run's `metric_columns`."""
    rows = [(ex, cfg, gen) for ex, per_cfg in zip(examples, generations) for cfg, gen in zip(configs, per_cfg)]
    columns = {
        "seq_id": [ex.seq_id for ex, _, _ in rows],
        "shard": [shard] * len(rows),
        "config_id": [cfg.config_id for _, cfg, _ in rows],
        "family": [cfg.family for _, cfg, _ in rows],
        "cost": [cfg.cost for _, cfg, _ in rows],
        "prompt_tokens": [ex.prompt_tokens for ex, _, _ in rows],
        "prompt_truncated": [ex.prompt_truncated for ex, _, _ in rows],
        "gen_tokens": [gen.gen_tokens for _, _, gen in rows],
        "finish_reason": [gen.finish_reason for _, _, gen in rows],
        "output": [gen.text for _, _, gen in rows],
        "reference": [ex.reference for ex, _, _ in rows],
        **{name: scores[name] for name in SCORE_COLUMNS},
        "layers_per_token": [gen.layers_per_token for _, _, gen in rows],
        **{name: scores[name] for name in metric_columns},
    }
    return pa.Table.from_pydict(columns, schema=generations_schema(metric_columns))


def write_shard(path: RunPath, shard: int, table: pa.Table, job: Mapping[str, Any]) -> None:
    """Write a shard file atomically, stamped with its index and its job's identity (see `read_shard`)."""
    stamp = json.dumps({"shard": shard, "job": dict(job)}, sort_keys=True, default=str).encode()
    write_parquet(table.replace_schema_metadata({**(table.schema.metadata or {}), SHARD_METADATA_KEY: stamp}), path)


def configs_table(configs: list[SkipConfig]) -> pa.Table:
    return pa.Table.from_pylist([cfg.to_dict() for cfg in configs], schema=CONFIGS_SCHEMA)


def configs_fingerprint(table: pa.Table) -> str:
    """A hash of configs.parquet's rows (ids, families, budgets, layers, costs), as run.json and every shard
    record it: an edited configs.parquet no longer matches (`pipeline.run.verify`)."""
    rows = table.select(CONFIGS_SCHEMA.names).to_pylist()
    return hashlib.sha256(json.dumps(rows, sort_keys=True).encode()).hexdigest()[:16]


class RunDir:
    """The files of one run folder, and the checks that make reruns safe."""

    def __init__(self, root: str | RunPath):
        self.root = locate(root)
        self.generations = self.root / "generations"
        self.run_json = self.root / "run.json"
        self.configs = self.root / "configs.parquet"

    def shard_path(self, shard: int) -> RunPath:
        return self.generations / f"shard={shard:05d}.parquet"

    def listed_shards(self, folder: str) -> set[str]:
        """Names of the shard files in a task folder (e.g. generations), from one listing (one request on a store)."""
        where = self.root / folder
        return {path.name for path in where.glob("shard=*.parquet")} if where.is_dir() else set()

    @contextmanager
    def lock(self) -> Iterator[None]:
        """Hold an exclusive flock on `.lock` while a run writes here; the OS drops it if the process dies.

        `.lock` names the holder's pid while it is held; on release it is emptied and gets back its former
        modification time, so a run that was refused (another job's folder, say) leaves the folder's bytes as
        they were. A folder this call created itself (an exclusive mkdir) is removed again if the run wrote
        nothing into it (it failed early, say on reaching the cluster); a run that did not get the lock never
        removes anything. A symbolic link as the run folder is refused (its files would land elsewhere).
        An object store has no flock: see `_store_lock`.
        """
        if isinstance(self.root, StorePath):
            with _store_lock(self.root):
                yield
            return
        refuse_symlink(self.root)
        self.root.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.root.mkdir()
            created = True
        except FileExistsError:
            created = False
        lock = self.root / ".lock"
        fd, held = None, None
        try:
            try:
                fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
                raise RunLocked(f"run folder {self.root} is in use by another dynoracle run (pid {holder})") from None
            held = os.fstat(fd)
            try:
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            except OSError as exc:  # a full disk: say which file
                raise OSError(f"cannot write {lock}: {os.strerror(exc.errno)}") from None
            yield
        finally:
            if held is not None:
                with suppress(OSError):
                    os.ftruncate(fd, 0)
                    os.utime(fd, ns=(held.st_atime_ns, held.st_mtime_ns))
                if created:
                    self._remove_if_unused(lock)
            if fd is not None:
                os.close(fd)

    def _remove_if_unused(self, lock: Path) -> None:
        """Remove the folder `lock` created if the run left nothing in it but the lock and an empty generations/
        (called while the lock is still held, so no other run is inside)."""
        names = {p.name for p in self.root.iterdir()}
        if not names <= {lock.name, self.generations.name}:
            return
        with suppress(OSError):  # another run may have just opened a new lock file here
            if self.generations.is_dir():
                self.generations.rmdir()
            lock.unlink(missing_ok=True)
            self.root.rmdir()

    def read_run_json(self) -> dict[str, Any] | None:
        if not self.run_json.is_file():
            return None
        try:
            return json.loads(self.run_json.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"{self.run_json} is unreadable ({exc}); remove it or choose another --out") from None

    def remove_stale_temp_files(self) -> int:
        """Delete half-written files a killed run left behind in the folder and its task folders (we hold the lock).

        Only temporary files of the names a run writes are touched; any other `.*.tmp` is not ours.
        """
        folders = [p for p in self.root.iterdir() if p.is_dir()] if self.root.is_dir() else []
        stale = [p for folder, pattern in [(self.root, OWN_TEMP), *((f, OWN_SHARD_TEMP) for f in folders)]
                 for p in folder.iterdir() if pattern.fullmatch(p.name) and p.is_file()]
        for path in stale:
            path.unlink(missing_ok=True)
        return len(stale)


def table_problem(path: RunPath, schema: pa.Schema, shard: int, key_columns: tuple[str, ...],
                  expected: set[tuple], job: Mapping[str, Any]) -> str | None:
    """Why a shard file must be (re)computed ('missing', 'unreadable ...', ...), or None when it is whole.

    Whole means: readable with page checksums verified (`read_shard`: exactly `schema`, shard `shard` of
    the job `job`), and one row per key tuple of `expected` (over `key_columns`), no other rows. Raises
    ShardProblem when the file belongs to another job: that is the user's data, not ours to delete.
    """
    if not path.is_file():
        return "missing"
    try:
        table = read_shard(path, shard, job, schema)
    except ShardProblem as problem:
        if problem.foreign:
            raise
        return problem.reason
    if table.num_rows != len(expected):
        return f"{table.num_rows} rows, expected {len(expected)}"
    found = set(zip(*(table.column(name).to_pylist() for name in key_columns)))
    if found != expected:
        return "rows of other sequences or configurations"
    return None


def refuse_symlink(root: Path) -> None:
    """A local run folder must not be a symbolic link (dangling or not): its files would be written wherever
    it points. Raises ValueError naming the link and its target."""
    if root.is_symlink():
        raise ValueError(f"run folder {root} is a symbolic link (to {os.readlink(root)}); give the real folder "
                         "as --out, or remove the link")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextmanager
def _store_lock(root: StorePath) -> Iterator[None]:
    """The single-writer rule of a run folder in an object store, which has no flock.

    The driver creates `.lock` (host, pid, a fresh token) before anything else and deletes it when it ends.
    A run refuses to start while `.lock` names another host, or a live process on this host; a lock left
    by a process of this host that no longer exists (a killed driver) is taken over. On S3 (with boto3) the
    lock is created with a conditional write (`If-None-Match: *`; a takeover `If-Match` the stale lock's
    ETag), so of two drivers starting together exactly one gets it. Stores without conditional writes
    (gs://, or S3 without boto3) fall back to write-then-read-back, which narrows the window but cannot
    close it: start one driver per folder there. A driver killed on another host leaves its `.lock`
    behind: delete it once that run is surely gone.
    """
    lock = root / ".lock"
    mine = {"host": socket.gethostname(), "pid": os.getpid(), "token": uuid.uuid4().hex,
            "since": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    body = (json.dumps(mine) + "\n").encode()
    created = _put_if(lock, body, None)
    if created is None:  # no conditional write on this store
        holder = _lock_holder(lock)
        if holder is not None and not _stale(holder):
            raise _in_use(root, lock, holder)
        lock.write_bytes(body)
        if (_lock_holder(lock) or {}).get("token") != mine["token"]:
            raise RunLocked(f"run folder {root} is in use by another dynoracle run that started at the same time")
    elif not created:
        holder, etag = _holder_and_etag(lock)  # one read: the ETag is that of the content judged stale
        if holder is None or etag is None or not _stale(holder) or not _put_if(lock, body, etag):
            raise _in_use(root, lock, holder or {})
    try:
        yield
    finally:
        with suppress(OSError):
            if (_lock_holder(lock) or {}).get("token") == mine["token"]:
                lock.unlink()


def _stale(holder: Mapping[str, Any]) -> bool:
    """A lock left by a process of this host that no longer exists."""
    pid = holder.get("pid")
    return holder.get("host") == socket.gethostname() and isinstance(pid, int) and not _alive(pid)


def _in_use(root: StorePath, lock: StorePath, holder: Mapping[str, Any]) -> RunLocked:
    return RunLocked(f"run folder {root} is in use by another dynoracle run (pid {holder.get('pid')} on "
                     f"{holder.get('host')} since {holder.get('since')}); if that run is gone, delete {lock}")


def _s3_client_and_key(lock: StorePath) -> tuple[Any, str, str] | None:
    """A boto3 S3 client (endpoint and credentials from the AWS_* variables pyarrow reads too), bucket and key."""
    if lock.scheme != "s3":
        return None
    try:
        import boto3
    except ImportError:
        return None
    bucket, _, key = lock.path.partition("/")
    return boto3.client("s3"), bucket, key


def _put_if(lock: StorePath, body: bytes, etag: str | None) -> bool | None:
    """Write `lock` only if it does not exist (`etag` None) or is still the version `etag`: True if written,
    False if the condition failed, None where the store offers no conditional write. OSError otherwise."""
    found = _s3_client_and_key(lock)
    if found is None:
        return None
    client, bucket, key = found
    condition = {"IfNoneMatch": "*"} if etag is None else {"IfMatch": etag}
    try:
        client.put_object(Bucket=bucket, Key=key, Body=body, **condition)
    except client.exceptions.ClientError as exc:
        code = exc.response.get("Error", {}).get("Code", "")
        if code in ("PreconditionFailed", "ConditionalRequestConflict", "NoSuchKey", "412", "409"):
            return False
        raise OSError(f"cannot write {lock}: {code or exc}") from None
    return True


def _holder_and_etag(lock: StorePath) -> tuple[dict[str, Any] | None, str | None]:
    """The S3 lock object's content ({} when unreadable) and ETag, from one GET; (None, None) when it is gone."""
    client, bucket, key = _s3_client_and_key(lock)
    try:
        answer = client.get_object(Bucket=bucket, Key=key)
    except client.exceptions.ClientError:
        return None, None
    try:
        holder = json.loads(answer["Body"].read())
    except ValueError:
        holder = {}
    return (holder if isinstance(holder, dict) else {}), answer["ETag"]


def _lock_holder(lock: StorePath) -> dict[str, Any] | None:
    """The lock object's content; None when there is none; {} when it is unreadable (then it blocks)."""
    try:
        holder = json.loads(lock.read_text())
    except FileNotFoundError:
        return None
    except (ValueError, OSError):
        return {}
    return holder if isinstance(holder, dict) else {}
