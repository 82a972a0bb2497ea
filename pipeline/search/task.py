"""The search task: one shard of a finished run -> its rows plus every program searched for its sequences.

A shard task (`pipeline.run.shard_task`) run by the same executor as `dynoracle run`, into a new run folder
that extends the source run: its shard files (the source task's folder and schema, `generations/` or `choices/`,
given by the evaluator) hold the source shard's rows unchanged
and one ordinary row per evaluated (sequence, program) (config ids `search-NNN` and `random-NNN`, see
`policy`), so `reduce`, `query`, `report` and `controller` read the union as any run. Each row's program is
stored in the shard file's Parquet metadata under `dynoracle.programs` ({seq_id: {config_id: program}};
`read_programs`), since a slot's program differs per sequence. Rounds run inside the shard: all its
sequences' candidates of a round, both arms, are evaluated in one batch; a killed search loses the shards
in flight and a rerun recomputes exactly them (every draw is seeded by sequence and round).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import pyarrow as pa

from pipeline.data.adapters import Example
from pipeline.generation.configs import SkipConfig
from pipeline.generation.models import LoadedModel
from pipeline.run.location import RunPath, locate, read_parquet
from pipeline.run.rundir import read_shard
from pipeline.run.shard_task import ShardTask
from pipeline.search.evaluate import Evaluator
from pipeline.search.policy import ARMS, SearchSpec, propose, slot_costs, slot_id

PROGRAMS_KEY = b"dynoracle.programs"


@dataclass(frozen=True)
class SearchTask(ShardTask):
    """source: the source run folder; source_job: its job identity (the stamp its shards carry); programs:
    the source's configurations (config id -> program); num_layers: the model's depth."""

    source: str
    source_job: tuple[tuple[str, str], ...]  # (key, JSON) pairs of the identity: hashable, picklable
    programs: tuple[tuple[str, tuple[int, ...]], ...]
    num_layers: int
    spec: SearchSpec
    evaluator: Evaluator

    key_columns: ClassVar[tuple[str, ...]] = ("seq_id", "config_id")

    @property
    def folder(self) -> str:  # type: ignore[override]
        return self.evaluator.folder

    @property
    def schema(self) -> pa.Schema:  # type: ignore[override]
        return self.evaluator.schema

    def slot_ids(self) -> list[str]:
        return [slot_id(arm, j) for arm in ARMS for j in range(self.spec.budget)]

    def expected_keys(self, examples: list[Example]) -> set[tuple]:
        ids = [cid for cid, _ in self.programs] + self.slot_ids()
        return {(ex.seq_id, cid) for ex in examples for cid in ids}

    def tokens(self, table: pa.Table) -> int:
        return self.evaluator.tokens(table)

    def run(self, lm: LoadedModel, shard: int, examples: list[Example],
            on_tokens: Callable[[int], None] | None = None) -> pa.Table:
        job = {key: json.loads(value) for key, value in self.source_job}
        source = read_shard(locate(self.source) / self.folder / f"shard={shard:05d}.parquet", shard, job, self.schema)
        spec, metric, costs = self.spec, self.spec.metric, slot_costs(self.spec)
        program_of = dict(self.programs)
        enumerated: dict[str, list[tuple[tuple[int, ...], float]]] = {ex.seq_id: [] for ex in examples}
        for seq, cid, value in zip(source["seq_id"].to_pylist(), source["config_id"].to_pylist(),
                                   source[metric].to_pylist()):
            enumerated[seq].append((program_of[cid], float(value)))
        evaluated = {(ex.seq_id, arm): [] for ex in examples for arm in ARMS}
        tables, stored = [source], {ex.seq_id: {} for ex in examples}
        for r in range(spec.rounds):
            slots = list(range(r * spec.width, min(spec.budget, (r + 1) * spec.width)))
            pairs: list[tuple[int, SkipConfig]] = []
            for i, ex in enumerate(examples):
                for arm in ARMS:
                    children = propose(spec, arm, ex.seq_id, r, [costs[j] for j in slots], self.num_layers,
                                       enumerated[ex.seq_id], evaluated[ex.seq_id, arm])
                    pairs += [(i, SkipConfig(slot_id(arm, j), arm, costs[j], child)) for j, child in zip(slots, children)]
            scores, table = self.evaluator.evaluate(lm, shard, examples, source, pairs, metric, on_tokens)
            for (i, cfg), value in zip(pairs, scores):
                evaluated[examples[i].seq_id, cfg.family].append((cfg.layers, float(value)))
                stored[examples[i].seq_id][cfg.config_id] = list(cfg.layers)
            tables.append(table)
        out = pa.concat_tables([t.replace_schema_metadata(None) for t in tables])
        return out.replace_schema_metadata({PROGRAMS_KEY: json.dumps(stored, sort_keys=True).encode()})


def read_programs(shard_file: RunPath) -> dict[tuple[str, str], tuple[int, ...]]:
    """(seq_id, config_id) -> program of every searched row of one shard file of a search run."""
    metadata = read_parquet(shard_file, columns=["seq_id"]).schema.metadata or {}
    stored: dict[str, dict[str, Any]] = json.loads(metadata.get(PROGRAMS_KEY, b"{}"))
    return {(seq, cid): tuple(program) for seq, per in stored.items() for cid, program in per.items()}
