"""Exact match on generated answers, as lm-evaluation-harness's `gsm8k` task scores it (lm_eval 0.4,
`tasks/gsm8k/gsm8k.yaml`, `filters/extraction.py`, `filters/selection.py`, `api/metrics.py`).

An output is first cut at the task's stop strings (`pipeline.generation.stops`), then each *filter* extracts
an answer from it, and `exact_match` compares the answer with the reference after both are normalised:

- `strict-match`: the first match of `#### (\\-?[0-9\\.\\,]+)`, its group, stripped (the GSM8K answer format);
- `flexible-extract`: the *last* match of `(-?[$0-9.,]{2,})|(-?[0-9]+)` (its first non-empty group), stripped;
- no match gives the fallback `[invalid]`, which never equals a reference.

Normalisation (`exact_match`'s options, gsm8k's values): each of `regexes_to_ignore` (`,`, `\\$`,
`(?s).*#### `, `\\.$`) deleted in turn from both texts, then lower case (`ignore_case`); with
`ignore_punctuation` the ASCII punctuation is deleted too. The reference is the whole worked solution:
`(?s).*#### ` leaves only its final number.

This is an independent implementation (lm-eval is an optional extra); `tests/test_exact_match.py` checks it
against lm-eval's own filter objects and metric.
"""

from __future__ import annotations

import re
import string
from collections.abc import Sequence
from dataclasses import dataclass

from pipeline.data.lm_eval_tasks import metric_column

FALLBACK = "[invalid]"
GSM8K_UNTIL = ("Question:", "</s>", "<|im_end|>")  # gsm8k.yaml generation_kwargs.until
GSM8K_IGNORE = (",", r"\$", r"(?s).*#### ", r"\.$")  # gsm8k.yaml metric_list exact_match.regexes_to_ignore


@dataclass(frozen=True)
class AnswerFilter:
    """lm-eval's `regex` filter followed by `take_first`: which match of `pattern` is the answer."""

    name: str
    pattern: str
    group_select: int = 0

    def extract(self, text: str) -> str:
        """The selected match of `pattern` in `text` (the first non-empty group of a multi-group pattern),
        stripped; FALLBACK when nothing matches."""
        matches = re.findall(self.pattern, text)
        if not matches:
            return FALLBACK
        match = matches[self.group_select]
        if isinstance(match, tuple):
            match = next((group for group in match if group), FALLBACK)
        return match.strip()


GSM8K_FILTERS = (
    AnswerFilter("strict-match", r"#### (\-?[0-9\.\,]+)"),
    AnswerFilter("flexible-extract", r"(-?[$0-9.,]{2,})|(-?[0-9]+)", group_select=-1),
)


# The generation-row columns a gsm8k run adds beside ROUGE (until the metric registry holds them).
EXACT_MATCH_COLUMNS = tuple(metric_column("exact_match", f.name) for f in GSM8K_FILTERS)


def normalise(text: str, regexes_to_ignore: Sequence[str] = GSM8K_IGNORE, ignore_case: bool = True,
              ignore_punctuation: bool = False) -> str:
    """`text` as `exact_match` compares it: the regexes deleted in order, then case and punctuation."""
    for pattern in regexes_to_ignore:
        text = re.sub(pattern, "", text)
    if ignore_case:
        text = text.lower()
    if ignore_punctuation:
        text = text.translate(str.maketrans("", "", string.punctuation))
    return text


def exact_match(prediction: str, reference: str, regexes_to_ignore: Sequence[str] = GSM8K_IGNORE,
                ignore_case: bool = True, ignore_punctuation: bool = False) -> float:
    """1.0 when the normalised prediction equals the normalised reference, else 0.0 (gsm8k's settings by default)."""
    options = (regexes_to_ignore, ignore_case, ignore_punctuation)
    return float(normalise(prediction, *options) == normalise(reference, *options))


def gsm8k_exact_match(outputs: Sequence[str], references: Sequence[str]) -> dict[str, list[float]]:
    """Per pair, every column of EXACT_MATCH_COLUMNS: exact match of each filter's answer with the reference.

    `outputs` are already cut at the stop strings; `references` are GSM8K worked solutions ending `#### N`.
    """
    if len(outputs) != len(references):
        raise ValueError(f"{len(outputs)} outputs but {len(references)} references")
    return {column: [exact_match(answer_filter.extract(out), ref) for out, ref in zip(outputs, references)]
            for column, answer_filter in zip(EXACT_MATCH_COLUMNS, GSM8K_FILTERS)}
