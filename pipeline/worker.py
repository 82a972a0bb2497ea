"""The generator: turns one shard of examples into its scored rows, for every configuration.

The runner makes one Ray actor of this class per GPU (or CPU slot), so the model is loaded once per
worker and reused for every shard it is handed. The worker returns the shard as an Arrow table and the
driver writes it: one writer per run folder, so the output path only has to exist where the driver runs,
the lock and the atomic rename stay local, and a worker that dies leaves nothing half-written behind.
(A shard of 64 Alpaca sequences x 88 configurations is a few MB; shipping it costs nothing next to
generating it.)
"""

from __future__ import annotations

import os
import socket
from typing import Any

import pyarrow as pa
import torch

from pipeline.configs import FULL_ID, SkipConfig
from pipeline.data import Example
from pipeline.engine import Generation, generate
from pipeline.job import JobSpec
from pipeline.models import load_model
from pipeline.progress import shard_reporter
from pipeline.rundir import shard_table
from pipeline.scoring import score


class ShardGenerator:
    """Holds the model; `run_shard` generates, scores and tabulates one shard."""

    def __init__(self, spec: JobSpec, device: str, cpu_threads: int | None = None):
        if cpu_threads is not None:
            torch.set_num_threads(cpu_threads)  # the actor's CPU share, not every core of the node
        self.spec = spec
        self.device = device
        self.lm = load_model(spec.model, spec.dtype, device)

    def info(self) -> dict:
        """What the driver needs before dispatching: the model's depth and fingerprint, and where we run."""
        return {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "device": self.device,
            "threads": torch.get_num_threads(),
            "dtype": self.lm.dtype,
            "num_layers": self.lm.num_layers,
            "fingerprint": self.lm.fingerprint(),
        }

    def run_shard(self, shard: int, examples: list[Example], configs: list[SkipConfig],
                  counter: Any = None) -> pa.Table:
        """Generate every example under every configuration, then score against references and `full`.

        `counter` (a `pipeline.progress.ProgressCounter` actor, or None) hears the tokens as they come."""
        spec = self.spec
        # Batches of similar prompt length waste less compute on left padding; the order is deterministic.
        order = sorted(range(len(examples)), key=lambda i: (examples[i].prompt_tokens, i))
        generations: list[list[Generation]] = [[] for _ in examples]
        for start in range(0, len(order), spec.batch_size):
            batch = order[start : start + spec.batch_size]
            outputs = generate(self.lm, [list(examples[i].prompt_ids) for i in batch], configs,
                               spec.max_new_tokens, prefill=spec.prefill, max_rows=spec.max_rows,
                               on_group_done=shard_reporter(counter, shard))
            for i, per_config in zip(batch, outputs):
                generations[i] = per_config
        full = next(k for k, cfg in enumerate(configs) if cfg.config_id == FULL_ID)
        scores = score(
            outputs=[gen.text for per_config in generations for gen in per_config],
            references=[ex.reference for ex in examples for _ in configs],
            full_outputs=[per_config[full].text for per_config in generations for _ in configs],
            summary=[ex.summary for ex in examples for _ in configs],
        )
        return shard_table(shard, examples, configs, generations, scores)
