"""A small run folder written by hand (no model): L=6, ULS/EE/RLS with two RLS seeds, two shard files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.analysis.features import FEATURES_SCHEMA
from pipeline.generation.configs import build_configs
from pipeline.run.rundir import GENERATIONS_SCHEMA, RunDir, configs_fingerprint, job_identity, write_shard

L = 6
MAX_NEW_TOKENS = 24
CONFIGS = build_configs(L, ("uls", "ee", "rls"), (0, 1))
GENERATION_COLUMNS = [
    ("seq_id", pa.string()), ("shard", pa.int32()), ("config_id", pa.string()), ("family", pa.string()),
    ("cost", pa.int16()), ("prompt_tokens", pa.int32()), ("prompt_truncated", pa.bool_()), ("gen_tokens", pa.int32()),
    ("finish_reason", pa.string()), ("output", pa.string()), ("reference", pa.string()), ("rouge1", pa.float64()),
    ("rouge2", pa.float64()), ("rougeL", pa.float64()), ("rougeLsum", pa.float64()), ("fidelity", pa.float64()),
    ("layers_per_token", pa.float64()),
]


def make_run(root: Path, num_sequences: int = 10, seed: int = 0) -> Path:
    """configs.parquet, run.json and generations split over shards 0 and 1; deeper configurations score better."""
    pq.write_table(pa.Table.from_pylist([c.to_dict() for c in CONFIGS], schema=pa.schema([
        ("config_id", pa.string()), ("family", pa.string()), ("budget", pa.int16()),
        ("layers", pa.list_(pa.int16())), ("cost", pa.int16())])), _mkdir(root) / "configs.parquet")
    rng = np.random.default_rng(seed)
    rows = []
    for n in range(num_sequences):
        for cfg in CONFIGS:
            depth = cfg.cost / L
            score = float(np.clip(0.1 + 0.45 * depth * (0.6 if cfg.family == "ee" else 1.0) + 0.45 * rng.random(), 0, 1))
            tokens = int(min(MAX_NEW_TOKENS, rng.integers(4, 12) + rng.integers(0, 40) * (1 - depth)))
            rows.append({
                "seq_id": f"q{n:03d}", "shard": n % 2, "config_id": cfg.config_id, "family": cfg.family,
                "cost": cfg.cost, "prompt_tokens": 20, "prompt_truncated": False, "gen_tokens": tokens,
                "finish_reason": "length" if tokens == MAX_NEW_TOKENS else "eos",
                "output": f"answer {n}\nby {cfg.config_id}", "reference": f"reference {n}",
                **{m: round(score * f, 4) for m, f in (("rouge1", 1.1), ("rouge2", 0.6), ("rougeL", 1.0),
                                                        ("rougeLsum", 1.0), ("fidelity", 0.9))},
                "layers_per_token": float(cfg.cost),
            })
    schema = pa.schema(GENERATION_COLUMNS)
    write_run(root, {"model": "toy-lm", "max_new_tokens": MAX_NEW_TOKENS, "dataset": {"name": "toyset", "split": "test"}},
              [pa.Table.from_pylist([r for r in rows if r["shard"] == shard], schema=schema) for shard in (0, 1)])
    return root


def write_run(root: Path, job: dict, shards: list[pa.Table]) -> dict:
    """run.json and the shard files as `dynoracle run` writes them (identity in run.json and each shard)."""
    record = {"job": job, "identity": {"max_new_tokens": job.get("max_new_tokens"), "model": job.get("model")},
              "dataset_fingerprint": "toy-data", "model_fingerprint": "toy-weights", "dtype": "float32",
              "shards": len(shards), "started": "2026-01-01T00:00:00+00:00", "finished": "2026-01-01T00:01:00+00:00"}
    if (root / "configs.parquet").is_file():
        record["configs_fingerprint"] = configs_fingerprint(pq.read_table(root / "configs.parquet"))
    (root / "run.json").write_text(json.dumps(record))
    run = RunDir(root)
    for index, table in enumerate(shards):
        write_shard(run.shard_path(index), index, table.cast(GENERATIONS_SCHEMA), job_identity(record))
    return record


def write_features(run_dir: Path, vectors: dict[str, np.ndarray], layer: int = 1) -> None:
    """A hand-made features/ file: `last` holds the given vector, `mean` noise."""
    rng = np.random.default_rng(5)
    rows = [{"seq_id": s, "shard": 0, "layer": layer, "pooling": p, "prompt_tokens": 20,
             "hidden": (v if p == "last" else rng.normal(size=v.size)).astype(np.float32).tolist()}
            for s, v in vectors.items() for p in ("last", "mean")]
    (run_dir / "features").mkdir(exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=FEATURES_SCHEMA), run_dir / "features" / "shard=00000.parquet")


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path
