"""What the readers (`reduce`, `report`, `query`) may read of a run folder: exactly its own, verified files.

The run's own shard files are `<scored rows>/shard=00000.parquet` ... up to the count in run.json, where the
folder is its task's (`generations/`, or `choices/` for a multiple-choice run: `rundir.SCORED_TABLES`); each is
read back with page checksums verified and must carry the job identity run.json records (`read_shard`).
Anything else in `generations/` (a copy a file manager made, a file of another run) is refused, not read:
it would silently double counts. A run with shard files still missing (being written, or interrupted) is
refused unless the caller asks for a partial reading. The folder may be a path or an object-store URI
(`pipeline.run.location`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from pipeline.run.location import RunPath, read_parquet
from pipeline.run.rundir import (OWN_SHARD_TEMP, SCORED_TABLES, RunDir, ShardProblem, configs_fingerprint, generations_schema,
                                 job_identity, read_shard)
from pipeline.run.tasks import run_task_name

REGENERATE = "rerun the run's `dynoracle run` command to regenerate it"
RERUN = "rerun the run's `dynoracle run` command"


class RunFolderError(ValueError):
    """A run folder readers must not trust as it is; the message is one line naming the file and the fix."""


@dataclass(frozen=True)
class VerifiedRun:
    """A run's record and the shard files a reader may read (all of them unless `partial`)."""

    root: RunPath
    record: dict[str, Any]
    shards: list[RunPath]  # verified shard files, in shard order
    table: str  # the scored rows' folder, and the name `query` gives them: generations or choices
    missing: list[int]  # shard indices without a file (empty unless partial)


def verify_run(run_dir: str | RunPath, partial: bool = False) -> VerifiedRun:
    """Check a run folder before reading it: run.json, configs.parquet and every shard file.

    Raises FileNotFoundError when there is no run folder, RunFolderError for anything damaged, foreign,
    stray or missing (missing shards are allowed when `partial`; then at least one must be present).
    Cost: every shard file is read once in full (its page checksums are only checked that way).
    """
    run = RunDir(run_dir)
    if not run.root.is_dir():
        raise FileNotFoundError(f"run folder {run.root} does not exist")
    if not run.run_json.is_file():
        raise RunFolderError(f"{run.run_json} is missing: {run.root} is not a dynoracle run folder "
                             "(or one written before run.json recorded its shards); run `dynoracle run` into it")
    try:
        record = json.loads(run.run_json.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RunFolderError(f"{run.run_json} is unreadable ({str(exc).splitlines()[0]}); "
                             f"{RERUN}") from None
    count = record.get("shards") if isinstance(record, dict) else None
    if not isinstance(count, int) or isinstance(count, bool) or count < 0:
        raise RunFolderError(f"{run.run_json} does not record the run's shard count; "
                             f"{RERUN}")
    if not run.configs.is_file():
        raise RunFolderError(f"{run.configs} is missing; {REGENERATE}")
    try:
        configs = read_parquet(run.configs)
        printed = configs_fingerprint(configs)
    except (OSError, ValueError, KeyError, pa.ArrowException) as exc:
        raise RunFolderError(f"{run.configs} is damaged ({str(exc).splitlines()[0][:120]}); {REGENERATE}") from None
    if record.get("configs_fingerprint") not in (None, printed):  # None: a run from before the fingerprint
        raise RunFolderError(f"{run.configs} does not hold the configurations run.json records (edited or replaced); "
                             f"{REGENERATE}")

    folder, schema = SCORED_TABLES.get(run_task_name(record), (None, None))
    if folder is None:
        raise RunFolderError(f"{run.run_json} names an unknown task {record.get('task')!r}; run it with a newer dynoracle")
    if folder == "generations":  # with the run's own metric columns (exact match, a user scorer's, ...)
        schema = generations_schema(record.get("metric_columns") or ())
    rows = run.root / folder

    def shard_path(index: int) -> RunPath:
        return rows / run.shard_path(index).name

    owned = {shard_path(i).name for i in range(count)}
    present = sorted(p.name for p in rows.iterdir()) if rows.is_dir() else []
    for name in present:
        if name not in owned and not OWN_SHARD_TEMP.fullmatch(name):
            raise RunFolderError(f"{rows / name} is not one of this run's {count} shard files; "
                                 f"move it out of {rows}")
    missing = [i for i in range(count) if shard_path(i).name not in present]
    if missing and not partial:
        raise RunFolderError(
            f"{run.root} is incomplete: {len(missing)} of {count} shard files missing (first "
            f"{shard_path(missing[0]).name}); finish it with its `dynoracle run` command, or pass --partial")
    if len(missing) == count:
        raise RunFolderError(f"{run.root} has no shard files yet; finish it with its `dynoracle run` command")
    job = job_identity(record)
    shards = []
    for index in range(count):
        if index in missing:
            continue
        path = shard_path(index)
        try:
            read_shard(path, index, job, schema)
        except ShardProblem as problem:
            fix = ("remove it, or move it to its own run folder" if problem.foreign else REGENERATE)
            raise RunFolderError(f"shard file {path} {'' if problem.foreign else 'is damaged: '}{problem.reason}; "
                                 f"{fix}") from None
        shards.append(path)
    return VerifiedRun(run.root, record, shards, missing=missing, table=folder)
