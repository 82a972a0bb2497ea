"""The executor: runs one kind of shard task over a run folder's shards on Ray actors, resumably.

As in datatrove, a pipeline step (a `ShardTask`: generation, hidden-state similarity, prompt features)
says what one shard's output table is and how to compute it from the loaded model; the executor owns
everything else: starting one `ShardWorker` actor per GPU (or CPU slot), skipping shards whose file is
present and valid (a shard file is its own completion marker), handing the rest out one shard per idle
worker, writing each returned table atomically, and reporting progress.

Faults: actors restart on their own (`max_restarts=-1`) when their process dies; the shard they were
running is put back in the queue and given to the next idle worker (at most MAX_ATTEMPTS tries per
shard). A killed driver leaves whole shard files only, so rerunning the same command redoes just the
missing ones. Shard files are written only by the driver, under the run folder's lock.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from abc import ABC, abstractmethod
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Iterator

import pyarrow as pa
import ray
from ray.exceptions import ActorDiedError, RayActorError, RayTaskError

from pipeline.atomic import write_parquet
from pipeline.data import Example
from pipeline.job import JobSpec
from pipeline.location import RunPath
from pipeline.models import LoadedModel
from pipeline.progress import RunProgress
from pipeline.rundir import RunDir, table_problem
from pipeline.worker import ShardWorker

MAX_ATTEMPTS = 3


class RunError(RuntimeError):
    """A run cannot go on (a worker cannot start, a shard keeps failing); the message is one line."""


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class ShardTask(ABC):
    """One kind of per-shard work. Instances are pickled to the workers, so keep them small and plain.

    `folder` is the task's subfolder of the run folder (one `shard=NNNNN.parquet` per shard), `schema`
    its table's exact schema, and `key_columns` the columns whose value tuples identify a row: a shard file
    is valid when its rows' keys are exactly `expected_keys(examples)`, each once.
    """

    folder: ClassVar[str]
    schema: ClassVar[pa.Schema]
    key_columns: ClassVar[tuple[str, ...]]

    @abstractmethod
    def expected_keys(self, examples: list[Example]) -> set[tuple]:
        """The key tuples a complete shard of these examples holds."""

    @abstractmethod
    def run(self, lm: LoadedModel, shard: int, examples: list[Example],
            on_tokens: Callable[[int], None] | None = None) -> pa.Table:
        """Compute the shard's table (runs inside a worker, next to the model); a task that generates tells
        `on_tokens(n)` about every n tokens as they come, for the live progress display."""

    def tokens(self, table: pa.Table) -> int:
        """Tokens the shard generated, for the progress line's tokens/s (0 for tasks that generate none)."""
        return 0

    def shard_path(self, run: RunDir, shard: int) -> RunPath:
        return run.root / self.folder / f"shard={shard:05d}.parquet"

    def shard_problem(self, run: RunDir, shard: int, examples: list[Example]) -> str | None:
        """Why the shard's file cannot be trusted ('missing', 'unreadable: ...', ...), or None when it is whole."""
        return table_problem(self.shard_path(run, shard), self.schema, shard, self.key_columns,
                             self.expected_keys(examples))


@dataclass
class ExecSummary:
    shards: int
    skipped: int
    computed: int
    tokens: int
    seconds: float  # from the first shard handed out to the last one written


@dataclass(frozen=True)
class WorkerPlan:
    """How many worker actors, and what each one reserves."""

    count: int
    device: str
    num_cpus: float
    num_gpus: float
    threads: int | None

    def describe(self) -> str:
        if self.device == "cuda":
            return f"{self.count} GPU worker{'s' if self.count > 1 else ''}"
        return f"{self.count} CPU worker{'s' if self.count > 1 else ''} x {self.threads} thread{'s' if self.threads > 1 else ''}"


def plan_workers(spec: JobSpec, cluster: dict[str, float]) -> WorkerPlan:
    """One worker per GPU when there are GPUs (or device=cuda asks for them), else `workers` CPU slots.

    device=cuda trusts `workers` even if the GPU nodes are not up yet, so an autoscaler can add them.
    """
    gpus, cpus = int(cluster.get("GPU", 0)), int(cluster.get("CPU", 0))
    if spec.device == "cuda" or (spec.device == "auto" and gpus):
        count = spec.workers or gpus
        if count < 1:
            raise ValueError("device cuda, but the cluster has no GPUs yet: set workers to the number of GPUs to use")
        if spec.device == "auto":
            count = min(count, gpus)
        return WorkerPlan(count, "cuda", 1, 1, None)
    count = spec.workers or 1
    if count > cpus:
        raise ValueError(f"{count} CPU workers need at least {count} CPUs; the cluster has {cpus}")
    share = cpus // count
    return WorkerPlan(count, "cpu", share, 0, share)


def one_line(exc: BaseException) -> str:
    """The original error behind a Ray failure, as 'Type: first line', without Ray's traceback framing."""
    cause = exc
    while True:
        inner = getattr(cause, "cause", None) or next(
            (arg for arg in getattr(cause, "args", ()) if isinstance(arg, BaseException)), None)
        if inner is None or inner is cause:
            break
        cause = inner
    lines = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {lines[0]}" if lines else type(cause).__name__


class ShardDispatcher:
    """Dynamic dispatch: each worker runs one shard at a time; a shard whose worker dies goes back in the queue."""

    def __init__(self, workers: list[Any], pids: list[int]):
        self.workers = workers
        self.pids = pids  # each worker's process id when it was first started
        self.running: dict[Any, tuple[int, int, float]] = {}  # future -> (worker, shard, started)

    def busy(self) -> dict[int, int]:
        """shard -> pid of the worker running it."""
        return {shard: self.pids[worker] for worker, shard, _ in self.running.values()}

    def run(self, todo: list[int], submit: Callable[[Any, int], Any], done: Callable[[int, int, Any, float], None],
            on_dispatch: Callable[[ShardDispatcher], None] | None = None) -> None:
        """Run every shard of `todo` via `submit(actor, shard)`, calling `done(shard, worker, result, seconds)`.

        `on_dispatch` is called after each completed shard, once the freed worker has its next shard.
        """
        queue, attempts, idle = deque(todo), {shard: 0 for shard in todo}, deque(range(len(self.workers)))
        completed = False
        while queue or self.running:
            while queue and idle:
                worker, shard = idle.popleft(), queue.popleft()
                attempts[shard] += 1
                self.running[submit(self.workers[worker], shard)] = (worker, shard, time.monotonic())
            if completed and on_dispatch is not None:
                on_dispatch(self)
            ready, _ = ray.wait(list(self.running), num_returns=1)
            worker, shard, started = self.running.pop(ready[0])
            completed = False
            try:
                result = ray.get(ready[0])
            except ActorDiedError as exc:  # with max_restarts=-1 only a failing __init__ ends an actor for good
                raise RunError(f"worker {worker} failed: {one_line(exc)}") from None
            except RayTaskError as exc:  # an exception in our code: deterministic, so no retry
                raise RunError(f"shard {shard} failed on worker {worker}: {one_line(exc)}") from None
            except RayActorError as exc:  # the process died mid-shard; Ray restarts it
                if attempts[shard] >= MAX_ATTEMPTS:
                    raise RunError(f"shard {shard} failed {attempts[shard]} times, last: {one_line(exc)}") from None
                log(f"worker {worker} died during shard {shard:05d} ({type(exc).__name__}); "
                    "shard requeued, worker restarting")
                queue.appendleft(shard)
            else:
                done(shard, worker, result, time.monotonic() - started)
                completed = True
            idle.append(worker)


@contextmanager
def ray_session(address: str | None) -> Iterator[None]:
    """Join a cluster (`address`, or RAY_ADDRESS) or start a private local Ray; reuse one already joined."""
    if ray.is_initialized():
        yield
        return
    quiet = {"log_to_driver": False, "logging_level": logging.WARNING}  # worker logs: /tmp/ray/session_latest/logs
    if address or os.environ.get("RAY_ADDRESS"):
        ray.init(address=address, **quiet)
    else:
        ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, **quiet)  # not a `ray start` one
    try:
        yield
    finally:
        ray.shutdown()


@contextmanager
def start_workers(spec: JobSpec) -> Iterator[tuple[list[Any], list[dict]]]:
    """Start the job's worker actors in the joined Ray, wait until each has its model loaded, kill them at the end."""
    plan = plan_workers(spec, ray.cluster_resources())
    log(f"starting {plan.describe()} with {spec.model} (dtype {spec.dtype})")
    actor = ray.remote(ShardWorker).options(num_cpus=plan.num_cpus, num_gpus=plan.num_gpus,
                                            max_restarts=-1, max_task_retries=0)
    workers = [actor.remote(spec, plan.device, plan.threads) for _ in range(plan.count)]
    try:
        try:
            infos = ray.get([worker.info.remote() for worker in workers])
        except RayActorError as exc:
            raise RunError(f"a worker failed to start: {one_line(exc)}") from None
        if len({(info["fingerprint"], info["dtype"]) for info in infos}) > 1:
            raise RunError("workers loaded different weights or dtypes (mixed hardware with dtype auto?); "
                           "set --dtype explicitly")
        yield workers, infos
    finally:
        for worker in workers:
            ray.kill(worker)


def execute(task: ShardTask, run: RunDir, shards: list[list[Example]], workers: list[Any], infos: list[dict],
            on_dispatch: Callable[[ShardDispatcher], None] | None = None) -> ExecSummary:
    """Compute every shard of `task` whose file is missing or invalid; the caller holds the run folder's lock.

    `on_dispatch(dispatcher)` runs after each finished shard (tests use it to kill a busy worker).
    """
    todo = _shards_to_compute(task, run, shards)
    start = time.monotonic()
    dispatcher = ShardDispatcher(workers, [info["pid"] for info in infos])
    progress = RunProgress(len(shards), len(shards) - len(todo), sum(len(shards[i]) for i in todo))
    task_ref = ray.put(task)

    def submit(worker: Any, shard: int) -> Any:
        return worker.run.remote(task_ref, shard, shards[shard], progress.counter)

    def done(shard: int, worker: int, table: pa.Table, seconds: float) -> None:
        write_parquet(table, task.shard_path(run, shard))
        progress.shard_done(shard, worker, len(shards[shard]), task.tokens(table), seconds)

    with progress:
        dispatcher.run(todo, submit, done, on_dispatch)
    return ExecSummary(len(shards), len(shards) - len(todo), len(todo), progress.tokens, time.monotonic() - start)


def _shards_to_compute(task: ShardTask, run: RunDir, shards: list[list[Example]]) -> list[int]:
    """Indices of shards with no valid file; invalid files are deleted (they will be rewritten whole)."""
    todo, listed = [], run.listed_shards(task.folder)  # one listing, not a request per shard on a store
    for index, examples in enumerate(shards):
        listed_here = task.shard_path(run, index).name in listed
        problem = task.shard_problem(run, index, examples) if listed_here else "missing"
        if problem is None:
            continue
        if problem != "missing":
            log(f"{task.folder} shard {index:05d}: {problem}; removed, will recompute")
            task.shard_path(run, index).unlink()
        todo.append(index)
    log(f"{task.folder}: {len(shards) - len(todo)} of {len(shards)} shards already complete (skipped), "
        f"computing {len(todo)}")
    return todo
