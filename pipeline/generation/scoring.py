"""ROUGE scores of generated outputs, exactly as `rouge_score` computes them, with a job's scoring options.

Options (`ScoringOptions`, set per job, recorded in run.json): stemming on or off (the study scores with
Hugging Face `evaluate`'s `rouge`, i.e. `rouge_score` without stemming); sentence splitting for rougeLsum
on or off (default: on for the summarisation datasets only); the tokenizer: `default` is `rouge_score`'s,
which keeps only [a-z0-9] after lowercasing (text in other scripts scores 0), `unicode` keeps the letters
and digits of every script, one token per Han or kana character (those scripts do not separate words).

rougeLsum is summary-level ROUGE-L: `rouge_score` splits both texts on "\\n" and nothing else, so with
sentence splitting on both sides are first put one sentence per line. A text that already has line breaks
keeps its lines (CNN/DailyMail highlights are one sentence per line); a single-line text is split into
sentences with nltk's punkt when its data is installed, else with a simple punctuation rule
(`sentence_splitter()` says which, so a run can record it). With it off, rougeLsum sees the texts as they
are. Line breaks do not change rouge1/2/L: both tokenizers treat them as spaces.

Several references for one output are scored as `RougeScorer.score_multi` does (and `evaluate` with a list
of references): per ROUGE type, the reference with the highest F-measure.

`fidelity` is the ROUGE-L F-measure of an output against the full model's output for the same sequence.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import nltk
from nltk.stem import porter
from rouge_score import rouge_scorer, tokenize, tokenizers

SCORE_COLUMNS = ("rouge1", "rouge2", "rougeL", "rougeLsum", "fidelity")
TOKENIZERS = ("default", "unicode")
_ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")
_SENTENCE_END = re.compile(r"(?:(?<=[.!?])|(?<=[.!?][\"')\]]))\s+(?=[\"'(\[]?[A-Z0-9])")
_HAN_KANA = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
_UNICODE_TOKEN = re.compile(f"[{_HAN_KANA}]|[^\\W_{_HAN_KANA}]+")
_LATIN_TOKEN = re.compile(r"^[a-z0-9]+$")


@dataclass(frozen=True)
class ScoringOptions:
    """How ROUGE is computed for a job; `sentence_split` None means the dataset's default (summarisation: on)."""

    stemming: bool = True
    sentence_split: bool | None = None
    tokenizer: str = "default"

    def __post_init__(self) -> None:
        for key in ("stemming", "sentence_split"):
            value = getattr(self, key)
            if not isinstance(value, bool) and not (key == "sentence_split" and value is None):
                raise ValueError(f"scoring.{key} must be true or false, got {value!r}")
        if self.tokenizer not in TOKENIZERS:
            raise ValueError(f"unknown scoring.tokenizer {self.tokenizer!r}; choose from {', '.join(TOKENIZERS)}")

    def to_dict(self) -> dict:
        return asdict(self)


class _MemoStemmer:
    """The library's Porter stemmer, memoised: stemming is half of rouge_score's time and words repeat a lot."""

    def __init__(self) -> None:
        self.stem = functools.lru_cache(maxsize=1 << 18)(porter.PorterStemmer().stem)


class _Tokenizer(tokenizers.Tokenizer):
    """`rouge_score`'s default tokenizer, only faster with stemming: same function, same (memoised) stemmer."""

    def __init__(self, stemming: bool) -> None:
        self._stemmer = _MemoStemmer() if stemming else None

    def tokenize(self, text: str) -> list[str]:
        return tokenize.tokenize(text, self._stemmer)


class _UnicodeTokenizer(_Tokenizer):
    """Lowercased letters and digits of every script; stemming (English Porter) touches [a-z0-9] words of 4+ only."""

    def tokenize(self, text: str) -> list[str]:
        tokens = _UNICODE_TOKEN.findall(text.lower())
        if self._stemmer is None:
            return tokens
        return [self._stemmer.stem(t) if len(t) > 3 and _LATIN_TOKEN.match(t) else t for t in tokens]


@functools.cache
def _scorer(rouge_types: tuple[str, ...], stemming: bool, tokenizer: str) -> rouge_scorer.RougeScorer:
    tokens = _UnicodeTokenizer(stemming) if tokenizer == "unicode" else _Tokenizer(stemming)
    return rouge_scorer.RougeScorer(list(rouge_types), tokenizer=tokens)


def mostly_dropped(text: str) -> bool:
    """Whether `rouge_score`'s default tokenizer drops over half of the text's letters and digits (non-Latin text)."""
    kept = sum(1 for char in text.lower() if char.isalnum())
    latin = sum(1 for char in text.lower() if "a" <= char <= "z" or "0" <= char <= "9")
    return kept > 0 and latin * 2 < kept


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
    outputs: list[str], references: Sequence[str | Sequence[str]], full_outputs: list[str],
    summary: bool | list[bool], options: ScoringOptions = ScoringOptions(),
) -> dict[str, list[float]]:
    """Per-pair F-measures in [0, 1] for every column of SCORE_COLUMNS, in the order of the inputs.

    A reference is a text or a sequence of texts (scored as `score_multi`); `summary` (per pair or for all)
    is the dataset's default for sentence splitting, which `options.sentence_split` overrides when set.
    Raises ValueError when the lists differ in length.
    """
    flags = [summary] * len(outputs) if isinstance(summary, bool) else list(summary)
    if not len(outputs) == len(references) == len(full_outputs) == len(flags):
        raise ValueError(
            f"score needs equally long lists, got {len(outputs)} outputs, {len(references)} references, "
            f"{len(full_outputs)} full outputs and {len(flags)} summary flags"
        )
    rouge = _scorer(_ROUGE_TYPES, options.stemming, options.tokenizer)
    fidelity = _scorer(("rougeL",), options.stemming, options.tokenizer)
    columns: dict[str, list[float]] = {name: [] for name in SCORE_COLUMNS}
    for output, reference, full, is_summary in zip(outputs, references, full_outputs, flags):
        targets = [reference] if isinstance(reference, str) else list(reference)
        if options.sentence_split if options.sentence_split is not None else is_summary:
            targets, output_lines = [sentence_lines(t) for t in targets], sentence_lines(output)
        else:
            output_lines = output
        scores = rouge.score(targets[0], output_lines) if len(targets) == 1 else rouge.score_multi(targets, output_lines)
        for name in _ROUGE_TYPES:
            columns[name].append(scores[name].fmeasure)
        columns["fidelity"].append(fidelity.score(full, output)["rougeL"].fmeasure)
    return columns
