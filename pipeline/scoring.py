"""ROUGE scores of generated outputs, exactly as `rouge_score` computes them (stemmed F-measures).

rougeLsum is summary-level ROUGE-L: `rouge_score` splits both texts on "\\n" and nothing else, so for
summarisation both sides are first put one sentence per line. A text that already has line breaks keeps
its lines (CNN/DailyMail highlights are one sentence per line); a single-line text is split into sentences
with nltk's punkt when its data is installed, else with a simple punctuation rule (`sentence_splitter()`
says which, so a run can record it). For other datasets rougeLsum is scored on the texts as they are.
Line breaks do not change rouge1/2/L: the library's tokenizer treats them as spaces.

`fidelity` is the ROUGE-L F-measure of an output against the full model's output for the same sequence.
"""

from __future__ import annotations

import functools
import re

import nltk
from nltk.stem import porter
from rouge_score import rouge_scorer, tokenize, tokenizers

SCORE_COLUMNS = ("rouge1", "rouge2", "rougeL", "rougeLsum", "fidelity")
_ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")
_SENTENCE_END = re.compile(r"(?:(?<=[.!?])|(?<=[.!?][\"')\]]))\s+(?=[\"'(\[]?[A-Z0-9])")


class _MemoStemmer:
    """The library's Porter stemmer, memoised: stemming is half of rouge_score's time and words repeat a lot."""

    def __init__(self) -> None:
        self.stem = functools.lru_cache(maxsize=1 << 18)(porter.PorterStemmer().stem)


class _Tokenizer(tokenizers.Tokenizer):
    """`rouge_score`'s default tokenizer with stemming, only faster: same function, same stemmer."""

    def __init__(self) -> None:
        self._stemmer = _MemoStemmer()

    def tokenize(self, text: str) -> list[str]:
        return tokenize.tokenize(text, self._stemmer)


@functools.cache
def _scorer(rouge_types: tuple[str, ...]) -> rouge_scorer.RougeScorer:
    return rouge_scorer.RougeScorer(list(rouge_types), tokenizer=_Tokenizer())


@functools.cache
def sentence_splitter() -> str:
    """'nltk' when punkt's data is installed (it cannot be downloaded at run time here), else 'regex'."""
    try:
        nltk.sent_tokenize("One. Two.")
    except LookupError:
        return "regex"
    return "nltk"


def sentence_lines(text: str) -> str:
    """The text with one sentence per line, as rougeLsum expects; existing line breaks are kept as they are."""
    stripped = text.strip()
    if "\n" in stripped:
        lines = stripped.split("\n")
    elif sentence_splitter() == "nltk":
        lines = nltk.sent_tokenize(stripped)
    else:
        lines = _SENTENCE_END.split(stripped)
    return "\n".join(line.strip() for line in lines if line.strip())


def score(
    outputs: list[str], references: list[str], full_outputs: list[str], summary: bool | list[bool]
) -> dict[str, list[float]]:
    """Per-pair F-measures for every column of SCORE_COLUMNS, in the order of the inputs."""
    flags = [summary] * len(outputs) if isinstance(summary, bool) else list(summary)
    if not len(outputs) == len(references) == len(full_outputs) == len(flags):
        raise ValueError(
            f"score needs equally long lists, got {len(outputs)} outputs, {len(references)} references, "
            f"{len(full_outputs)} full outputs and {len(flags)} summary flags"
        )
    rouge, fidelity = _scorer(_ROUGE_TYPES), _scorer(("rougeL",))
    columns: dict[str, list[float]] = {name: [] for name in SCORE_COLUMNS}
    for output, reference, full, is_summary in zip(outputs, references, full_outputs, flags):
        target, prediction = (sentence_lines(reference), sentence_lines(output)) if is_summary else (reference, output)
        scores = rouge.score(target, prediction)
        for name in _ROUGE_TYPES:
            columns[name].append(scores[name].fmeasure)
        columns["fidelity"].append(fidelity.score(full, output)["rougeL"].fmeasure)
    return columns
