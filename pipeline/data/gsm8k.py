"""GSM8K prompts as lm-evaluation-harness's `gsm8k` task writes them (lm_eval 0.4, `tasks/gsm8k/gsm8k.yaml`).

Each exemplar is `Question: {question}\\nAnswer:` + the target delimiter " " + its worked solution + the
few-shot delimiter "\\n\\n"; then the question itself as `Question: {question}\\nAnswer:`. The exemplars are
the first k rows of the train split, the same for every question (lm-eval's `first_n` sampler; its gsm8k
default instead draws 5 at random per question from the whole train split, which is not here offline).
The local mirror holds the first 200 train rows as `gsm8k/train_sample.jsonl`; the reference is the
worked solution, whose `#### N` line exact match reads.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.data.sources import DataError, Table, read_file, read_hub

DEFAULT_FEWSHOT = 5  # gsm8k.yaml num_fewshot
HUB_ID, HUB_CONFIG = "openai/gsm8k", "main"
TRAIN_SAMPLE = "train_sample.jsonl"
TARGET_DELIMITER, FEWSHOT_DELIMITER = " ", "\n\n"


def question_text(row: dict) -> str:
    return f"Question: {row['question']}\nAnswer:"


def fewshot_context(exemplars: list[dict]) -> str:
    """The exemplars as lm-eval's plain-text few-shot context (ends with the few-shot delimiter)."""
    return "".join(question_text(row) + TARGET_DELIMITER + row["answer"] + FEWSHOT_DELIMITER for row in exemplars)


def exemplars(k: int, root: Path | None) -> list[dict]:
    """The first k train rows: from `<root>/gsm8k/train_sample.jsonl` in a local mirror, else the hub's train split."""
    if k == 0:
        return []
    table: Table
    if root is not None:
        table = read_file(root / "gsm8k" / TRAIN_SAMPLE)
    else:
        table = read_hub(HUB_ID, HUB_CONFIG, "train", "set DYNORACLE_DATA_DIR or pass --data-dir to a local mirror")
    if k > len(table):
        raise DataError(f"num_fewshot {k} is more than the {len(table)} exemplars in {table.label}")
    rows = [dict(table.rows[i]) for i in range(k)]
    for i, row in enumerate(rows):
        if not isinstance(row.get("question"), str) or not isinstance(row.get("answer"), str):
            raise DataError(f"{table.origin(i)}: a GSM8K exemplar needs string columns question and answer")
    return rows


def prompt_parts(context: str, row: dict) -> tuple[str, str, str]:
    """(head, body, tail) of the adapters' prompt layout: only the question itself may be cut."""
    return context + "Question: ", "" if row.get("question") is None else str(row["question"]), "\nAnswer:"
