"""The README's search study in one process: `dynoracle run` then `dynoracle search`, the same shard tasks
writing the same files, for a machine where Ray cannot start its node in time (this shared 2-core machine
under a load average near 50 timed out every `ray.init`). Ray is never started; each shard is computed by
the executor's `ShardWorker` here and written and checked as the executor does.

    python benchmarks/search_study.py --out outputs/search_study [--limit 8] [--budget 16] [--width 4]
                                      [--model M] [--max-new-tokens N] [--dataset alpaca|arc_easy|...]

A multiple-choice dataset (`--dataset arc_easy`) runs the choice task and the search scores by log-likelihood,
maximising prob_gold (`pipeline.search.evaluate.ChoiceEvaluator`).
"""

from __future__ import annotations

import argparse
import time

from pipeline.data.adapters import CHOICE_DATASETS, load_examples, shard_examples
from pipeline.generation.choice_task import ChoiceTask
from pipeline.generation.scoring import sentence_splitter
from pipeline.generation.task import GenerateTask
from pipeline.run.atomic import write_json, write_parquet
from pipeline.run.job import load_job
from pipeline.run.rundir import RunDir, configs_table, job_identity, write_shard
from pipeline.run.runner import dataset_fingerprint
from pipeline.run.worker import ShardWorker
from pipeline.search.policy import SearchSpec
from pipeline.search.run import finished_record, prepare_search, search_report


def _write_shards(task, run: RunDir, shards, worker: ShardWorker, identity: dict) -> None:
    for index, shard in enumerate(shards):
        if task.shard_problem(run, index, shard, identity) is None:
            continue  # resumable like the executor
        start = time.monotonic()
        write_shard(task.shard_path(run, index), index, worker.run(task, index, shard), identity)
        problem = task.shard_problem(run, index, shard, identity)
        if problem is not None:
            raise RuntimeError(f"shard {index}: {problem}")
        print(f"{run.root.name} shard {index}: {time.monotonic() - start:.0f} s", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="outputs/search_study")
    parser.add_argument("--limit", type=int, default=8)
    parser.add_argument("--budget", type=int, default=16)
    parser.add_argument("--width", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", default=None, help="default: the job's (the embedded model)")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="default: the job's (32)")
    parser.add_argument("--dataset", default="alpaca", help="alpaca (ROUGE-L) or a multiple-choice task (prob_gold)")
    args = parser.parse_args()

    started = time.monotonic()
    overrides = {"out": args.out, "workers": 1, "shard_size": 4, "dataset": {"limit": args.limit}}
    overrides |= {"model": args.model} if args.model else {}
    overrides |= {"max_new_tokens": args.max_new_tokens} if args.max_new_tokens else {}
    spec = load_job(dataset=args.dataset, overrides=overrides)
    choice = spec.dataset.name in CHOICE_DATASETS
    worker = ShardWorker(spec, "cpu")
    lm = worker.lm
    examples = load_examples(spec.dataset, lm.tokenizer)
    shards = shard_examples(examples, spec.shard_size)
    configs = spec.configurations(lm.num_layers)
    split = spec.scoring.sentence_split if spec.scoring.sentence_split is not None else examples[0].summary
    record = {"task": "choice" if choice else "generate", "job": spec.to_dict(), "identity": spec.identity(),
              "scoring": {**spec.scoring.to_dict(), "sentence_split": split,
                          "sentence_splitter": sentence_splitter() if split else None},
              "model_fingerprint": lm.fingerprint(), "checkpoint_fingerprints": {}, "dtype": lm.dtype,
              "num_layers": lm.num_layers, "dataset_fingerprint": dataset_fingerprint(examples),
              "sequences": len(examples), "configs": len(configs), "shards": len(shards), "finished": None}
    run = RunDir(spec.run_dir)
    run.root.mkdir(parents=True, exist_ok=True)
    write_parquet(configs_table(configs), run.configs)
    write_json(record, run.run_json)
    task = ChoiceTask(tuple(configs), spec.prefill, spec.batch_size) if choice else GenerateTask(
        tuple(configs), spec.max_new_tokens, spec.prefill, spec.batch_size, spec.max_rows, spec.scoring)
    _write_shards(task, run, shards, worker, job_identity(record))
    write_json({**record, "finished": time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime()),
                "rows": len(examples) * len(configs)}, run.run_json)
    print(f"source run: {time.monotonic() - started:.0f} s", flush=True)

    search_spec = SearchSpec(args.budget, args.width, lm.num_layers, args.seed)  # the task's default metric
    prepared = prepare_search(run.root, search_spec)
    prepared.out.root.mkdir(parents=True, exist_ok=True)
    write_parquet(prepared.configs, prepared.out.configs)
    write_json(prepared.record, prepared.out.run_json)
    searched = time.monotonic()
    _write_shards(prepared.task, prepared.out, prepared.shards, worker, job_identity(prepared.record))
    write_json(finished_record(prepared.record, prepared), prepared.out.run_json)
    print(f"search: {time.monotonic() - searched:.0f} s", flush=True)
    result = search_report(prepared.out.root, None, (4.0, 8.0), 0.3, seed=args.seed)
    print(result["curve"].to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    print(result["shares"])
    print("files:", *map(str, result["files"]))


if __name__ == "__main__":
    main()
