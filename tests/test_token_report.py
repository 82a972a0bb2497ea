"""The per-token experiments' tables through `query` and `report` on a handmade run (no model)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from handmade_run import L, make_run

from pipeline.analysis import gate_curves, token_oracle
from pipeline.report.figures import build_report
from pipeline.report.query import query_run
from pipeline.run.atomic import write_parquet
from pipeline.run.rundir import RunDir, job_identity, write_shard
from pipeline.run.verify import RunFolderError


def _gate_rows(seqs: list[str], shard: int) -> pa.Table:
    rows = [{"seq_id": s, "shard": shard, "gates": f"{g}-lambda{lam:g}", "gate_input": g, "lam": lam, "kv": "compute",
             "cost": L - 4 * lam - (g == "fixed"), "layers_per_token": float(L), "gen_tokens": 5, "finish_reason": "eos",
             "output": "x", "rouge1": 0.3, "rouge2": 0.1, "rougeL": 0.3 - lam / 10, "rougeLsum": 0.3, "fidelity": 0.5}
            for s in seqs for g in ("hidden", "fixed") for lam in (0.1, 1.0)]
    return pa.Table.from_pylist(rows, schema=gate_curves.SHARD_SCHEMA)


def _token_rows(seqs: list[str], shard: int) -> pa.Table:
    rows = [{"seq_id": s, "shard": shard, "position": t, "token": 7, "family": f, "cost": 1 + (t * 3) % L,
             "config_id": "full", "num_layers": L} for s in seqs for t in range(1, 9) for f in ("ee", "uls")]
    return pa.Table.from_pylist(rows, schema=token_oracle.SHARD_SCHEMA)


def test_gates_and_token_oracle_reach_query_and_report(tmp_path):
    run = make_run(tmp_path / "run")
    record = RunDir(run).read_run_json()
    shards = [[f"q{n:03d}" for n in range(10) if n % 2 == shard] for shard in (0, 1)]
    gates = pd.concat([_gate_rows(seqs, i).to_pandas() for i, seqs in enumerate(shards)])
    tokens = pd.concat([_token_rows(seqs, i).to_pandas() for i, seqs in enumerate(shards)])
    for i, seqs in enumerate(shards):
        write_shard(run / gate_curves.FOLDER / f"shard={i:05d}.parquet", i, _gate_rows(seqs, i), job_identity(record))
    with pytest.raises(RunFolderError, match="token-oracle"):  # one shard file of two: refused, naming it
        write_shard(run / token_oracle.FOLDER / "shard=00000.parquet", 0, _token_rows(shards[0], 0), job_identity(record))
        write_shard(run / token_oracle.FOLDER / "shard=00001.parquet", 1, _token_rows(shards[1], 1), {"other": "job"})
        query_run(run, "select count(*) from token_oracle")
    write_shard(run / token_oracle.FOLDER / "shard=00001.parquet", 1, _token_rows(shards[1], 1), job_identity(record))
    _, rows = query_run(run, "select gate_input, count(*) from gates group by 1 order by 1")
    assert rows == [("fixed", 20), ("hidden", 20)]
    _, rows = query_run(run, "select count(*), sum(cost) from token_oracle")
    assert rows == [(len(tokens), int(tokens["cost"].sum()))]

    write_parquet(pa.Table.from_pandas(gate_curves.summarise(gates, resamples=50), schema=gate_curves.SUMMARY_SCHEMA,
                                       preserve_index=False), run / gate_curves.SUMMARY)
    write_parquet(pa.Table.from_pandas(token_oracle.summarise(tokens, resamples=50), preserve_index=False),
                  run / token_oracle.SUMMARY)
    write_parquet(pa.Table.from_pandas(token_oracle.by_position(tokens), preserve_index=False),
                  run / token_oracle.POSITIONS)
    curves = gate_curves.read_gates(run, "rougeL")
    assert sorted(curves["gates"]) == ["fixed-lambda0.1", "fixed-lambda1", "hidden-lambda0.1", "hidden-lambda1"]
    assert np.allclose(curves.sort_values("gates")["mean"], [0.29, 0.2, 0.29, 0.2])
    report = build_report(run)
    assert {p.name for p in report.figures} >= {"cost_quality.png", "token_oracle.png"}
    assert "token_oracle.png" in report.markdown.read_text()
    assert json.loads((run / "oracle" / "rougeL" / "summary.json").read_text())["num_layers"] == L
