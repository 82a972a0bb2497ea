"""`dynoracle run`: a job becomes a run folder of generation shard files, resumably.

Steps: read and shard the dataset -> lock the run folder -> check it holds no other job -> start the
workers (pipeline.run.executor) -> record the run in run.json and configs.parquet -> execute the generation
task over every shard whose file is missing or invalid -> mark run.json finished.

Later passes over an existing run (hidden-state similarity, prompt features) are other shard tasks run by
the same executor over the same shards: `run_task` reopens the run folder from its run.json for them.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import platform
import subprocess
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import ray
import torch

from pipeline.data.adapters import CHOICE_DATASETS, Example, load_examples, shard_examples
from pipeline.data.choice_tasks import ChoiceExample
from pipeline.generation.choice_task import ChoiceTask
from pipeline.generation.answer_scoring import AnswerScoring, plan_answers
from pipeline.generation.checkpoints import check_checkpoints, with_resolved_checkpoints
from pipeline.generation.configs import SkipConfig
from pipeline.generation.models import load_tokenizer
from pipeline.generation.scoring import mostly_dropped
from pipeline.generation.task import GenerateTask
from pipeline.run.atomic import write_json, write_parquet
from pipeline.run.cluster import describe_nodes, plan_workers, ray_session
from pipeline.run.executor import (
    RunError,
    ShardDispatcher,
    execute,
    log,
    shards_to_compute,
    start_workers,
)
from pipeline.run.job import JobSpec, job_from_dict
from pipeline.run.shard_task import ExecSummary, ShardTask
from pipeline.run.location import RunPath, read_parquet
from pipeline.run.preflight import check_job
from pipeline.run.rundir import RunDir, configs_fingerprint, configs_table, job_identity

__all__ = ["RunError", "RunSummary", "run_job", "run_task"]


@dataclass
class RunSummary:
    run_dir: RunPath
    shards: int
    skipped: int
    computed: int
    rows: int
    gen_tokens: int
    generate_s: float  # from the first shard handed out to the last one written
    elapsed_s: float = 0.0  # the whole run, start-up included


def dataset_fingerprint(examples: list[Example]) -> str:
    """A hash of what the model sees and is scored against: tells a changed data file apart from a rerun."""
    digest = hashlib.sha256()
    for ex in examples:
        digest.update(f"{ex.seq_id}\0{','.join(map(str, ex.prompt_ids))}\0{ex.reference}\0".encode())
        if isinstance(ex, ChoiceExample):  # every choice's tokens and the right one decide its rows too
            digest.update(f"{ex.requests}\0{ex.choices}\0{ex.gold}\0".encode())
    return digest.hexdigest()[:16]


def _versions() -> dict[str, str]:
    import pyarrow
    import torch
    import transformers

    return {"dynoracle": importlib.metadata.version("dynoracle"), "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "ray": ray.__version__, "pyarrow": pyarrow.__version__}


def _git_sha() -> str | None:
    """The commit of the checkout the package runs from; None for an installed package (even one whose
    site-packages sits inside some other repository)."""
    checkout = Path(__file__).resolve().parents[2]
    try:
        out = subprocess.run(["git", "rev-parse", "--show-toplevel", "HEAD"], cwd=checkout, capture_output=True,
                             text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    lines = out.stdout.split()
    return lines[1] if len(lines) == 2 and Path(lines[0]).resolve() == checkout else None


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _check_same(previous: dict[str, Any] | None, key: str, value: Any, run_dir: RunPath) -> None:
    """Refuse to mix rows of two different jobs in one folder."""
    if previous is None or previous.get(key) in (None, value):
        return
    if isinstance(value, dict):
        old = previous[key]
        differing = sorted(k for k in set(value) | set(old) if value.get(k) != old.get(k))
        what = ", ".join(differing)
    else:
        what = key.replace("_", " ")
    raise ValueError(f"run folder {run_dir} holds a different job ({what} differ); "
                     f"choose another --name or --out, or remove the folder")


def run_job(spec: JobSpec, address: str | None = None,
            on_dispatch: Callable[[ShardDispatcher], None] | None = None) -> RunSummary:
    """Generate every missing shard of the job's run folder; see the module docstring for the steps.

    `on_dispatch(dispatcher)` runs after each finished shard (tests use it to kill a busy worker).
    """
    start = time.monotonic()
    run = RunDir(spec.run_dir)
    named = tuple(spec.checkpoints)  # every entry must name a configuration, even one on the job's own model
    spec = with_resolved_checkpoints(spec)
    examples = load_examples(spec.dataset, load_tokenizer(spec.model, spec.trust_remote_code))  # before the folder
    shards = shard_examples(examples, spec.shard_size)                  # exists: bad data leaves no run folder behind
    depth = check_job(spec, examples).get_text_config().num_hidden_layers  # configurations, checkpoints: up front too
    configs = spec.configurations(depth)
    check_checkpoints(spec, configs, depth, named)
    if spec.dataset.name in CHOICE_DATASETS and spec.checkpoints:
        raise ValueError(f"{spec.dataset.name} is a multiple-choice task, which runs every configuration on the job's "
                         "model; [checkpoints] are for generation jobs only: remove them")
    if not (address or os.environ.get("RAY_ADDRESS")):  # a private local Ray gets exactly these resources
        local = [{"CPU": float(os.cpu_count() or 1), "GPU": float(torch.cuda.device_count())}]
        plan = plan_workers(spec, local)
        if not plan.fits(local):
            raise ValueError(f"cannot place {plan.describe()} on this machine ({describe_nodes(local)})")
    data_print = dataset_fingerprint(examples)
    answers = plan_answers(spec.dataset, spec.scorer, spec.stop, examples)  # imports and tries the scorer
    # a plain ROUGE run keeps the identity it had before answers existed
    identity = spec.identity() if answers == AnswerScoring() else {**spec.identity(), "answers": answers.record()}
    if spec.scoring.tokenizer == "default":
        _warn_non_latin(examples)
    with run.lock():
        previous = run.read_run_json()
        _check_same(previous, "identity", identity, run.root)
        _check_same(previous, "dataset_fingerprint", data_print, run.root)
        if run.remove_stale_temp_files():
            log("removed half-written files of an interrupted run")
        done = _complete_already(spec, previous, configs, run, shards, answers)
        if done is not None:
            return RunSummary(run.root, done.shards, done.skipped, 0, len(examples) * len(configs), 0, 0.0,
                              time.monotonic() - start)
        with ray_session(address, spec.start_timeout) as session:
            log(f"{spec.name}: {len(examples)} sequences in {len(shards)} shards")
            with start_workers(spec, session) as pool:
                infos = pool.infos
                num_layers, model_print, dtype = infos[0]["num_layers"], infos[0]["fingerprint"], infos[0]["dtype"]
                log(f"model loaded: {num_layers} layers, {dtype}")
                _check_same(previous, "dtype", dtype, run.root)
                _check_same(previous, "model_fingerprint", model_print, run.root)
                scoring = _scoring_record(spec, examples, infos)
                _check_same(previous, "scoring", scoring, run.root)
                choice = spec.dataset.name in CHOICE_DATASETS
                log(f"split {spec.dataset.split}; " + ("multiple choice by log-likelihood, prefill " + spec.prefill
                    if choice else f"ROUGE {'with' if scoring['stemming'] else 'without'} stemming, "
                    f"{scoring['tokenizer']} tokenizer, rougeLsum sentence splitting "
                    f"{scoring['sentence_splitter'] if scoring['sentence_split'] else 'off'}"))
                if num_layers != depth or len({json.dumps(i["checkpoint_fingerprints"]) for i in infos}) > 1:
                    raise RunError("workers loaded models of another depth or different checkpoints")
                checkpoint_prints = infos[0]["checkpoint_fingerprints"]
                _check_same(previous, "checkpoint_fingerprints", checkpoint_prints, run.root)
                configs_rows = configs_table(configs)
                if answers.columns or answers.stop:
                    log(f"stop strings {list(answers.stop)}; metric columns beside ROUGE: {', '.join(answers.columns)}")
                record = {"task": "choice" if choice else "generate", "job": spec.to_dict(), "identity": identity, "scoring": scoring, "model_fingerprint": model_print,
                          "metric_columns": list(answers.columns),
                          "configs_fingerprint": configs_fingerprint(configs_rows),
                          "checkpoint_fingerprints": checkpoint_prints,
                          "dtype": dtype, "num_layers": num_layers, "dataset_fingerprint": data_print, "sequences": len(examples),
                          "configs": len(configs), "shards": len(shards), "versions": _versions(),
                          "git_sha": _git_sha(), "started": _now(), "finished": None, "workers": infos}
                task = _shard_task(spec, configs, answers)
                todo = shards_to_compute(task, run, shards, job_identity(record))  # before run.json claims the folder
                write_parquet(configs_rows, run.configs)
                write_json(record, run.run_json)
                done = execute(task, run, shards, pool, job_identity(record), on_dispatch, todo)
        write_json({**record, "finished": _now(), "rows": len(examples) * len(configs)}, run.run_json)
    return RunSummary(run.root, done.shards, done.skipped, done.computed, len(examples) * len(configs), done.tokens,
                      done.seconds, time.monotonic() - start)


def _shard_task(spec: JobSpec, configs: list[SkipConfig], answers: AnswerScoring) -> ChoiceTask | GenerateTask:
    """The run's shard task: choice scoring for a multiple-choice dataset, else generation."""
    if spec.dataset.name in CHOICE_DATASETS:
        return ChoiceTask(tuple(configs), spec.prefill, spec.batch_size)
    return GenerateTask(tuple(configs), spec.max_new_tokens, spec.prefill, spec.batch_size, spec.max_rows,
                        spec.scoring, tuple(sorted(spec.checkpoints.items())), answers, spec.sampling)


def _complete_already(spec: JobSpec, previous: dict[str, Any] | None, configs: list[SkipConfig], run: RunDir,
                      shards: list[list[Example]], answers: AnswerScoring) -> ExecSummary | None:
    """A finished run of this job whose shard files are all valid: nothing to do, and Ray is not started.

    Only when no local model or checkpoint file changed since the run finished (their weights' fingerprint is
    known only once a worker loads them); else None, and the run goes on as usual (which checks it)."""
    if previous is None or not previous.get("finished") or previous.get("shards") != len(shards):
        return None
    finished = datetime.fromisoformat(previous["finished"]).timestamp()
    for source in (spec.model, *spec.checkpoints.values()):
        path = Path(source)
        files = [path] if path.is_file() else path.rglob("*") if path.is_dir() else []
        if any(f.stat().st_mtime >= finished for f in files):
            return None
    if shards_to_compute(_shard_task(spec, configs, answers), run, shards, job_identity(previous)):
        return None
    if not _configs_intact(run, configs):  # the full run rewrites an edited or damaged configs.parquet
        return None
    log(f"{spec.name}: all {len(shards)} shards are complete; nothing to compute (Ray not started)")
    return ExecSummary(len(shards), len(shards), 0, 0, 0.0)


def _configs_intact(run: RunDir, configs: list[SkipConfig]) -> bool:
    """Whether configs.parquet holds exactly `configs` (its fingerprint; False when missing or unreadable)."""
    try:
        return configs_fingerprint(read_parquet(run.configs)) == configs_fingerprint(configs_table(configs))
    except (OSError, ValueError, KeyError):
        return False


def _warn_non_latin(examples: list[Example]) -> None:
    """One line when the default ROUGE tokenizer would drop most of some references (they would score 0)."""
    dropped = [ex.seq_id for ex in examples if any(mostly_dropped(text) for text in ex.references)]
    if dropped:
        log(f"warning: {len(dropped)} of {len(examples)} references (first {dropped[0]}) are mostly outside [a-z0-9], "
            "which the default ROUGE tokenizer drops; set tokenizer = \"unicode\" in [scoring] (--tokenizer unicode)")


def _scoring_record(spec: JobSpec, examples: list[Example], infos: list[dict]) -> dict[str, Any]:
    """The scoring as run: the job's options with sentence splitting resolved, and the workers' sentence splitter."""
    split = spec.scoring.sentence_split if spec.scoring.sentence_split is not None else examples[0].summary
    splitters = sorted({info["sentence_splitter"] for info in infos})
    if split and len(splitters) > 1:
        raise RunError(f"workers split sentences differently ({', '.join(splitters)}): install nltk's punkt data "
                       "on every node, or on none")
    return {**spec.scoring.to_dict(), "sentence_split": split, "sentence_splitter": splitters[0] if split else None}


def run_task(run_dir: str | RunPath, make_task: Callable[[JobSpec, dict[str, Any]], ShardTask],
             address: str | None = None, workers: int | None = None) -> ExecSummary:
    """Execute another shard task over the shards of a finished run, resumably, with the run's own model.

    `make_task(spec, record)` builds the task from the run's job and run.json. The run's dataset is read
    and sharded again exactly as `run` did; a changed dataset or model (fingerprints) is an error, since
    the task's rows would no longer line up with the run's generations.
    """
    run = RunDir(run_dir)
    record = run.read_run_json()
    if record is None or not record.get("finished"):
        raise ValueError(f"{run.root} holds no finished run (run.json missing or unfinished); "
                         f"finish it first with `dynoracle run`")
    spec = job_from_dict({**record["job"], "workers": workers or record["job"].get("workers")})
    examples = load_examples(spec.dataset, load_tokenizer(spec.model, spec.trust_remote_code))
    if dataset_fingerprint(examples) != record["dataset_fingerprint"]:
        raise ValueError(f"the dataset of {run.root} changed since it ran; its rows would not line up")
    shards = shard_examples(examples, spec.shard_size)
    task = make_task(spec, record)
    with run.lock():
        if run.remove_stale_temp_files():
            log("removed half-written files of an interrupted run")
        with ray_session(address, spec.start_timeout) as session:
            with start_workers(spec, session) as pool:
                if pool.infos[0]["fingerprint"] != record["model_fingerprint"]:
                    raise RunError(f"the model of {run.root} changed since it ran (fingerprint differs)")
                return execute(task, run, shards, pool, job_identity(record))
