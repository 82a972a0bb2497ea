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
import socket
import threading
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Mapping

import ray

from pipeline.run.job import JobSpec
from pipeline.run.reaper import Reaper

# Driver variables the workers read (DYNORACLE_CACHE; HF_HOME, HF_TOKEN, HF_HUB_OFFLINE...): Ray does not
# forward the driver's environment to actors on other nodes, so they travel in the actors' runtime_env.
WORKER_ENV_PREFIXES = ("DYNORACLE_", "HF_")


@dataclass(frozen=True)
class RaySession:
    """The Ray a run is connected to; `joined` when it is a cluster (which an autoscaler may grow)."""

    joined: bool


_RECEIVED: list[int] = []  # signals `_interrupt` handled: code that swallows the exception cannot hide them


def _interrupt(signum: int, frame: Any) -> None:
    _RECEIVED.append(signum)
    raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")


def sigterm_as_interrupt() -> None:
    """Treat SIGTERM like Ctrl-C: unwind (lock released, actors killed, Ray shut down), no stack dump."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _interrupt)


@contextmanager
def ray_session(address: str | None, timeout_s: float | None = None) -> Iterator[RaySession]:
    """Join `address` (or RAY_ADDRESS), else start a private local Ray; reuse a Ray this process already joined.

    A Ray initialised before the call (tests, notebooks) is used as it is and counted as joined. A `host:port`
    address that accepts no connection within `timeout_s` seconds raises ConnectionError (Ray itself would
    keep retrying). SIGTERM or Ctrl-C while Ray starts raise KeyboardInterrupt after Ray is shut down again.
    """
    if ray.is_initialized():
        yield RaySession(joined=True)
        return
    quiet = {"log_to_driver": False, "logging_level": logging.WARNING}  # worker logs: <temp dir>/session_latest/logs
    joined = bool(address or os.environ.get("RAY_ADDRESS"))
    if joined and timeout_s is not None:
        wait_for_address(address or os.environ["RAY_ADDRESS"], timeout_s)
    reaper = None if joined else Reaper()  # a private Ray's processes end with this one, however it ends
    _RECEIVED.clear()
    try:
        with _sigterm_kept():
            try:
                if joined:
                    ray.init(address=address, **quiet)
                else:
                    with reaper.marking(), _token_notice_silenced():
                        ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, **quiet)
            except SystemExit as exc:  # a SIGTERM handler of Ray's own (sys.exit) ran after all
                raise KeyboardInterrupt(f"signal {exc.code}") from None
        if _RECEIVED:  # raised inside Ray's start-up where a callback swallowed it: the run must still stop
            raise KeyboardInterrupt(f"signal {signal.Signals(_RECEIVED[0]).name}")
        sigterm_as_interrupt()
        yield RaySession(joined=joined)
    finally:
        ray.shutdown()
        if reaper is not None:
            reaper.close()


@contextmanager
def _sigterm_kept() -> Iterator[None]:
    """Keep our SIGTERM handler (`sigterm_as_interrupt`) through `ray.init`, which first thing installs a bare
    `sys.exit` one: a SIGTERM while Ray starts then unwinds like any other (Ray shut down, exit 130)."""
    utils = getattr(getattr(ray, "_private", None), "utils", None)
    original = getattr(utils, "set_sigterm_handler", None)
    if original is None or threading.current_thread() is not threading.main_thread():
        yield
        return
    sigterm_as_interrupt()
    utils.set_sigterm_handler = lambda handler: None
    try:
        yield
    finally:
        utils.set_sigterm_handler = original


def wait_for_address(address: str, timeout_s: float) -> None:
    """Return once `host:port` accepts a TCP connection; ConnectionError naming it after `timeout_s` seconds.

    Other forms (`auto`, `ray://...`) are left to Ray."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or "://" in address:
        return
    deadline = time.monotonic() + timeout_s
    while True:
        left = deadline - time.monotonic()
        try:
            with socket.create_connection((host, int(port)), timeout=max(0.1, min(5.0, left))):
                return
        except OSError as exc:
            if left <= 0:
                raise ConnectionError(f"no Ray cluster answers at {address} within {timeout_s:g} s "
                                      f"({exc.strerror or exc}); start it (`ray start --head`) or fix --address") from None
        time.sleep(min(0.5, max(0.0, deadline - time.monotonic())))


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
