"""Degenerate outputs: a rule that flags text no reader would accept, and what the oracle does with such rows.

ROUGE rewards word overlap, so an output of "The" and spaces, or "the the the the", can outscore a real
answer on a short reference, and an oracle that picks the best of many noisy scores finds those rows. The
rule (DESIGN.md, "Degenerate outputs"), on the output's words (maximal runs of letters and digits,
lower-cased) and its text:

1. empty or whitespace only;
2. no letter or digit at all ("...", "/ ,");
3. only function words (`FUNCTION_WORDS`: articles, prepositions, conjunctions, forms of "be"; e.g. "The
   and in", "A,");
4. one word repeated: at least `MIN_REPEAT_WORDS` words, all the same ("the the the");
5. looping: at least `MIN_NGRAMS` word `NGRAM`-grams of which more than `REPETITION_RATE` are repeats of
   an earlier one (1 - distinct / total), e.g. the same clause over and over.

`apply_mode` turns the flags into scores for the oracle (`reduce --degenerate`):
- `keep`: scores as they are;
- `zero` (the default): a degenerate row scores 0, what a reader would give it. It only removes credit
  no reader would grant, leaves every choice and cost in place (the frontier starts at the same budget,
  config means stay comparable with `keep`), and applies to every row alike, the full model's and the
  samples' included, so the bar moves only where the full model's own output is degenerate;
- `exclude`: a degenerate row is not a choice while another is affordable: its score is set to
  `EXCLUDED_SCORE` (below every metric's range), so the oracle picks it only where the budget forces a
  sequence onto its cheapest configuration, and counts it at that score there. The full model's column
  (the bar, `reference`) is zeroed instead: the bar stays a score a reader could give.
"""

from __future__ import annotations

import re

import numpy as np

MODES = ("keep", "zero", "exclude")
DEFAULT_MODE = "zero"
EXCLUDED_SCORE = -1.0  # every metric lies in [0, 1]
MIN_REPEAT_WORDS = 3
NGRAM = 3
MIN_NGRAMS = 4
REPETITION_RATE = 0.5
FUNCTION_WORDS = frozenset(
    "a an the and or but nor of in on at to for with by from as into onto upon is are was were be been being "
    "this that these those it its".split()
)
_WORD = re.compile(r"[^\W_]+")


def degenerate_reason(text: str) -> str | None:
    """Which rule flags `text` ("empty", "no letter or digit", "function words only", "one word repeated",
    "repeated n-grams"), or None when it passes."""
    if not text.strip():
        return "empty"
    words = [w.lower() for w in _WORD.findall(text)]
    if not words:
        return "no letter or digit"
    if all(w in FUNCTION_WORDS for w in words):
        return "function words only"
    if len(words) >= MIN_REPEAT_WORDS and len(set(words)) == 1:
        return "one word repeated"
    grams = [tuple(words[i : i + NGRAM]) for i in range(len(words) - NGRAM + 1)]
    if len(grams) >= MIN_NGRAMS and 1 - len(set(grams)) / len(grams) > REPETITION_RATE:
        return "repeated n-grams"
    return None


def degenerate_flags(outputs: list[str] | np.ndarray) -> np.ndarray:
    """(n,) bool: `degenerate_reason(text) is not None` for every output."""
    return np.fromiter((degenerate_reason(str(t)) is not None for t in outputs), dtype=bool, count=len(outputs))


def apply_mode(scores: np.ndarray, flags: np.ndarray, mode: str = DEFAULT_MODE, reference: int | None = None) -> np.ndarray:
    """The scores the oracle sees under `mode` (see the module docstring); scores and flags of one shape (N, K).

    reference: the column of the full model (the bar), zeroed rather than excluded under `exclude`.

    Raises ValueError for an unknown mode or mismatched shapes.
    """
    if mode not in MODES:
        raise ValueError(f"unknown degenerate mode '{mode}'; choose from {', '.join(MODES)}")
    scores, flags = np.asarray(scores, dtype=np.float64), np.asarray(flags, dtype=bool)
    if scores.shape != flags.shape:
        raise ValueError(f"scores {scores.shape} and degenerate flags {flags.shape} differ in shape")
    if mode == "keep":
        return scores.copy()
    if mode == "zero":
        return np.where(flags, 0.0, scores)
    out = np.where(flags, EXCLUDED_SCORE, scores)
    if reference is not None:
        out[:, reference] = np.where(flags[:, reference], 0.0, scores[:, reference])
    return out
