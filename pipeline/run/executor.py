"""The executor: runs one kind of shard task over a run folder's shards on Ray actors, resumably.

As in datatrove, a pipeline step (a `ShardTask`: generation, hidden-state similarity, prompt features)
says what one shard's output table is and how to compute it from the loaded model; the executor owns
everything else: placing and starting one `ShardWorker` actor per GPU (or CPU slot), skipping shards whose
file is present and valid (a shard file is its own completion marker), handing the rest out one shard per
ready worker, writing each returned table atomically, and reporting progress.

Faults. Ray restarts a worker whose process died (`max_restarts=-1`), and re-places the placement-group
bundle of a lost node wherever there is room, so its actor comes back there; the executor requeues the
shard the worker was running (a death is not the shard's failure) and hands it to a worker that has
answered a readiness probe, probing restarting ones with backoff (`WorkerPool`). The run stops with one
line only when a shard's own work raises MAX_ATTEMPTS times, a worker's model fails to load, or no worker
can be placed or started for the job's `start_timeout`. A killed driver leaves whole shard files only,
so rerunning the same command redoes just the missing ones. Shard files are written only by the driver,
under the run folder's lock.

Why this much by hand: `ray.util.ActorPool` hands a shard back to the actor that just died, and
`max_task_retries` ties a shard to its restarting actor while others idle and waits without limit; Ray's
own parts are used where they fit: actor restarts, placement groups (per-node placement with a time
limit, autoscaler demand, re-placement after node loss) and `runtime_env` for the driver's variables.
"""

from __future__ import annotations

import sys
import time
from collections import deque
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import pyarrow as pa
import ray
from ray.exceptions import (
    NodeDiedError,
    ObjectLostError,
    OutOfMemoryError,
    RayActorError,
    RayTaskError,
    WorkerCrashedError,
)
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from pipeline.data.adapters import Example
from pipeline.run.cluster import RaySession, WorkerPlan, alive_nodes, describe_nodes, plan_workers, worker_env
from pipeline.run.job import JobSpec
from pipeline.run.progress import RunProgress
from pipeline.run.rundir import RunDir, ShardProblem, write_shard
from pipeline.run.shard_task import ExecSummary, ShardError, ShardTask
from pipeline.run.worker import ShardWorker

MAX_ATTEMPTS = 3  # tries of a shard whose own work raises
PROBE_FIRST_S, PROBE_MAX_S = 0.5, 8.0  # backoff between readiness probes of a restarting worker
# Failures that mean the worker (its process, its node, or the result it held) is gone, not that the shard failed.
WORKER_LOST = (RayActorError, ObjectLostError, NodeDiedError, OutOfMemoryError, WorkerCrashedError)


class RunError(RuntimeError):
    """A run cannot go on (a worker cannot start, a shard keeps failing); the message is one line."""


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


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


class WorkerPool:
    """The job's worker actors, one per placement-group bundle, and which of them can take a shard now.

    Ray brings a dead actor back by itself (`max_restarts=-1`): in its bundle, and a bundle whose node was
    lost is placed again by Ray wherever the cluster has room. Until a restarted actor has loaded its model,
    calls to it fail at once (ActorUnavailableError), so a lost worker is probed (`info`) with exponential
    backoff and gets no shard before it answers. The pool gives up only when no worker has become ready
    (while starting) or none has been usable (while running) for `timeout` seconds, naming what it asked
    for and what the cluster has.
    """

    def __init__(self, actors: list[Any], plan: WorkerPlan, timeout: float):
        self.actors, self.plan, self.timeout = actors, plan, timeout
        self.infos: list[dict | None] = [None] * len(actors)  # each worker's `info` since its last (re)start
        self.idle: deque[int] = deque()  # ready workers without a shard
        self.probes: dict[Any, int] = {}  # probe future -> worker
        self.backoff: dict[int, tuple[float, float]] = {}  # lost worker -> (time of its next probe, delay after that)
        self.progress_at = time.monotonic()  # starting: a worker became ready; running: some worker was usable
        for worker in range(len(actors)):
            self.probes[actors[worker].info.remote()] = worker

    def lost(self, worker: int) -> None:
        """The worker's process or node died: probe it again after a short wait."""
        self.infos[worker] = None
        self.backoff[worker] = (time.monotonic() + PROBE_FIRST_S, PROBE_FIRST_S)

    def start(self) -> list[dict]:
        """Block until every worker has loaded its model; each worker's `info`.

        Raises RunError when no further worker has become ready for `timeout` seconds.
        """
        while not all(self.infos):
            if time.monotonic() - self.progress_at > self.timeout:
                missing = ", ".join(str(worker) for worker, info in enumerate(self.infos) if info is None)
                raise RunError(f"worker {missing} not ready after {self.timeout:g} s: {self._asked()}")
            ready = len(self.idle)
            self.wait([])
            if len(self.idle) > ready:
                self.progress_at = time.monotonic()
        return list(self.infos)

    def check_usable(self, busy: int) -> None:
        """Raise RunError when no worker has been ready or busy for `timeout` seconds (all lost, none back)."""
        now = time.monotonic()
        if self.idle or busy:
            self.progress_at = now
        elif now - self.progress_at > self.timeout:
            raise RunError(f"no worker could be restarted for {self.timeout:g} s: {self._asked()}")

    def wait(self, running: list[Any]) -> Any | None:
        """Wait for one of the `running` shard futures or a probe; return the finished shard future, or None.

        Returns None at the latest when a backed-off probe is due or `timeout` has passed since `progress_at`.
        """
        now = time.monotonic()
        for worker, (due, _) in list(self.backoff.items()):
            if due <= now and worker not in self.probes.values():
                self.probes[self.actors[worker].info.remote()] = worker
        waits = [due - now for worker, (due, _) in self.backoff.items() if worker not in self.probes.values()]
        waits.append(self.timeout - (now - self.progress_at) + 0.1)  # wake up in time to give up
        futures = running + list(self.probes)
        timeout = max(0.0, min(waits))
        if not futures:
            time.sleep(timeout)
            return None
        ready, _ = ray.wait(futures, num_returns=1, timeout=timeout)
        if not ready:
            return None
        if ready[0] in self.probes:
            self._answered(ready[0])
            return None
        return ready[0]

    def _answered(self, probe: Any) -> None:
        """A probe came back: the worker is ready (and idle), or still restarting (probe later, backing off)."""
        worker = self.probes.pop(probe)
        try:
            info = ray.get(probe)
        except RayActorError as exc:
            if exc.actor_init_failed:  # loading the model raised: every restart would raise again
                raise RunError(f"worker {worker} failed to start: {one_line(exc)}") from None
            _, delay = self.backoff.get(worker, (0.0, PROBE_FIRST_S))
            self.backoff[worker] = (time.monotonic() + delay, min(2 * delay, PROBE_MAX_S))
            return
        known = next((other for other in self.infos if other is not None), None)
        if known is not None and (known["fingerprint"], known["dtype"]) != (info["fingerprint"], info["dtype"]):
            raise RunError("workers loaded different weights or dtypes (mixed hardware with dtype auto?); "
                           "set --dtype explicitly")
        if self.backoff.pop(worker, None) is not None:
            log(f"worker {worker} ready again (pid {info['pid']} on node {info['node_id'][:8]})")
        self.infos[worker] = info
        self.idle.append(worker)

    def _asked(self) -> str:
        return f"asked for {self.plan.describe()}; the cluster has {describe_nodes(alive_nodes())}"


class ShardDispatcher:
    """Dynamic dispatch: each ready worker runs one shard at a time; a shard whose worker died goes back first
    in the queue, uncounted; a shard whose own work raised is retried, at most MAX_ATTEMPTS times in all."""

    def __init__(self, pool: WorkerPool):
        self.pool = pool
        self.running: dict[Any, tuple[int, int, float]] = {}  # future -> (worker, shard, started)

    def busy(self) -> dict[int, dict]:
        """shard -> the `info` (pid, node_id, ...) of the worker running it."""
        return {shard: self.pool.infos[worker] for worker, shard, _ in self.running.values()}

    def run(self, todo: list[int], submit: Callable[[Any, int], Any], done: Callable[[int, int, Any, float], None],
            on_dispatch: Callable[[ShardDispatcher], None] | None = None) -> None:
        """Run every shard of `todo` via `submit(actor, shard)`, calling `done(shard, worker, result, seconds)`.

        `on_dispatch` is called after each completed shard, once the freed worker has its next shard.
        Raises RunError when a shard keeps raising or no worker can be (re)started (see WorkerPool).
        """
        queue, failures, pool = deque(todo), {shard: 0 for shard in todo}, self.pool
        completed = False
        while queue or self.running:
            while queue and pool.idle:
                worker, shard = pool.idle.popleft(), queue.popleft()
                self.running[submit(pool.actors[worker], shard)] = (worker, shard, time.monotonic())
            if completed and on_dispatch is not None:
                on_dispatch(self)
            completed = False
            pool.check_usable(busy=len(self.running))
            finished = pool.wait(list(self.running))
            if finished is None:
                continue
            worker, shard, started = self.running.pop(finished)
            try:
                result = ray.get(finished)
            except RayTaskError as exc:  # the shard's own work raised
                failures[shard] += 1
                if isinstance(exc.cause, ShardError):  # the shard's input, not chance: retrying cannot help
                    raise RunError(f"shard {shard}: {one_line(exc)}") from None
                if failures[shard] >= MAX_ATTEMPTS:
                    raise RunError(f"shard {shard} failed {failures[shard]} times, last on worker {worker}: "
                                   f"{one_line(exc)}") from None
                log(f"shard {shard:05d} failed on worker {worker} ({one_line(exc)}); retrying")
                queue.appendleft(shard)
                pool.idle.append(worker)
            except WORKER_LOST as exc:  # the worker's process or node died (or its result went with the node)
                if isinstance(exc, RayActorError) and exc.actor_init_failed:
                    raise RunError(f"worker {worker} failed to start: {one_line(exc)}") from None
                log(f"worker {worker} lost during shard {shard:05d} ({type(exc).__name__}); shard requeued, "
                    f"waiting for the worker to restart")
                queue.appendleft(shard)
                pool.lost(worker)
            else:
                done(shard, worker, result, time.monotonic() - started)
                completed = True
                pool.idle.append(worker)


@contextmanager
def start_workers(spec: JobSpec, session: RaySession) -> Iterator[WorkerPool]:
    """Place the job's workers (one placement-group bundle each), start them, and wait until each has its model.

    Placement waits up to `spec.start_timeout` seconds on a joined cluster (announced: an autoscaler may add
    nodes) and not at all on the private local Ray, which cannot grow; either way a plan that cannot be
    placed is a RunError naming what was asked for and what the cluster has. Actors and the placement
    group are removed at the end.
    """
    nodes = alive_nodes()
    plan = plan_workers(spec, nodes)
    if not plan.fits(nodes):
        asked = f"{plan.describe()}; the cluster has {describe_nodes(nodes)}"
        if not session.joined:
            raise RunError(f"cannot place {asked}")
        log(f"waiting up to {spec.start_timeout:g} s for the cluster to make room for {asked} "
            f"(an autoscaler may add nodes)")
    group = placement_group([plan.bundle] * plan.count, strategy="SPREAD")
    try:
        if not ray.wait([group.ready()], timeout=spec.start_timeout)[0]:
            raise RunError(f"could not place {plan.describe()} within {spec.start_timeout:g} s; "
                           f"the cluster has {describe_nodes(alive_nodes())}")
        log(f"starting {plan.describe()} with {spec.model} (dtype {spec.dtype})")
        env = worker_env()
        options = {"num_cpus": plan.num_cpus, "num_gpus": plan.num_gpus, "max_restarts": -1, "max_task_retries": 0,
                   "runtime_env": {"env_vars": env} if env else None}
        actors = [ray.remote(ShardWorker).options(
                      **options, scheduling_strategy=PlacementGroupSchedulingStrategy(group, index))
                  .remote(spec, plan.device, plan.threads) for index in range(plan.count)]
        try:
            pool = WorkerPool(actors, plan, spec.start_timeout)
            pool.start()
            yield pool
        finally:
            for worker in actors:
                ray.kill(worker)
    finally:
        remove_placement_group(group)


def execute(task: ShardTask, run: RunDir, shards: list[list[Example]], pool: WorkerPool, job: dict[str, Any],
            on_dispatch: Callable[[ShardDispatcher], None] | None = None,
            todo: list[int] | None = None) -> ExecSummary:
    """Compute every shard of `task` whose file is missing or invalid; the caller holds the run folder's lock.

    `job` is the identity each shard file is stamped with (`rundir.job_identity`); `todo` the shards to
    compute when the caller has already checked them (`shards_to_compute`). `on_dispatch(dispatcher)` runs
    after each finished shard (tests use it to kill a busy worker).
    """
    todo = shards_to_compute(task, run, shards, job) if todo is None else todo
    start = time.monotonic()
    dispatcher = ShardDispatcher(pool)
    progress = RunProgress(len(shards), len(shards) - len(todo), sum(len(shards[i]) for i in todo))
    task_ref = ray.put(task)

    def submit(worker: Any, shard: int) -> Any:
        return worker.run.remote(task_ref, shard, shards[shard], progress.counter)

    def done(shard: int, worker: int, table: pa.Table, seconds: float) -> None:
        write_shard(task.shard_path(run, shard), shard, table, job)
        progress.shard_done(shard, worker, len(shards[shard]), task.tokens(table), seconds)

    with progress:
        dispatcher.run(todo, submit, done, on_dispatch)
    return ExecSummary(len(shards), len(shards) - len(todo), len(todo), progress.tokens, time.monotonic() - start)


def shards_to_compute(task: ShardTask, run: RunDir, shards: list[list[Example]], job: dict[str, Any]) -> list[int]:
    """Indices of shards with no valid file; invalid files are deleted (they will be rewritten whole).

    A shard file of another job makes the run refuse (ValueError) before anything is deleted or written.
    """
    listed = run.listed_shards(task.folder)  # one listing, not a request per shard on a store
    try:
        problems = {index: task.shard_problem(run, index, examples, job)
                    if task.shard_path(run, index).name in listed else "missing"
                    for index, examples in enumerate(shards)}
    except ShardProblem as foreign:
        raise ValueError(f"run folder {run.root} holds a shard file of a different job: {foreign}; "
                         "choose another --name or --out, or remove the folder") from None
    todo = [index for index, problem in problems.items() if problem is not None]
    for index in todo:
        if problems[index] != "missing":
            log(f"{task.folder} shard {index:05d}: {problems[index]}; removed, will recompute")
            task.shard_path(run, index).unlink()
    log(f"{task.folder}: {len(shards) - len(todo)} of {len(shards)} shards already complete (skipped), "
        f"computing {len(todo)}")
    return todo
