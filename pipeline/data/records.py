"""What a dataset is asked for and what it yields: a `DatasetSpec` names the rows, each row becomes a `Record`
(prompt parts and references), and a tokenized `Record` an `Example` (what a shard task runs on).

Its own module so that the adapters (`adapters.py`) and the task-specific loaders they dispatch to
(`choice_tasks.py`, `lm_eval_tasks.py`) share these types without importing each other both ways.
"""

from __future__ import annotations

import json
from dataclasses import dataclass


@dataclass(frozen=True)
class DatasetSpec:
    """Which rows to read and how to turn them into prompts (the conventions: `pipeline.data.adapters`' docstring)."""

    name: str
    split: str = "test"
    path: str | None = None
    data_dir: str | None = None
    prompt_column: str | None = None
    reference_column: str | None = None
    prompt_format: str = "plain"
    prompt_budget: int | None = 1024
    limit: int | None = None
    empty_references: str = "refuse"
    num_fewshot: int | None = None  # gsm8k, lm_eval: exemplars before each question (None: the task's own number)
    task: str | None = None  # lm_eval: the lm-evaluation-harness task name (`--task lm_eval:NAME`)
    fewshot_path: str | None = None  # lm_eval: a local file of the task's few-shot split


@dataclass(frozen=True)
class Record:
    """A row before tokenization: the prompt as `head + body + tail`, where only `body` may be cut."""

    seq_id: str
    head: str
    body: str
    tail: str
    references: tuple[str, ...]
    summary: bool
    row: str = ""  # the source row as JSON, for scorers that read other columns (user scorers, lm_eval metrics)

    @property
    def plain_prompt(self) -> str:
        return self.head + self.body + self.tail

    @property
    def reference(self) -> str:
        return reference_text(self.references)


@dataclass(frozen=True)
class Example:
    """One sequence to generate for: the final prompt and its token ids, the reference, and how to score it."""

    seq_id: str
    prompt: str
    prompt_ids: tuple[int, ...]
    references: tuple[str, ...]
    prompt_truncated: bool
    summary: bool
    row: str = ""  # the source row as JSON (Record.row)

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    @property
    def reference(self) -> str:
        return reference_text(self.references)


def reference_text(references: tuple[str, ...]) -> str:
    """How a reference is stored (Parquet `reference`): the text itself, or a JSON list when there are several."""
    return references[0] if len(references) == 1 else json.dumps(list(references), ensure_ascii=False)
