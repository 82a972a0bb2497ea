"""Scores must be exactly what `rouge_score` gives on the same pairs; rougeLsum gets one sentence per line."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from rouge_score import rouge_scorer

from pipeline import scoring
from pipeline.scoring import SCORE_COLUMNS, score, sentence_lines

DATA = Path(os.environ.get("DYNORACLE_DATA_DIR") or Path(__file__).resolve().parents[2] / "shared" / "data")
TYPES = ["rouge1", "rouge2", "rougeL", "rougeLsum"]


def rows(name: str, count: int) -> list[dict]:
    path = next((DATA / name).glob("*.jsonl"))
    with path.open() as handle:
        return [json.loads(line) for line, _ in zip(handle, range(count))]


@pytest.fixture(scope="module")
def library():
    return rouge_scorer.RougeScorer(TYPES, use_stemmer=True)


def test_alpaca_scores_equal_rouge_score(library):
    data = rows("alpaca", 40)
    references = [r["output"] for r in data]
    outputs = references[1:] + references[:1]  # each output scored against another row's answer
    full = references[2:] + references[:2]
    got = score(outputs, references, full, summary=False)
    assert list(got) == list(SCORE_COLUMNS)
    for i, (out, ref) in enumerate(zip(outputs, references)):
        expected = library.score(ref, out)
        assert [got[t][i] for t in TYPES] == [expected[t].fmeasure for t in TYPES]
        assert got["fidelity"][i] == library.score(full[i], out)["rougeL"].fmeasure
    assert any(v > 0 for v in got["rougeL"])


def test_summary_scores_use_one_sentence_per_line(library):
    data = rows("cnn_dailymail", 20)
    references = [r["highlights"] for r in data]
    outputs = [" ".join(r["article"].split()[:60]) for r in data]  # a lead-style "summary" on one line
    got = score(outputs, references, outputs, summary=True)
    for i, (out, ref) in enumerate(zip(outputs, references)):
        plain = library.score(ref, out)
        assert [got[t][i] for t in ("rouge1", "rouge2", "rougeL")] == [plain[t].fmeasure for t in ("rouge1", "rouge2", "rougeL")]
        split = library.score(sentence_lines(ref), sentence_lines(out))
        assert got["rougeLsum"][i] == split["rougeLsum"].fmeasure
        assert sentence_lines(ref) == "\n".join(line.strip() for line in ref.strip().split("\n"))  # highlights keep their lines
        assert sentence_lines(out).count("\n") >= 1
    assert got["fidelity"] == [1.0] * len(outputs)


def test_rouge_lsum_needs_newlines(library):
    """rouge_score splits rougeLsum on newlines only: a one-line text is a single 'sentence', equal to rougeL."""
    reference = "The cat sat on the mat. The dog ran in the park."
    output = "The dog ran in the park. The cat sat on the mat."
    unsplit = library.score(reference, output)
    assert unsplit["rougeLsum"].fmeasure == unsplit["rougeL"].fmeasure < 1
    assert sentence_lines(reference) == "The cat sat on the mat.\nThe dog ran in the park."
    assert score([output], [reference], [output], summary=True)["rougeLsum"] == [1.0]
    assert score([output], [reference], [output], summary=False)["rougeLsum"] == [unsplit["rougeLsum"].fmeasure]


def test_regex_splitter_when_punkt_is_missing(monkeypatch):
    monkeypatch.setattr(scoring, "sentence_splitter", lambda: "regex")
    text = 'He said "Stop." Then he left! Was it 3 p.m. or later? 42 cats ran. "Fine," she said.'
    assert sentence_lines(text).split("\n") == [
        'He said "Stop."', "Then he left!", "Was it 3 p.m. or later?", "42 cats ran.", '"Fine," she said.']


def test_fidelity_and_mixed_flags(library):
    outputs, references, full = ["the quick brown fox", "", "a b c"], ["a fox", "x", "a b c"], ["the quick brown fox", "y", "c b a"]
    got = score(outputs, references, full, summary=[False, True, False])
    assert got["fidelity"][:2] == [1.0, 0.0]
    assert got["fidelity"][2] == library.score("c b a", "a b c")["rougeL"].fmeasure
    assert got["rouge1"][1] == 0.0
    with pytest.raises(ValueError, match="equally long"):
        score(outputs, references[:2], full, summary=False)
