"""Multiple-choice benchmarks as lm-evaluation-harness's task YAMLs of the same names define them (0-shot).

For each task: the context (`doc_to_text`, after the task's `description`), the choices (`doc_to_choice`),
the right choice (`doc_to_target`), joined as `context + target_delimiter + choice` (the delimiter is " " in
every task here). Followed from lm-eval 0.4.13's `lm_eval/tasks/`: `arc/arc_easy.yaml` (and `arc_challenge`),
`hellaswag/hellaswag.yaml` with `utils.process_docs`, `piqa/piqa.yaml`, `super_glue/boolq/default.yaml`,
`winogrande/default.yaml` with `preprocess_winogrande.py`, `mmlu/default/_default_template_yaml` with each
subject's description. WinoGrande is a "multiple input" task: each choice is a context (the sentence up to
the blank, filled with an option) and the continuation is the same suffix for both, so its log-likelihoods
are the suffix's after each filled context ("partial scoring").

Tokenization is lm-eval's `HFLM._encode_pair`: trailing spaces of the context move to the continuation, the
pair is encoded whole with the tokenizer's default special tokens, and the continuation's tokens are
whatever the whole encoding holds beyond the context's own encoding.

Rows are read from the local slices (`<data dir>/<task>/<split>*.jsonl`, the hub's column names) or the hub,
in file order; `limit` keeps the first N. Seq ids are `<task>-<split>-<row index>`.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.data.records import DatasetSpec, Example
from pipeline.data.sources import DATA_DIR_ENV, DataError, data_dir, read_files, read_hub

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

TARGET_DELIMITER = " "


@dataclass(frozen=True)
class ChoiceDoc:
    """One question as lm-eval builds it: a context per choice (the same one except for multiple-input
    tasks), the continuation after it, the choice strings (their lengths normalise `acc_norm`), the right one."""

    contexts: tuple[str, ...]
    continuations: tuple[str, ...]
    choices: tuple[str, ...]
    gold: int


@dataclass(frozen=True)
class ChoiceExample(Example):
    """An example of a multiple-choice task: `prompt`/`prompt_ids` are the first choice's context, `references`
    the right choice; `requests` holds each choice's (context ids, continuation ids)."""

    choices: tuple[str, ...] = ()
    requests: tuple[tuple[tuple[int, ...], tuple[int, ...]], ...] = ()
    gold: int = 0


def _hellaswag_preprocess(text: str) -> str:
    """lm-eval's `hellaswag/utils.py: preprocess`."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def _arc(row: dict) -> ChoiceDoc:
    context = f"Question: {row['question']}\nAnswer:"
    texts = list(row["choices"]["text"])
    return _single(context, texts, list(row["choices"]["label"]).index(row["answerKey"]))


def _hellaswag(row: dict) -> ChoiceDoc:
    ctx = row["ctx_a"] + " " + row["ctx_b"].capitalize()
    context = _hellaswag_preprocess(row["activity_label"] + ": " + ctx)
    return _single(context, [_hellaswag_preprocess(e) for e in row["endings"]], int(row["label"]))


def _piqa(row: dict) -> ChoiceDoc:
    return _single(f"Question: {row['goal']}\nAnswer:", [row["sol1"], row["sol2"]], int(row["label"]))


def _boolq(row: dict) -> ChoiceDoc:
    # lm-eval reads super_glue's `label`; google/boolq (these files) holds the same as the boolean `answer`.
    return _single(f"{row['passage']}\nQuestion: {row['question']}?\nAnswer:", ["no", "yes"], int(bool(row["answer"])))


def _winogrande(row: dict) -> ChoiceDoc:
    sentence = row["sentence"]
    blank = sentence.index("_")
    contexts = tuple(sentence[:blank] + option for option in (row["option1"], row["option2"]))
    suffix = sentence[blank + 1 :].strip()
    return ChoiceDoc(contexts, (TARGET_DELIMITER + suffix,) * 2, contexts, {"1": 0, "2": 1}[row["answer"]])


def _mmlu(row: dict) -> ChoiceDoc:
    description = f"The following are multiple choice questions (with answers) about {row['subject'].replace('_', ' ')}.\n\n"
    c = row["choices"]
    text = f"{row['question'].strip()}\nA. {c[0]}\nB. {c[1]}\nC. {c[2]}\nD. {c[3]}\nAnswer:"
    return _single(description + text, ["A", "B", "C", "D"], int(row["answer"]))


def _single(context: str, choices: list[str], gold: int) -> ChoiceDoc:
    return ChoiceDoc((context,) * len(choices), tuple(TARGET_DELIMITER + c for c in choices), tuple(choices), gold)


@dataclass(frozen=True)
class ChoiceTaskSpec:
    """Where a task's rows live (local folder name = task name; the hub's id, config and split) and how a row
    becomes a ChoiceDoc."""

    hub_id: str
    hub_config: str | None
    split: str  # the split lm-eval evaluates (and the local slice holds); the named job sets it
    doc: Callable[[dict], ChoiceDoc]


CHOICE_TASKS = {
    "arc_easy": ChoiceTaskSpec("allenai/ai2_arc", "ARC-Easy", "test", _arc),
    "arc_challenge": ChoiceTaskSpec("allenai/ai2_arc", "ARC-Challenge", "test", _arc),
    "hellaswag": ChoiceTaskSpec("Rowan/hellaswag", None, "validation", _hellaswag),
    "piqa": ChoiceTaskSpec("ybisk/piqa", None, "validation", _piqa),
    "boolq": ChoiceTaskSpec("google/boolq", None, "validation", _boolq),
    "winogrande": ChoiceTaskSpec("allenai/winogrande", "winogrande_xl", "validation", _winogrande),
    "mmlu": ChoiceTaskSpec("cais/mmlu", "all", "test", _mmlu),
}


def encode_pair(tokenizer: PreTrainedTokenizerBase, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) as lm-eval's `HFLM._encode_pair` makes them (module docstring)."""
    if not context:
        raise DataError("a multiple-choice context is empty; lm-eval would score it after a prefix token, "
                        "which this task does not do")
    spaces = len(context) - len(context.rstrip())
    if spaces:
        continuation, context = context[-spaces:] + continuation, context[:-spaces]
    whole = tokenizer(context + continuation)["input_ids"]
    context_ids = tokenizer(context)["input_ids"]
    return context_ids, whole[len(context_ids) :]


def load_choice_docs(spec: DatasetSpec) -> list[tuple[str, ChoiceDoc]]:
    """(seq id, ChoiceDoc) for the first `limit` rows of the task's split, in file order.

    Raises DataError for missing files, a row the task cannot read (named by file and line), or a limit
    beyond the rows."""
    task = CHOICE_TASKS[spec.name]
    split = spec.split
    root = data_dir(spec.data_dir)
    if root is None:
        table = read_hub(task.hub_id, task.hub_config, split, f"set {DATA_DIR_ENV} or pass --data-dir to a local "
                                                              f"mirror (<dir>/{spec.name}/{split}*.jsonl)")
    else:
        folder = root / spec.name
        files = sorted(folder.glob(f"{split}*.jsonl"))
        if not files:
            raise DataError(f"no {split}*.jsonl in the local data folder {folder}; lm-eval evaluates {spec.name} on "
                            f"its {task.split} split (--split {task.split})")
        table = read_files(files, str(folder))
    count = len(table)
    if spec.limit is not None and spec.limit > count:
        raise DataError(f"limit {spec.limit} is more than the {count} rows in {table.label} ({split} split)")
    docs = []
    for index in range(spec.limit or count):
        try:
            doc = task.doc(dict(table.rows[index]))
        except (KeyError, ValueError, IndexError, TypeError, AttributeError) as exc:
            raise DataError(f"{table.origin(index)}: not a {spec.name} row ({type(exc).__name__}: {exc})") from None
        docs.append((f"{spec.name}-{split}-{index:06d}", doc))
    return docs


def load_choice_examples(spec: DatasetSpec, tokenizer: PreTrainedTokenizerBase) -> list[ChoiceExample]:
    """The task's questions, tokenized as lm-eval does (`encode_pair`), as examples for the choice task."""
    examples = []
    for seq_id, doc in load_choice_docs(spec):
        requests = tuple(tuple(map(tuple, encode_pair(tokenizer, ctx, cont)))
                         for ctx, cont in zip(doc.contexts, doc.continuations))
        if any(not cont for _, cont in requests):
            raise DataError(f"{seq_id}: a choice encodes to no tokens after its context")
        examples.append(ChoiceExample(seq_id, doc.contexts[0], requests[0][0], (doc.choices[doc.gold],), False, False,
                                      choices=doc.choices, requests=requests, gold=doc.gold))
    return examples


# lm-evaluation-harness's own YAML of each task, its local file and split: `lm_eval_task` rebuilds lm-eval's task
# object over the local slice, so tests and benchmarks/lm_eval_agreement.py compare against lm-eval itself.
LM_EVAL_YAML = {
    "arc_easy": ("arc/arc_easy.yaml", "arc_easy/test.jsonl", "test"),
    "arc_challenge": ("arc/arc_challenge.yaml", "arc_challenge/test.jsonl", "test"),
    "hellaswag": ("hellaswag/hellaswag.yaml", "hellaswag/validation_sample.jsonl", "validation"),
    "piqa": ("piqa/piqa.yaml", "piqa/validation.jsonl", "validation"),
    "boolq": ("super_glue/boolq/default.yaml", "boolq/validation.jsonl", "validation"),
    "winogrande": ("winogrande/default.yaml", "winogrande/validation.jsonl", "validation"),
    "mmlu": ("mmlu/default/mmlu_abstract_algebra.yaml", "mmlu/test_sample.jsonl", "test"),
}


def lm_eval_task(name: str, data: Path):
    """lm-eval's own `ConfigurableTask` for `name` from its installed YAML, reading `data`/<file> instead of the hub
    (for MMLU, the abstract-algebra YAML: the first 100 rows of the slice). Needs lm-eval (an optional extra)."""
    import lm_eval
    from lm_eval.api.task import ConfigurableTask
    from lm_eval.tasks._yaml_loader import load_yaml

    yaml, file, split = LM_EVAL_YAML[name]
    cfg = load_yaml(Path(lm_eval.__file__).parent / "tasks" / yaml)
    for key in ("tag", "group", "fewshot_split", "fewshot_config", "training_split", "validation_split", "test_split"):
        cfg.pop(key, None)
    cfg.update(dataset_path="json", dataset_name=None, dataset_kwargs={"data_files": {split: str(data / file)}},
               test_split=split)
    if name == "boolq":  # super_glue's boolq has `label`; google/boolq (these files) the same as boolean `answer`
        cfg["process_docs"] = lambda ds: ds.map(lambda d: {"label": int(d["answer"])})
    return ConfigurableTask(config=cfg)
