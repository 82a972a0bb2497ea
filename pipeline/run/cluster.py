"""Which Ray a run uses, what it sends to its workers, and how many workers of what size fit its nodes.

The rule for which Ray: `--address` (or RAY_ADDRESS, which `ray job submit` sets for its entrypoint) joins
that cluster and asks it for nothing; without either, the run starts a private Ray on this machine
(`ray.init(address="local")`) even where `ray start --head` left a cluster running, so a local run never
lands on, or is refused by, a cluster it was not pointed at.

Workers are planned per node, not per cluster: an actor's CPUs (and torch threads) fit the node it will
run on, since Ray places each actor on one node whole.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Mapping

import ray

from pipeline.run.job import JobSpec

# Driver variables the workers read (DYNORACLE_CACHE; HF_HOME, HF_TOKEN, HF_HUB_OFFLINE...): Ray does not
# forward the driver's environment to actors on other nodes, so they travel in the actors' runtime_env.
WORKER_ENV_PREFIXES = ("DYNORACLE_", "HF_")


@dataclass(frozen=True)
class RaySession:
    """The Ray a run is connected to; `joined` when it is a cluster (which an autoscaler may grow)."""

    joined: bool


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")


def sigterm_as_interrupt() -> None:
    """Treat SIGTERM like Ctrl-C: unwind (lock released, actors killed, Ray shut down), no stack dump."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _interrupt)


@contextmanager
def ray_session(address: str | None) -> Iterator[RaySession]:
    """Join `address` (or RAY_ADDRESS), else start a private local Ray; reuse a Ray this process already joined.

    A Ray initialised before the call (tests, notebooks) is used as it is and counted as joined.
    """
    if ray.is_initialized():
        yield RaySession(joined=True)
        return
    quiet = {"log_to_driver": False, "logging_level": logging.WARNING}  # worker logs: <temp dir>/session_latest/logs
    joined = bool(address or os.environ.get("RAY_ADDRESS"))
    if joined:
        ray.init(address=address, **quiet)
    else:
        with _token_notice_silenced():
            ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, **quiet)
    sigterm_as_interrupt()  # again: ray.init installs its own SIGTERM handler (a bare sys.exit)
    try:
        yield RaySession(joined=joined)
    finally:
        ray.shutdown()


@contextmanager
def _token_notice_silenced() -> Iterator[None]:
    """Ray turns token authentication on for a new local cluster (kept: it guards the private Ray) and warns
    that it did, on every command; that one warning is dropped, everything else Ray logs still shows."""
    source = logging.getLogger("ray._private.authentication.authentication_token_setup")

    def keep(record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Token authentication is enabled")

    source.addFilter(keep)
    try:
        yield
    finally:
        source.removeFilter(keep)


def worker_env(environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """The driver's DYNORACLE_* and HF_* variables, for the `env_vars` of the workers' runtime_env."""
    return {name: value for name, value in environ.items() if name.startswith(WORKER_ENV_PREFIXES)}


def alive_nodes() -> list[dict[str, float]]:
    """Each live node's total resources as Ray reports them ({"CPU": 4.0, "GPU": 1.0, ...})."""
    return [dict(node["Resources"]) for node in ray.nodes() if node["Alive"]]


def describe_nodes(nodes: list[dict[str, float]]) -> str:
    """'3 nodes: 2 x 1 CPU, 1 x 4 CPU + 1 GPU' (what the cluster has, for error and waiting lines)."""
    if not nodes:
        return "no nodes"
    sizes = Counter(_describe_bundle(node) for node in nodes)
    listed = ", ".join(f"{count} x {size}" for size, count in sorted(sizes.items()))
    return f"{len(nodes)} node{'s' if len(nodes) > 1 else ''}: {listed}"


def _describe_bundle(resources: Mapping[str, float]) -> str:
    parts = [f"{resources.get(name, 0):g} {name}" for name in ("CPU", "GPU") if resources.get(name, 0) or name == "CPU"]
    return " + ".join(parts)


@dataclass(frozen=True)
class WorkerPlan:
    """How many worker actors, and what each one reserves on its node."""

    count: int
    device: str
    num_cpus: int
    num_gpus: int
    threads: int | None  # torch threads of a CPU worker (= its CPUs); None on GPUs

    @property
    def bundle(self) -> dict[str, float]:
        """One worker's placement-group bundle."""
        return {"CPU": self.num_cpus, **({"GPU": self.num_gpus} if self.num_gpus else {})}

    def describe(self) -> str:
        plural = "s" if self.count > 1 else ""
        if self.device == "cuda":
            return f"{self.count} GPU worker{plural} ({_describe_bundle(self.bundle)} each)"
        threads = f"{self.threads} thread{'s' if self.threads > 1 else ''}"
        return f"{self.count} CPU worker{plural} x {threads} ({_describe_bundle(self.bundle)} each)"

    def fits(self, nodes: list[dict[str, float]]) -> bool:
        """Whether `count` bundles fit the nodes, each bundle whole on one node."""
        return _bundles_per_node(self.bundle, nodes) >= self.count


def _bundles_per_node(bundle: Mapping[str, float], nodes: list[dict[str, float]]) -> int:
    return sum(min(int(node.get(name, 0) // need) for name, need in bundle.items() if need) for node in nodes)


def plan_workers(spec: JobSpec, nodes: list[dict[str, float]]) -> WorkerPlan:
    """One worker per GPU when there are GPUs (or device=cuda asks for them), else `workers` CPU workers.

    A CPU worker gets the most CPUs t such that `workers` actors of t CPUs fit the nodes, each on one node
    (four 1-CPU nodes and 2 workers: 1 CPU each, never 2). When even t = 1 does not fit yet, the plan keeps
    t = 1 and placement waits for nodes (an autoscaler) or times out. device=cuda trusts `workers` even if
    the GPU nodes are not up yet, for the same reason.
    Raises ValueError when device=cuda has neither GPUs nor a worker count to wait for.
    """
    gpus = int(sum(node.get("GPU", 0) for node in nodes))
    if spec.device == "cuda" or (spec.device == "auto" and gpus):
        count = spec.workers or gpus
        if count < 1:
            raise ValueError("device cuda, but the cluster has no GPUs yet: set workers to the number of GPUs to use")
        if spec.device == "auto":
            count = min(count, gpus)
        return WorkerPlan(count, "cuda", 1, 1, None)
    count = spec.workers or 1
    largest = int(max((node.get("CPU", 0) for node in nodes), default=0))
    threads = max((t for t in range(1, largest + 1) if _bundles_per_node({"CPU": t}, nodes) >= count), default=1)
    return WorkerPlan(count, "cpu", threads, 0, threads)
