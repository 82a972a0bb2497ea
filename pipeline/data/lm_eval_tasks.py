"""lm-evaluation-harness tasks as datasets (`--task lm_eval:NAME`, the optional extra `dynoracle[lm-eval]`).

The task's own definitions come through lm-eval's Python API (`TaskManager`: its YAML, `process_docs`,
`doc_to_text`, `doc_to_target`, `fewshot_context`, `generation_kwargs.until`, `filter_list`, `metric_list`);
only the documents come from elsewhere when the hub cannot be reached: a local file of the task's evaluation
split (`--file`) and, for a few-shot task, one of its few-shot split (`--fewshot-file`). Online, without
`--file`, lm-eval loads the task's own dataset from the hub.

Two choices are dynoracle's: the few-shot exemplars are the first k documents of the few-shot split for
every question (lm-eval's `first_n` sampler, so the prompts are fixed and reproducible; lm-eval's default
sampler draws them at random per question), and k is the task's `num_fewshot` unless the job sets one.
Generate-until tasks only: a multiple-choice task is refused in one line.

Scoring (`lm_eval_scores`) runs on the workers: each output, already cut at the stop strings, goes through
every filter of the task and its metrics (`process_results`), one column `<metric>_<filter>` each
(`exact_match,strict-match` -> `exact_match_strict_match`), so the named `gsm8k` job and `lm_eval:gsm8k`
have the same columns.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pipeline.data.records import DatasetSpec, Record
from pipeline.data.sources import DataError, data_dir, read_file


_HINT = "install the extra: pip install 'dynoracle[lm-eval]'"


def metric_column(metric: str, filter_name: str) -> str:
    """The Parquet column of lm-eval's `<metric>,<filter>`: `exact_match,strict-match` -> `exact_match_strict_match`."""
    return re.sub(r"\W", "_", f"{metric}_{filter_name}")


@functools.cache
def _manager(name: str) -> Any:
    """A TaskManager that knows `name`: indexing all of lm-eval's ~10,000 YAML files takes a minute, so only
    the folder of a file that says `task: <name>` is indexed, and everything only when none does."""
    try:
        import lm_eval.tasks
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise DataError(f"--task lm_eval:NAME needs lm-evaluation-harness; {_HINT}") from None
    line = re.compile(rf"^task:\s*['\"]?{re.escape(name)}['\"]?\s*$", re.M)
    for path in sorted(Path(lm_eval.tasks.__file__).parent.rglob("*.yaml")):
        if line.search(path.read_text(encoding="utf-8", errors="replace")):
            manager = TaskManager(include_defaults=False, include_path=str(path.parent))
            if name in manager.all_subtasks:
                return manager
    return TaskManager()


@functools.cache
def _config(name: str) -> dict[str, Any]:
    """The task's resolved YAML (includes merged, `!function` entries imported); only generate-until tasks."""
    from lm_eval.tasks._yaml_loader import load_yaml

    manager = _manager(name)
    entry = manager.task_index.get(name)
    if entry is None or entry.yaml_path is None or name not in manager.all_subtasks:
        raise DataError(f"lm-evaluation-harness has no single task named {name!r} (groups and tags are not "
                        f"tasks; `lm_eval ls tasks` lists them)")
    config = load_yaml(entry.yaml_path, resolve_func=True)
    kind = config.get("output_type", "generate_until")
    if kind != "generate_until":
        raise DataError(f"lm_eval:{name} is a {kind} task; dynoracle runs lm-evaluation-harness's generate-until "
                        "tasks (multiple-choice ones are not supported yet)")
    return config


def _splits(config: dict[str, Any]) -> tuple[str, str | None]:
    """(evaluation split, few-shot split) as lm-eval reads them."""
    evaluation = config.get("test_split") or config.get("validation_split")
    fewshot = (config.get("fewshot_config") or {}).get("split") or config.get("fewshot_split")
    if evaluation is None:
        raise DataError("the lm_eval task names no test or validation split")
    return evaluation, fewshot


def build_task(name: str, rows: Sequence[dict] | None, fewshot_rows: Sequence[dict] | None) -> Any:
    """lm-eval's task object for `name`, its documents from `rows` (None: from the hub) and its exemplars from
    `fewshot_rows` (the first k are used; None: the evaluation rows or the hub's split)."""
    config = dict(_config(name))
    evaluation, fewshot = _splits(config)
    config["fewshot_config"] = {**(config.get("fewshot_config") or {}), "sampler": "first_n"}
    if rows is not None:
        import datasets

        splits = {evaluation: list(rows)}
        if fewshot is not None and fewshot != evaluation:
            splits[fewshot] = list(fewshot_rows if fewshot_rows is not None else rows)
        config["custom_dataset"] = lambda **_: datasets.DatasetDict(
            {split: datasets.Dataset.from_list(split_rows) for split, split_rows in splits.items()})
    return _manager(name).load([config])["tasks"][name]


def _num_fewshot(spec: DatasetSpec) -> int:
    return spec.num_fewshot if spec.num_fewshot is not None else int(_config(spec.task).get("num_fewshot") or 0)


def lm_eval_records(spec: DatasetSpec) -> list[Record]:
    """The task's prompts (few-shot context included) and targets, in document order, within `limit`."""
    if not spec.task:
        raise DataError("dataset lm_eval needs a task name (--task lm_eval:NAME)")
    config = _config(spec.task)
    evaluation, fewshot = _splits(config)
    k = _num_fewshot(spec)
    if spec.path:
        table = read_file(Path(spec.path))
        rows: list[dict] | None = [dict(row) for row in table.rows]
        needs_fewshot = k > 0 and fewshot is not None and fewshot != evaluation
        if needs_fewshot and not spec.fewshot_path:
            raise DataError(f"lm_eval:{spec.task} takes {k} exemplars from its {fewshot} split: give a local file "
                            "of it with --fewshot-file (or --num-fewshot 0)")
        fewshot_rows = [dict(row) for row in read_file(Path(spec.fewshot_path)).rows] if needs_fewshot else None
    elif data_dir(spec.data_dir) is not None:
        raise DataError(f"lm_eval:{spec.task} reads {config.get('dataset_path')} from the hub, but local data only "
                        "was asked for: point it at a local file of its documents with --file")
    else:
        rows = fewshot_rows = None
    task = build_task(spec.task, rows, fewshot_rows)
    docs = list(task.eval_docs)
    raw = rows if rows is not None else [dict(row) for row in task.dataset[evaluation]]
    count = len(docs) if spec.limit is None else spec.limit
    if count > len(docs):
        raise DataError(f"limit {spec.limit} is more than the {len(docs)} documents of lm_eval:{spec.task}")
    prefix = f"{spec.task}-{evaluation}"
    return [Record(f"{prefix}-{i:06d}", task.fewshot_context(doc, k), "", "", _targets(task, doc), False,
                   json.dumps(raw[i], default=str)) for i, doc in enumerate(docs[:count])]


def _targets(task: Any, doc: dict) -> tuple[str, ...]:
    target = task.doc_to_target(doc)
    if isinstance(target, int) and task.config.doc_to_choice is not None:
        target = task.doc_to_choice(doc)[target]
    return tuple(str(t) for t in target) if isinstance(target, list) else (str(target),)


def lm_eval_until(name: str) -> tuple[str, ...]:
    """The task's stop strings (`generation_kwargs.until`)."""
    until = (_config(name).get("generation_kwargs") or {}).get("until") or ()
    return (until,) if isinstance(until, str) else tuple(until)


def lm_eval_columns(name: str) -> tuple[str, ...]:
    """One column per (filter, metric) of the task, filter-major: `<metric>_<filter>`."""
    config = _config(name)
    filters = [f["name"] for f in config.get("filter_list") or [{"name": "none"}]]
    metrics = [m["metric"] for m in config.get("metric_list") or []]
    return tuple(metric_column(m, f) for f in filters for m in metrics)


def lm_eval_scores(name: str, rows: Sequence[str], outputs: Sequence[Sequence[str]]) -> dict[str, list[float]]:
    """Scores of `outputs[i][k]` (document i's output under configuration k, cut at the stop strings), flat in
    that order, per column of `lm_eval_columns`. `rows` are the documents' source rows as JSON (Record.row).

    Raises DataError when a metric gives something other than a number per document.
    """
    task = build_task(name, [json.loads(row) for row in rows], None)
    docs = list(task.eval_docs)
    columns: dict[str, list[float]] = {column: [] for column in lm_eval_columns(name)}
    for doc, per_config in zip(docs, outputs):
        for output in per_config:
            for ensemble in task._filters:
                answers: Any = [[output]]
                for step in ensemble.filters:
                    answers = step().apply(answers, [doc])
                for metric, value in task.process_results(doc, list(answers)).items():
                    column = metric_column(metric, ensemble.name)
                    if column not in columns or isinstance(value, bool) or not isinstance(value, (int, float)):
                        raise DataError(f"lm_eval:{name}: metric {metric} gives {type(value).__name__} per document; "
                                        "only per-document numbers can be columns")
                    columns[column].append(float(value))
    return columns
