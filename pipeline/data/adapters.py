"""Dataset adapters: rows -> prompt, reference and a stable seq_id, tokenized within a prompt budget, then sharded.

Prompt layout. Every prompt is `head + body + tail`; only `body` (the article, the dialogue, Alpaca's input,
or the instruction when there is no input) may be cut, so the template header, the instruction and the
answer cue ("### Response:", "### Summary:", "Summary:") always survive. A prompt over the budget loses
tokens from the left of its body (DESIGN.md: "truncated from the left of the article/input").

A file has no splits of its own: `test`, the default, is every row, while `train` and `validation` cut its
rows by the study's rule below (70% / 15%, seed 42), which `finetune` uses for its training and evaluation.

Seq ids are `<dataset>-<split>-<position>` (`file`: `<file stem>-<position>`), the position of the row in
the split as served: for Alpaca, its place in the study's split below; otherwise its row index in the
source. They are the same on every run and machine for the same source data (the hub and a local mirror
are different sources).

The Alpaca split is the study's (Glavas et al., 2024, `src/utils/prepare_dataset.py`), made by the same
two calls of `datasets.Dataset.train_test_split`: `train_test_split(test_size=0.3, seed=42)` over all rows
gives train (its `train` part); the held-out part is split again with `test_size=0.5, seed=42`, whose `test`
part is the test split and whose `train` part is the validation split (52,002 hub rows -> 36,401 / 7,800 /
7,801). Rows keep the order those calls give (shuffled), so the first N of a split (`limit`) are a random
sample of it. A local slice is split the same way, so its splits are splits of the slice, not the study's rows.

References. A reference is one non-empty text, or a list of them (scored against the best match); a null
or empty reference is refused with the row named, before anything is generated. `empty_references = "keep"`
keeps empty ones (they score 0, as in the study, whose Alpaca rows include some with an empty output).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.data import gsm8k
from pipeline.data.choice_tasks import CHOICE_TASKS, load_choice_examples
from pipeline.data.lm_eval_tasks import lm_eval_records
from pipeline.data.records import DatasetSpec, Example, Record
from pipeline.data.sources import DATA_DIR_ENV, DataError, Table, _first_line, data_dir, read_file, read_files, read_hub

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = ["DATASETS", "DataError", "DatasetSpec", "Example", "Record", "data_source", "load_examples", "load_records",
           "load_split", "shard_examples", "split_indices"]

CHOICE_DATASETS = tuple(CHOICE_TASKS)  # multiple-choice benchmarks scored by log-likelihood (choice_tasks.py)
DATASETS = ("alpaca", "cnn_dailymail", "samsum", "gsm8k", "file", "hub", "lm_eval", *CHOICE_DATASETS)
PROMPT_FORMATS = ("plain", "chat")
SPLITS = ("train", "validation", "test")
EMPTY_REFERENCES = ("refuse", "keep")
# A file is one split: `test` (the default) serves every row; `train` and `validation` cut it as Alpaca is cut,
# so that `finetune` never evaluates on rows it trained on.
FILE_TRAINING_SPLITS = ("train", "validation")
SPLIT_SEED = 42
HELD_OUT = 0.3  # first call's test_size; the held-out part is then halved (second call's test_size 0.5)

ALPACA_HEADER = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
)
ALPACA_HEADER_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
)


@dataclass(frozen=True)
class _Adapter:
    """How one dataset's rows become prompts; `own_split` means the hub has one split and we cut it ourselves."""

    hub_id: str | None
    hub_config: str | None
    prompt_column: str
    reference_column: str
    summary: bool
    parts: Callable[[dict], tuple[str, str, str]]
    own_split: bool = False


def _text(value: object) -> str:
    return "" if value is None else str(value)


def _alpaca_parts(row: dict) -> tuple[str, str, str]:
    instruction, given = _text(row["instruction"]), _text(row.get("input"))
    if given:
        return f"{ALPACA_HEADER_WITH_INPUT}### Instruction:\n{instruction}\n\n### Input:\n", given, "\n\n### Response:\n"
    return f"{ALPACA_HEADER}### Instruction:\n", instruction, "\n\n### Response:\n"


_NAMED = {
    "alpaca": _Adapter("tatsu-lab/alpaca", None, "instruction", "output", False, _alpaca_parts, own_split=True),
    "cnn_dailymail": _Adapter(
        "abisee/cnn_dailymail", "3.0.0", "article", "highlights", True,
        lambda row: ("### Article:\n", _text(row["article"]), "\n\n### Summary:\n"),
    ),
    "samsum": _Adapter(
        "Samsung/samsum", None, "dialogue", "summary", True,
        lambda row: ("", _text(row["dialogue"]), "\n\nSummary:\n"),
    ),
}


def split_indices(n: int, split: str) -> list[int]:
    """Row indices (into n source rows) of one split of the study's split, in the order it serves them.

    The study's two `train_test_split` calls (module docstring), run on a column of row indices: the
    shuffle depends only on n and the seed, so this equals splitting the rows themselves. Raises
    DataError for an unknown split or when n is too small to split (fewer than 4 rows).
    """
    import datasets

    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; choose from {', '.join(SPLITS)}")
    rows = datasets.Dataset.from_dict({"index": list(range(n))})
    try:
        first = rows.train_test_split(test_size=HELD_OUT, seed=SPLIT_SEED)
        if split == "train":
            return list(first["train"]["index"])
        second = first["test"].train_test_split(test_size=0.5, seed=SPLIT_SEED)
    except ValueError as exc:
        raise DataError(f"cannot split {n} rows into train, validation and test: {_first_line(exc)}") from None
    return list(second["test" if split == "test" else "train"]["index"])


def _check_spec(spec: DatasetSpec) -> _Adapter:
    if spec.name not in DATASETS:
        raise DataError(f"unknown dataset {spec.name!r}; choose from {', '.join(DATASETS)}")
    if spec.prompt_format not in PROMPT_FORMATS:
        raise DataError(f"unknown prompt format {spec.prompt_format!r}; choose from {', '.join(PROMPT_FORMATS)}")
    if spec.prompt_budget is not None and spec.prompt_budget < 1:
        raise DataError(f"prompt budget must be at least 1 token, got {spec.prompt_budget}")
    if spec.limit is not None and spec.limit < 1:
        raise DataError(f"limit must be at least 1, got {spec.limit}")
    if spec.empty_references not in EMPTY_REFERENCES:
        raise DataError(f"unknown empty_references {spec.empty_references!r}; choose from {', '.join(EMPTY_REFERENCES)}")
    if spec.name == "alpaca" and spec.split not in SPLITS:
        raise DataError(f"unknown split {spec.split!r}; choose from {', '.join(SPLITS)}")
    if spec.num_fewshot is not None and (spec.name not in ("gsm8k", "lm_eval") or spec.num_fewshot < 0):
        raise DataError(f"num_fewshot is for gsm8k and lm_eval tasks, a number >= 0; got {spec.num_fewshot} "
                        f"for {spec.name}")
    if spec.name == "gsm8k":
        if spec.path or spec.prompt_column or spec.reference_column:
            raise DataError("gsm8k has its own source and columns; path and columns are for file and hub")
        k = gsm8k.DEFAULT_FEWSHOT if spec.num_fewshot is None else spec.num_fewshot
        context = gsm8k.fewshot_context(gsm8k.exemplars(k, data_dir(spec.data_dir)))
        return _Adapter(gsm8k.HUB_ID, gsm8k.HUB_CONFIG, "question", "answer", False,
                        lambda row: gsm8k.prompt_parts(context, row))
    if spec.name in _NAMED:
        if spec.path or spec.prompt_column or spec.reference_column:
            raise DataError(f"{spec.name} has its own source and columns; path and columns are for file and hub")
        return _NAMED[spec.name]
    if not spec.path or not spec.prompt_column or not spec.reference_column:
        raise DataError(f"dataset {spec.name} needs a {'file path' if spec.name == 'file' else 'hub id'}, "
                        "a prompt column and a reference column")
    column = spec.prompt_column
    return _Adapter(None, None, column, spec.reference_column, False, lambda row: ("", _text(row[column]), ""))


def _read(spec: DatasetSpec, adapter: _Adapter) -> Table:
    root = data_dir(spec.data_dir)
    if spec.name == "file":
        return read_file(Path(spec.path))
    if spec.name == "hub":
        if root is not None:
            raise DataError(f"dataset hub reads the Hugging Face hub, but local data only was asked for "
                            f"({root}); download {spec.path} and use dataset file")
        return read_hub(spec.path, None, spec.split, "download it elsewhere and use dataset file with --file")
    pattern = "*.jsonl" if adapter.own_split else f"{spec.split}*.jsonl"
    if root is None:
        hint = f"set {DATA_DIR_ENV} or pass --data-dir to a local mirror (<dir>/{spec.name}/{pattern})"
        return read_hub(adapter.hub_id, adapter.hub_config, "train" if adapter.own_split else spec.split, hint)
    folder = root / spec.name
    files = sorted(folder.glob(pattern))
    if not files:
        present = sorted(p.name for p in folder.glob("*")) if folder.is_dir() else []
        held = f" (it holds: {', '.join(present)})" if present else ""
        raise DataError(f"no {pattern} in the local data folder {folder}{held}")
    return read_files(files, str(folder))


def _record(adapter: _Adapter, table: Table, index: int, seq_id: str, keep_empty: bool) -> Record:
    row = table.rows[index]
    origin = table.origin(index)
    for column in (adapter.prompt_column, adapter.reference_column):
        if column not in row:
            raise DataError(f"{origin}: no column {column!r}; columns present: {', '.join(map(str, row))}")
    if not _text(row[adapter.prompt_column]).strip():
        raise DataError(f"{origin}: empty prompt (column {adapter.prompt_column!r})")
    head, body, tail = adapter.parts(row)
    references = _references(row[adapter.reference_column], origin, adapter.reference_column, keep_empty)
    return Record(seq_id, head, body, tail, references, adapter.summary, json.dumps(row, default=str))


def _references(value: object, origin: str, column: str, keep_empty: bool) -> tuple[str, ...]:
    """One reference, or each of a list; null ones, and unless kept empty or blank ones, are refused."""
    values = list(value) if isinstance(value, (list, tuple)) else [value]
    if not values or None in values:
        raise DataError(f"{origin}: {'null' if values else 'empty'} reference (column {column!r}); "
                        "every row needs a reference")
    odd = next((item for item in values if not isinstance(item, str)), None)
    if odd is not None:
        raise DataError(f"{origin}: reference (column {column!r}) is {type(odd).__name__} {str(odd)[:40]!r}, not text; "
                        "a reference must be a text or a list of texts")
    if not keep_empty and any(not str(item).strip() for item in values):
        raise DataError(f"{origin}: empty reference (column {column!r}); it would score 0 under every configuration "
                        "(set empty_references = \"keep\" in [dataset] to score it anyway)")
    return tuple(values)


def _id_prefix(spec: DatasetSpec) -> str:
    if spec.name == "file":
        return Path(spec.path).stem
    source = spec.path.replace("/", "_") if spec.name == "hub" else spec.name
    return f"{source}-{spec.split}"


def _split(spec: DatasetSpec) -> tuple[_Adapter, Table, Sequence[int]]:
    """The source table and the row indices of the spec's split (within `limit`), in the order served."""
    adapter = _check_spec(spec)
    table = _read(spec, adapter)
    cut = adapter.own_split or (spec.name == "file" and spec.split in FILE_TRAINING_SPLITS)
    indices: Sequence[int] = split_indices(len(table), spec.split) if cut else range(len(table))
    where = table.label if spec.name == "file" else f"{table.label} ({spec.split} split)"
    if not indices:
        raise DataError(f"no rows in {where}")
    if spec.limit is not None:
        if spec.limit > len(indices):
            raise DataError(f"limit {spec.limit} is more than the {len(indices)} rows in {where}")
        indices = indices[: spec.limit]
    return adapter, table, indices


def data_source(spec: DatasetSpec) -> str:
    """Where the rows of `spec` are read from, as a path or `hub:<id>` (the local mirror when one is set)."""
    adapter = _check_spec(spec)
    if spec.name == "file":
        return str(Path(spec.path).resolve())
    if spec.name == "hub":
        return f"hub:{spec.path}"
    root = data_dir(spec.data_dir)
    return str((root / spec.name).resolve()) if root is not None else f"hub:{adapter.hub_id}"


def load_split(spec: DatasetSpec) -> list[dict]:
    """The raw source rows of the split `spec.split` of dataset `spec.name` (within `limit`), in the order served.

    For Alpaca this is the study's split (module docstring); other datasets serve their own splits.
    Raises DataError on an unknown dataset or split, or missing data.
    """
    _, table, indices = _split(spec)
    return [dict(table.rows[int(index)]) for index in indices]


def load_records(spec: DatasetSpec) -> list[Record]:
    """The split's rows as prompt parts with seq ids, before tokenization (no tokenizer needed)."""
    if spec.name == "lm_eval":
        return lm_eval_records(spec)
    adapter, table, indices = _split(spec)
    prefix = _id_prefix(spec)
    keep = spec.empty_references == "keep"
    return [_record(adapter, table, int(index), f"{prefix}-{position:06d}", keep) for position, index in enumerate(indices)]


def load_examples(spec: DatasetSpec, tokenizer: PreTrainedTokenizerBase) -> list[Example]:
    """Read, build and tokenize the prompts of a dataset split, each within the spec's prompt budget.

    A multiple-choice task (CHOICE_DATASETS) gives its questions as `choice_tasks.ChoiceExample`s instead."""
    if spec.name in CHOICE_DATASETS:
        return load_choice_examples(spec, tokenizer)
    records = load_records(spec)
    chat = spec.prompt_format == "chat"
    if chat and not getattr(tokenizer, "chat_template", None):
        raise DataError("the tokenizer has no chat template; use the plain prompt format")
    prompts = [_render(tokenizer, record, record.body, chat) for record in records]
    examples = []
    for record, prompt, ids in zip(records, prompts, _encode(tokenizer, prompts, chat)):
        truncated = spec.prompt_budget is not None and len(ids) > spec.prompt_budget
        if truncated:
            prompt, ids = _truncate(tokenizer, record, chat, spec.prompt_budget, len(ids))
        examples.append(Example(record.seq_id, prompt, tuple(ids), record.references, truncated, record.summary,
                                record.row))
    return examples


def _render(tokenizer: PreTrainedTokenizerBase, record: Record, body: str, chat: bool) -> str:
    plain = record.head + body + record.tail
    if not chat:
        return plain
    messages = [{"role": "user", "content": plain}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def _encode(tokenizer: PreTrainedTokenizerBase, texts: list[str], chat: bool) -> list[list[int]]:
    """Token ids as the model expects them; a chat template already holds its special tokens."""
    return tokenizer(texts, add_special_tokens=not chat, verbose=False)["input_ids"]


def _truncate(
    tokenizer: PreTrainedTokenizerBase, record: Record, chat: bool, budget: int, length: int
) -> tuple[str, list[int]]:
    """Drop body tokens from the left until the whole prompt fits; re-encode, since merges at the cut can shift."""
    fixed = len(_encode(tokenizer, [_render(tokenizer, record, "", chat)], chat)[0])
    if fixed >= budget:
        raise DataError(f"{record.seq_id}: the prompt without its article/input is {fixed} tokens, "
                        f"no room within the prompt budget of {budget}")
    starts = [start for start, _ in tokenizer(record.body, add_special_tokens=False,
                                                return_offsets_mapping=True, verbose=False)["offset_mapping"]]
    dropped = 0
    while length > budget:
        dropped += length - budget
        body = record.body[starts[dropped]:].lstrip() if dropped < len(starts) else ""
        prompt = _render(tokenizer, record, body, chat)
        ids = _encode(tokenizer, [prompt], chat)[0]
        length = len(ids)
    return prompt, ids


def shard_examples(examples: list[Example], shard_size: int) -> list[list[Example]]:
    """Fixed-size shards in order: shard k holds examples[k*size:(k+1)*size], the same on every run."""
    if shard_size < 1:
        raise ValueError(f"shard size must be at least 1, got {shard_size}")
    return [examples[start : start + shard_size] for start in range(0, len(examples), shard_size)]
