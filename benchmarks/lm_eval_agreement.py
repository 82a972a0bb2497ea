"""Acceptance check: a dynoracle multiple-choice run's `full` rows against lm-evaluation-harness's own HFLM.

Runs lm-eval's task (its YAML, over the local slice: `choice_tasks.lm_eval_task`) on the first N rows with
HFLM on a Hugging Face folder (for the embedded model: the converted copy in dynoracle's cache), and prints,
for the same rows of a finished run folder, the means of acc and acc_norm on both sides, the questions where
they differ and the largest log-likelihood difference.

    python benchmarks/lm_eval_agreement.py outputs/arc_easy_f32 [--model FOLDER] [--dtype float32]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from pipeline.data.choice_tasks import lm_eval_task
from pipeline.data.sources import data_dir
from pipeline.generation.models import cache_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a finished multiple-choice run folder (with the full configuration)")
    parser.add_argument("--model", default=str(cache_dir() / "smollm2-135m-instruct"),
                        help="Hugging Face folder of the run's model (default: the embedded model's converted copy)")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()
    from lm_eval.models.huggingface import HFLM

    record = json.loads((args.run / "run.json").read_text())
    name, limit = record["job"]["dataset"]["name"], record["sequences"]
    rows = pq.read_table(args.run / "choices", filters=[("config_id", "=", "full")]).to_pandas().sort_values("seq_id")
    task = lm_eval_task(name, data_dir(record["job"]["dataset"].get("data_dir")))
    task.build_all_requests(limit=limit, rank=0, world_size=1)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    start = time.monotonic()
    results = HFLM(pretrained=args.model, dtype=args.dtype, device="cpu",
                   batch_size=args.batch_size).loglikelihood(task.instances)
    seconds = time.monotonic() - start
    per_doc: dict[int, list[float]] = {}
    for instance, (loglik, _) in zip(task.instances, results):
        per_doc.setdefault(instance.doc_id, []).append(loglik)
    docs = task.test_docs() if task.has_test_docs() else task.validation_docs()
    theirs = [task.process_results(docs[i], [(ll, False) for ll in per_doc[i]]) for i in range(limit)]
    diff = max(float(np.max(np.abs(np.array(row) - np.array(per_doc[i])))) for i, row in enumerate(rows["loglik"]))
    print(f"{name}: {limit} questions, run {args.run} ({record['dtype']}, prefill {record['job']['prefill']}); "
          f"lm-eval HFLM {args.dtype} took {seconds:.0f} s")
    for metric in ("acc", "acc_norm"):
        mine = rows[metric].to_numpy()
        other = np.array([t.get(metric, np.nan) for t in theirs])
        print(f"  {metric:<9} dynoracle {mine.mean():.4f}  lm-eval {other.mean():.4f}  "
              f"questions that differ: {int((mine != other).sum())}")
    print(f"  largest |log-likelihood difference| over every choice: {diff:.2e} nats")


if __name__ == "__main__":
    main()
