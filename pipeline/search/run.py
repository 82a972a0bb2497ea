"""`dynoracle search RUN`: the I/O edge of the per-sequence search.

Reads a finished run, writes a new run folder (default `<RUN>-search`) that holds the source's rows plus
every searched and random program's row (`pipeline.search.task`), on the same executor and workers as
`dynoracle run`, resumably: rerunning the same command recomputes only missing shards, and a rerun with
other search settings is refused (they are part of the new run's identity).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from typing import Any

import pyarrow as pa

from pipeline.data.adapters import Example, load_examples, shard_examples
from pipeline.generation.models import load_tokenizer
from pipeline.run.atomic import write_json, write_parquet
from pipeline.run.cluster import ray_session
from pipeline.run.executor import RunError, execute, log, shards_to_compute, start_workers
from pipeline.run.job import JobSpec, job_from_dict
from pipeline.run.location import RunPath, read_parquet
from pipeline.run.rundir import CONFIGS_SCHEMA, RunDir, configs_fingerprint, job_identity
from pipeline.run.runner import dataset_fingerprint
from pipeline.run.shard_task import ExecSummary
from pipeline.run.tasks import run_task_name
from pipeline.search.evaluate import ChoiceEvaluator, Evaluator, GenerationEvaluator, search_metric
from pipeline.search.policy import ARMS, SearchSpec, slot_costs, slot_id
from pipeline.search.task import SearchTask


def search_record(source: dict[str, Any], spec: SearchSpec, source_dir: RunPath) -> dict[str, Any]:
    """The new run's run.json: the source's, with the search settings in its identity (so its shards are
    another job's) and the source folder named."""
    return {**source, "identity": {**source["identity"], "search": spec.to_dict()}, "search_source": str(source_dir),
            "configs": source["configs"] + len(ARMS) * spec.budget, "finished": None}


@dataclass
class PreparedSearch:
    """Everything a search needs before any worker starts: the task, the shards, the new run.json and the
    new configs table (source configurations, then every slot)."""

    source: RunDir
    out: RunDir
    record: dict[str, Any]
    task: SearchTask
    shards: list[list[Example]]
    configs: pa.Table
    model_fingerprint: str
    job: JobSpec


def evaluator_for(record: dict[str, Any], job: JobSpec) -> Evaluator:
    """The evaluator of a finished run's task (run.json `task`: multiple choice or generation), under its job's
    settings (prefill, batch size; for generation the token limit, rows per batch and scoring)."""
    if run_task_name(record) == "choice":
        return ChoiceEvaluator(job.prefill, job.batch_size)
    return GenerationEvaluator(job.max_new_tokens, job.prefill, job.max_rows, job.scoring)


def prepare_search(source_dir: str | RunPath, spec: SearchSpec, out: str | RunPath | None = None,
                   workers: int | None = None) -> PreparedSearch:
    """Check the source run and build the search over it (no model, no Ray); the returned task's spec has its
    metric resolved (None: the task's default, `evaluate.search_metric`). Raises ValueError (one line) for an
    unfinished source, an `out` equal to it, or a metric the run has no column for."""
    source, out = RunDir(source_dir), RunDir(out or f"{str(source_dir).rstrip('/')}-search")
    record = source.read_run_json()
    if record is None or not record.get("finished"):
        raise ValueError(f"{source.root} holds no finished run (run.json missing or unfinished); finish it with "
                         "`dynoracle run` first")
    if str(out.root) == str(source.root):
        raise ValueError("the search writes a new run folder; give --out another folder than the source run")
    configs = read_parquet(source.configs).to_pylist()
    spec = replace(spec, metric=search_metric(record, spec.metric, str(source.root)))
    job = job_from_dict({**record["job"], "workers": workers or record["job"].get("workers")})
    evaluator = evaluator_for(record, job)
    if spec.metric not in read_parquet(source.root / evaluator.folder / "shard=00000.parquet").column_names:
        raise ValueError(f"{source.root} has no score column {spec.metric!r} in {evaluator.folder}/")
    examples = load_examples(job.dataset, load_tokenizer(job.model, job.trust_remote_code))
    if dataset_fingerprint(examples) != record["dataset_fingerprint"]:
        raise ValueError(f"the dataset of {source.root} changed since it ran; its rows would not line up")
    slots = [{"config_id": slot_id(arm, j), "family": arm, "budget": c, "layers": [], "cost": c}
             for arm in ARMS for j, c in enumerate(slot_costs(spec))]
    task = SearchTask(str(source.root), tuple((k, json.dumps(v)) for k, v in job_identity(record).items()),
                      tuple((c["config_id"], tuple(c["layers"])) for c in configs), int(record["num_layers"]), spec,
                      evaluator)
    table = pa.Table.from_pylist(configs + slots, schema=CONFIGS_SCHEMA)
    new = {**search_record(record, spec, source.root), "configs_fingerprint": configs_fingerprint(table)}  # its own
    return PreparedSearch(source, out, new, task, shard_examples(examples, job.shard_size), table,
                          record["model_fingerprint"], job)


def run_search(source_dir: str | RunPath, spec: SearchSpec, out: str | RunPath | None = None,
               address: str | None = None, workers: int | None = None) -> tuple[RunPath, ExecSummary]:
    """Search every sequence of the finished run `source_dir` into the run folder `out` on the executor.
    Returns it and the executor's counts. Raises ValueError (one line) as `prepare_search`, or for an `out`
    holding another job."""
    prepared = prepare_search(source_dir, spec, out, workers)
    out, new = prepared.out, prepared.record
    with out.lock():
        previous = out.read_run_json()
        if previous is not None and previous.get("identity") != new["identity"]:
            raise ValueError(f"{out.root} holds a search of other settings or another run; choose another --out")
        if out.remove_stale_temp_files():
            log("removed half-written files of an interrupted search")
        todo = shards_to_compute(prepared.task, out, prepared.shards, job_identity(new))
        write_parquet(prepared.configs, out.configs)
        write_json(new, out.run_json)
        with ray_session(address) as session:
            with start_workers(prepared.job, session) as pool:
                if pool.infos[0]["fingerprint"] != prepared.model_fingerprint:
                    raise RunError(f"the model of {prepared.source.root} changed since it ran (fingerprint differs)")
                done = execute(prepared.task, out, prepared.shards, pool, job_identity(new), todo=todo)
        write_json(finished_record(new, prepared), out.run_json)
    return out.root, done


def finished_record(new: dict[str, Any], prepared: PreparedSearch) -> dict[str, Any]:
    """The run.json of a completed search run."""
    rows = sum(map(len, prepared.shards)) * prepared.configs.num_rows
    return {**new, "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"), "rows": rows}


def search_report(run_dir: str | RunPath, metric: str | None = None, budgets: tuple[float, ...] = (4.0, 8.0),
                  threshold: float = 0.3, resamples: int = 1000, seed: int = 0) -> dict[str, Any]:
    """The search curve of `metric` (default: the one the search maximised; `curve.curve`, at m = 0 and every
    round's end) and CoLa's shares (shorter = at most half the layers; right = `metric` >= `threshold` for a
    generation run, right = acc = 1, the highest-log-likelihood choice is the gold one, for a multiple-choice
    run, whatever the metric) of a search run; writes `search/curve.parquet`, `search/shares.json` and
    `search/search_curve.png` into it and returns {"curve", "shares", "files"}."""
    from pipeline.analysis.reduce import load_matrix
    from pipeline.report.search_figures import plot_search_curve
    from pipeline.search.curve import arm_shares, curve, split_columns

    root = RunDir(run_dir).root
    record = RunDir(run_dir).read_run_json() or {}
    if "search" not in record.get("identity", {}):
        raise ValueError(f"{root} is not a search run (its run.json has no search settings); run `dynoracle search`")
    spec = SearchSpec(**record["identity"]["search"])
    metric = metric or spec.metric
    matrix, _ = load_matrix(root, metric, None, "nominal")
    columns = split_columns(matrix.scores, matrix.costs, matrix.config_ids, matrix.config_families)
    steps = sorted({0, *range(spec.width, spec.budget, spec.width), spec.budget})
    frame = curve(columns, steps, list(budgets), resamples, seed)
    right, threshold = ("acc", 1.0) if run_task_name(record) == "choice" else (metric, threshold)
    if right != metric:
        right_matrix, _ = load_matrix(root, right, None, "nominal")
        right_columns = split_columns(right_matrix.scores, right_matrix.costs, right_matrix.config_ids,
                                      right_matrix.config_families)
    else:
        right_columns = columns
    shares = arm_shares(right_columns, threshold, matrix.num_layers / 2, resamples, seed)
    folder = root / "search"
    folder.mkdir(parents=True, exist_ok=True)
    write_parquet(pa.Table.from_pandas(frame, preserve_index=False), folder / "curve.parquet")
    shares_record = {name: {**vars(s), "right_metric": right, "threshold": threshold,
                            "max_cost": matrix.num_layers / 2} for name, s in shares.items()}
    write_json(shares_record, folder / "shares.json")
    figure = plot_search_curve(frame, matrix.num_layers, f"{root.name}: {metric}, {matrix.scores.shape[0]} sequences")
    figure.savefig(folder / "search_curve.png", dpi=110)
    return {"curve": frame, "shares": shares_record,
            "files": [folder / "curve.parquet", folder / "shares.json", folder / "search_curve.png"]}
