"""`dynoracle run`: the Ray driver that turns a job into a run folder of shard files, resumably.

Steps: read and shard the dataset -> lock the run folder -> check it holds no other job -> start one
generator actor per GPU (or CPU slot) -> skip shards whose file is present and valid -> hand out the
rest one shard per idle worker -> write each returned shard atomically -> record the run in run.json.

Faults: actors restart on their own (`max_restarts=-1`) when their process dies; the shard they were
running is put back in the queue and given to the next idle worker (at most MAX_ATTEMPTS tries per
shard). A killed driver leaves whole shard files only, so rerunning the same command redoes just the
missing ones. Shard files are written only by this process, under the folder's lock.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import logging
import os
import platform
import subprocess
import sys
import time
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator

import ray
from ray.exceptions import ActorDiedError, RayActorError, RayTaskError

from pipeline.configs import SkipConfig, build_configs
from pipeline.data import Example, load_examples, shard_examples
from pipeline.job import JobSpec
from pipeline.location import RunPath
from pipeline.models import load_tokenizer
from pipeline.progress import RunProgress
from pipeline.atomic import write_json, write_parquet
from pipeline.rundir import RunDir, configs_table
from pipeline.worker import ShardGenerator

MAX_ATTEMPTS = 3


class RunError(RuntimeError):
    """A run cannot go on (a worker cannot start, a shard keeps failing); the message is one line."""


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@dataclass
class RunSummary:
    run_dir: RunPath
    shards: int
    skipped: int
    computed: int
    rows: int
    gen_tokens: int
    generate_s: float  # from the first shard handed out to the last one written
    elapsed_s: float = 0.0  # the whole run, start-up included


@dataclass(frozen=True)
class WorkerPlan:
    """How many generator actors, and what each one reserves."""

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


def dataset_fingerprint(examples: list[Example]) -> str:
    """A hash of what the model sees and is scored against: tells a changed data file apart from a rerun."""
    digest = hashlib.sha256()
    for ex in examples:
        digest.update(f"{ex.seq_id}\0{','.join(map(str, ex.prompt_ids))}\0{ex.reference}\0".encode())
    return digest.hexdigest()[:16]


def _versions() -> dict[str, str]:
    import pyarrow
    import torch
    import transformers

    return {"dynoracle": importlib.metadata.version("dynoracle"), "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "ray": ray.__version__, "pyarrow": pyarrow.__version__}


def _git_sha() -> str | None:
    """The commit of the checkout the package runs from; None for an installed package (even one whose
    site-packages sits inside some other repository)."""
    checkout = Path(__file__).resolve().parents[1]
    try:
        out = subprocess.run(["git", "rev-parse", "--show-toplevel", "HEAD"], cwd=checkout, capture_output=True,
                             text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    lines = out.stdout.split()
    return lines[1] if len(lines) == 2 and Path(lines[0]).resolve() == checkout else None


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _check_same(previous: dict[str, Any] | None, key: str, value: Any, run_dir: Path) -> None:
    """Refuse to mix rows of two different jobs in one folder."""
    if previous is None or previous.get(key) in (None, value):
        return
    if isinstance(value, dict):
        old = previous[key]
        differing = sorted(k for k in set(value) | set(old) if value.get(k) != old.get(k))
        what = ", ".join(differing)
    else:
        what = key.replace("_", " ")
    raise ValueError(f"run folder {run_dir} holds a different job ({what} differ); "
                     f"choose another --name or --out, or remove the folder")


def _one_line(exc: BaseException) -> str:
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
                raise RunError(f"worker {worker} failed: {_one_line(exc)}") from None
            except RayTaskError as exc:  # an exception in our code: deterministic, so no retry
                raise RunError(f"shard {shard} failed on worker {worker}: {_one_line(exc)}") from None
            except RayActorError as exc:  # the process died mid-shard; Ray restarts it
                if attempts[shard] >= MAX_ATTEMPTS:
                    raise RunError(f"shard {shard} failed {attempts[shard]} times, last: {_one_line(exc)}") from None
                log(f"worker {worker} died during shard {shard:05d} ({type(exc).__name__}); "
                    "shard requeued, worker restarting")
                queue.appendleft(shard)
            else:
                done(shard, worker, result, time.monotonic() - started)
                completed = True
            idle.append(worker)


@contextmanager
def _ray(address: str | None) -> Iterator[None]:
    """Join a cluster (`address`, or RAY_ADDRESS) or start a private local Ray; reuse one already joined."""
    if ray.is_initialized():
        yield
        return
    quiet = {"log_to_driver": False, "logging_level": logging.WARNING}  # worker logs: /tmp/ray/session_latest/logs
    if address or os.environ.get("RAY_ADDRESS"):
        ray.init(address=address, **quiet)
    else:
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, **quiet)
    try:
        yield
    finally:
        ray.shutdown()


@contextmanager
def _generators(spec: JobSpec, plan: WorkerPlan) -> Iterator[tuple[list[Any], list[dict]]]:
    """Start the generator actors, wait until each has its model loaded, and kill them at the end."""
    actor = ray.remote(ShardGenerator).options(num_cpus=plan.num_cpus, num_gpus=plan.num_gpus,
                                               max_restarts=-1, max_task_retries=0)
    workers = [actor.remote(spec, plan.device, plan.threads) for _ in range(plan.count)]
    try:
        try:
            infos = ray.get([worker.info.remote() for worker in workers])
        except RayActorError as exc:
            raise RunError(f"a worker failed to start: {_one_line(exc)}") from None
        yield workers, infos
    finally:
        for worker in workers:
            ray.kill(worker)


def run_job(spec: JobSpec, address: str | None = None,
            on_dispatch: Callable[[ShardDispatcher], None] | None = None) -> RunSummary:
    """Generate every missing shard of the job's run folder; see the module docstring for the steps.

    `on_dispatch(dispatcher)` runs after each finished shard (tests use it to kill a busy worker).
    """
    start = time.monotonic()
    run = RunDir(spec.run_dir)
    examples = load_examples(spec.dataset, load_tokenizer(spec.model))  # before the folder exists: bad data
    shards = shard_examples(examples, spec.shard_size)                  # leaves no empty run folder behind
    data_print = dataset_fingerprint(examples)
    with run.lock():
        previous = run.read_run_json()
        _check_same(previous, "identity", spec.identity(), run.root)
        _check_same(previous, "dataset_fingerprint", data_print, run.root)
        if run.remove_stale_temp_files():
            log("removed half-written files of an interrupted run")
        with _ray(address):
            plan = plan_workers(spec, ray.cluster_resources())
            log(f"{spec.name}: {len(examples)} sequences in {len(shards)} shards; starting {plan.describe()} "
                f"with {spec.model} (dtype {spec.dtype})")
            with _generators(spec, plan) as (workers, infos):
                if len({(info["fingerprint"], info["dtype"]) for info in infos}) > 1:
                    raise RunError("workers loaded different weights or dtypes (mixed hardware with dtype auto?); "
                                   "set --dtype explicitly")
                num_layers, model_print, dtype = infos[0]["num_layers"], infos[0]["fingerprint"], infos[0]["dtype"]
                log(f"model loaded: {num_layers} layers, {dtype}")
                _check_same(previous, "dtype", dtype, run.root)
                _check_same(previous, "model_fingerprint", model_print, run.root)
                configs = spec.select_configs(build_configs(num_layers, spec.families, spec.rls_seeds))
                record = {"job": spec.to_dict(), "identity": spec.identity(), "model_fingerprint": model_print,
                          "dtype": dtype, "num_layers": num_layers, "dataset_fingerprint": data_print, "sequences": len(examples),
                          "configs": len(configs), "shards": len(shards), "versions": _versions(),
                          "git_sha": _git_sha(), "started": _now(), "finished": None, "workers": infos}
                write_parquet(configs_table(configs), run.configs)
                write_json(record, run.run_json)
                todo = _shards_to_compute(run, shards, configs)
                summary = _dispatch(run, workers, infos, shards, configs, todo, on_dispatch)
        write_json({**record, "finished": _now(), "rows": summary.rows}, run.run_json)
    summary.elapsed_s = time.monotonic() - start
    return summary


def _shards_to_compute(run: RunDir, shards: list[list[Example]], configs: list[SkipConfig]) -> list[int]:
    """Indices of shards with no valid file; invalid files are deleted (they will be rewritten whole)."""
    todo, listed = [], run.listed_shards()
    for index, examples in enumerate(shards):
        problem = run.shard_problem(index, examples, configs) if run.shard_path(index).name in listed else "missing"
        if problem is None:
            continue
        if problem != "missing":
            log(f"shard {index:05d}: {problem}; removed, will recompute")
            run.shard_path(index).unlink()
        todo.append(index)
    log(f"shards: {len(shards) - len(todo)} of {len(shards)} already complete (skipped), computing {len(todo)}")
    return todo


def _dispatch(run: RunDir, workers: list[Any], infos: list[dict], shards: list[list[Example]],
              configs: list[SkipConfig], todo: list[int],
              on_dispatch: Callable[[ShardDispatcher], None] | None) -> RunSummary:
    start = time.monotonic()
    dispatcher = ShardDispatcher(workers, [info["pid"] for info in infos])
    progress = RunProgress(len(shards), len(shards) - len(todo), sum(len(shards[i]) for i in todo))
    configs_ref = ray.put(configs)

    def submit(worker: Any, shard: int) -> Any:
        return worker.run_shard.remote(shard, shards[shard], configs_ref, progress.counter)

    def done(shard: int, worker: int, table: Any, seconds: float) -> None:
        write_parquet(table, run.shard_path(shard))
        tokens = int(table.column("gen_tokens").to_numpy().sum())
        progress.shard_done(shard, worker, len(shards[shard]), tokens, seconds)

    with progress:
        dispatcher.run(todo, submit, done, on_dispatch)
    elapsed = time.monotonic() - start
    return RunSummary(run.root, len(shards), len(shards) - len(todo), len(todo),
                      sum(len(s) for s in shards) * len(configs), progress.tokens, elapsed)
