"""`dynoracle gates`: train per-token skip gates (hidden-state input and the fixed-input control) for a sweep of
lambda, then generate every sequence of a finished run with each gate set's hard decisions and score it.

Training: `pipeline.training.gates` on the run's model (float32, frozen) and the train split of the run's dataset,
into `<run>/gates/train/<input>-lambda<value>/` (resumable). Evaluation: a shard task on the run's executor
(`gates/shard=NNNNN.parquet`, one row per (sequence, gate set), scored like the run's rows, with the run's
model, dtype and max_new_tokens); then `gates.parquet`: per gate set and metric, the mean score and the mean
cost (layers run per decode token, `pipeline.generation.gated`) with 95% percentile bootstrap intervals over
sequences.
"""

from __future__ import annotations

import dataclasses
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from pipeline.analysis.bootstrap import DEFAULT_RESAMPLES
from pipeline.analysis.gate_curves import FOLDER, SHARD_SCHEMA, SUMMARY, SUMMARY_SCHEMA, summarise
from pipeline.data.adapters import Example
from pipeline.generation.configs import FULL_ID
from pipeline.generation.gated import KV_MODES, gated_generate
from pipeline.generation.models import LoadedModel, load_model
from pipeline.generation.scoring import ScoringOptions, score
from pipeline.run.atomic import write_parquet
from pipeline.run.job import job_from_dict
from pipeline.run.rundir import RunDir
from pipeline.run.runner import run_task
from pipeline.run.shard_task import ShardTask
from pipeline.training.finetune import log, response_rows
from pipeline.training.gates import GATE_INPUTS, GateSpec, Gates, load_gates, train_gates




@dataclass(frozen=True)
class GateSet:
    """A trained gate set as it travels to the workers: its name, input, lambda and weights (torch.save bytes)."""

    name: str
    gate_input: str
    lam: float
    hidden: int
    weights: bytes

    def build(self, num_layers: int, dim: int, device: torch.device) -> Gates:
        gates = Gates(num_layers, dim, self.gate_input, self.hidden)
        gates.load_state_dict(torch.load(io.BytesIO(self.weights), map_location=device, weights_only=True))
        return gates.to(device)


@dataclass(frozen=True)
class GatedGenerateTask(ShardTask):
    """Generate each example with every gate set's hard decisions and score it as the run scores its rows."""

    gate_sets: tuple[GateSet, ...]
    max_new_tokens: int
    kv: str
    batch_size: int
    scoring: ScoringOptions
    full_outputs: dict[str, str]  # seq_id -> the full model's output in the run (for `fidelity`)

    folder: ClassVar[str] = FOLDER
    schema: ClassVar[pa.Schema] = SHARD_SCHEMA
    key_columns: ClassVar[tuple[str, ...]] = ("seq_id", "gates")

    def expected_keys(self, examples: list[Example]) -> set[tuple]:
        return {(ex.seq_id, g.name) for ex in examples for g in self.gate_sets}

    def tokens(self, table: pa.Table) -> int:
        return int(table.column("gen_tokens").to_numpy().sum())

    @torch.inference_mode()
    def run(self, lm: LoadedModel, shard: int, examples: list[Example],
            on_tokens: Callable[[int], None] | None = None) -> pa.Table:
        order = sorted(range(len(examples)), key=lambda i: (examples[i].prompt_tokens, i))
        rows: list[tuple[int, GateSet, Any]] = []
        for gate_set in self.gate_sets:
            gates = gate_set.build(lm.num_layers, lm.model.config.hidden_size, lm.device)
            for start in range(0, len(order), self.batch_size):
                batch = order[start : start + self.batch_size]
                outputs = gated_generate(lm, [list(examples[i].prompt_ids) for i in batch], gates.decide,
                                         self.max_new_tokens, self.kv)
                rows.extend((i, gate_set, out) for i, out in zip(batch, outputs))
                if on_tokens is not None:
                    on_tokens(sum(out.gen_tokens for out in outputs))
        rows.sort(key=lambda r: (r[0], self.gate_sets.index(r[1])))
        scores = score(outputs=[out.text for _, _, out in rows],
                       references=[examples[i].references for i, _, _ in rows],
                       full_outputs=[self.full_outputs[examples[i].seq_id] for i, _, _ in rows],
                       summary=[examples[i].summary for i, _, _ in rows], options=self.scoring)
        return pa.table({
            "seq_id": [examples[i].seq_id for i, _, _ in rows], "shard": [shard] * len(rows),
            "gates": [g.name for _, g, _ in rows], "gate_input": [g.gate_input for _, g, _ in rows],
            "lam": [g.lam for _, g, _ in rows], "kv": [self.kv] * len(rows),
            "cost": [out.decode_cost for _, _, out in rows],
            "layers_per_token": [out.layers_per_token for _, _, out in rows],
            "gen_tokens": [out.gen_tokens for _, _, out in rows],
            "finish_reason": [out.finish_reason for _, _, out in rows],
            "output": [out.text for _, _, out in rows], **scores,
        }, schema=SHARD_SCHEMA)


def run_gates(run_dir: str | Path, lambdas: list[float], inputs: tuple[str, ...] = GATE_INPUTS,
              train_limit: int | None = 256, epochs: float = 1.0, lr: float = 1e-2, batch_size: int = 8,
              max_response_tokens: int = 32, hidden: int = 0, bf16: bool = False, kv: str = "compute",
              seed: int = 0, workers: int | None = None, address: str | None = None,
              resamples: int = DEFAULT_RESAMPLES) -> dict[str, Any]:
    """Train every (input, lambda) gate set (resumable), then evaluate them over the finished run's sequences
    (a shard task, resumable) and write `gates.parquet`. Returns counts, seconds and the training records.

    Raises ValueError for an empty sweep, an unknown input or kv, or an unfinished run (from `run_task`).
    """
    if not lambdas or any(not lam >= 0 for lam in lambdas):
        raise ValueError(f"give at least one lambda >= 0 (--lambda), got {lambdas}")
    unknown = [i for i in inputs if i not in GATE_INPUTS]
    if unknown or not inputs:
        raise ValueError(f"unknown gate input {unknown[0] if unknown else '(none)'}; choose from {', '.join(GATE_INPUTS)}")
    if kv not in KV_MODES:
        raise ValueError(f"unknown kv semantics {kv!r}; choose from {', '.join(KV_MODES)}")
    root = Path(run_dir)
    record = RunDir(root).read_run_json()
    if record is None:
        raise ValueError(f"{root} holds no run (run.json missing); run `dynoracle run` first")
    spec = job_from_dict(record["job"])
    lm = load_model(spec.model, "float32")
    dataset = dataclasses.replace(spec.dataset, split="train", limit=train_limit, empty_references="keep")
    rows = response_rows(dataset, lm.tokenizer, max_response_tokens)
    kvs: dict[int, Any] = {}
    trained = []
    for gate_input in inputs:
        for lam in lambdas:
            gate_spec = GateSpec(gate_input, lam, dataset, epochs, lr, batch_size, seed, max_response_tokens,
                                 hidden, bf16=bf16)
            folder = root / FOLDER / "train" / gate_spec.name
            log(f"training gates {gate_spec.name} on {len(rows)} train rows")
            trained.append(train_gates(lm, gate_spec, folder, rows, kvs))
    del lm, kvs
    gate_sets = []
    for entry in trained:
        buffer = io.BytesIO()
        torch.save(load_gates(root / FOLDER / "train" / entry["name"]).state_dict(), buffer)
        gate_sets.append(GateSet(entry["name"], entry["spec"]["gate_input"], entry["spec"]["lam"], hidden,
                                 buffer.getvalue()))

    def make_task(job, run_record):
        full = pq.read_table(root / "generations", columns=["seq_id", "output"], filters=[("config_id", "=", FULL_ID)])
        return GatedGenerateTask(tuple(gate_sets), job.max_new_tokens, kv, job.batch_size, job.scoring,
                                 dict(zip(full["seq_id"].to_pylist(), full["output"].to_pylist())))

    done = run_task(root, make_task, address, workers)
    table = evaluation_rows(root)
    table = table[table["gates"].isin([g.name for g in gate_sets])]
    write_parquet(pa.Table.from_pandas(summarise(table, resamples, seed), schema=SUMMARY_SCHEMA,
                                       preserve_index=False), root / SUMMARY)
    return {"shards": done.shards, "computed": done.computed, "skipped": done.skipped, "seconds": done.seconds,
            "trained": trained, "summary": root / SUMMARY}


def evaluation_rows(root: Path) -> pd.DataFrame:
    """Every row of the gate evaluation's shard files (`gates/shard=*.parquet`); `gates/train/` beside them
    holds each gate set's checkpoint and gates.json, which are not rows."""
    shard_files = sorted(str(p) for p in (root / FOLDER).glob("shard=*.parquet"))
    return pq.read_table(shard_files, schema=SHARD_SCHEMA).to_pandas()
