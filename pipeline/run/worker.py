"""The shard worker: a Ray actor that holds the model and runs shard tasks on it.

The executor makes one actor of this class per GPU (or CPU slot), so the model is loaded once per worker
and reused for every shard of every task it is handed. A task's `run` returns the shard's Arrow table and
the driver writes it: one writer per run folder, so the output path only has to exist where the driver runs,
the lock and the atomic rename stay local, and a worker that dies leaves nothing half-written behind.
"""

from __future__ import annotations

import os
import socket
from typing import Any

import pyarrow as pa
import ray
import torch

from pipeline.data.adapters import Example
from pipeline.generation.checkpoints import load_checkpoints
from pipeline.generation.models import cache_dir, load_model
from pipeline.generation.scoring import sentence_splitter
from pipeline.run.job import JobSpec
from pipeline.run.progress import shard_reporter
from pipeline.run.shard_task import ShardTask


class ShardWorker:
    """Holds the job's model; `run(task, shard, examples)` computes one shard of any shard task."""

    def __init__(self, spec: JobSpec, device: str, cpu_threads: int | None = None):
        if cpu_threads is not None:
            torch.set_num_threads(cpu_threads)  # the actor's CPU share, not every core of the node
        self.spec = spec
        self.device = device
        self.lm = load_model(spec.model, spec.dtype, device, spec.trust_remote_code)
        self.checkpoint_fingerprints = load_checkpoints(dict(spec.checkpoints), self.lm)

    def info(self) -> dict:
        """What the driver needs before dispatching: the model's depth and fingerprint, and where we run."""
        return {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "node_id": ray.get_runtime_context().get_node_id(),
            "cache": str(cache_dir()),  # DYNORACLE_CACHE as the driver set it, if it did (runtime_env)
            "device": self.device,
            "threads": torch.get_num_threads(),
            "dtype": self.lm.dtype,
            "num_layers": self.lm.num_layers,
            "fingerprint": self.lm.fingerprint(),
            "sentence_splitter": sentence_splitter(),
            "checkpoint_fingerprints": self.checkpoint_fingerprints,
        }

    def run(self, task: ShardTask, shard: int, examples: list[Example], counter: Any = None) -> pa.Table:
        """`counter` (a `pipeline.run.progress.ProgressCounter` actor, or None) hears the tokens as they come."""
        return task.run(self.lm, shard, examples, on_tokens=shard_reporter(counter, shard))
