"""Scores must be exactly what `rouge_score` gives on the same pairs; rougeLsum gets one sentence per line."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from rouge_score import rouge_scorer

from pipeline.generation import scoring
from pipeline.generation.scoring import SCORE_COLUMNS, ScoringOptions, mostly_dropped, score, sentence_lines

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


def test_stemming_off_equals_rouge_score_without_stemmer(library):
    data = rows("alpaca", 40)
    references = [r["output"] for r in data]
    outputs = references[3:] + references[:3]
    unstemmed = rouge_scorer.RougeScorer(TYPES, use_stemmer=False)
    got = score(outputs, references, outputs, summary=False, options=ScoringOptions(stemming=False))
    for i, (out, ref) in enumerate(zip(outputs, references)):
        expected = unstemmed.score(ref, out)
        assert [got[t][i] for t in TYPES] == [expected[t].fmeasure for t in TYPES]
    stemmed = score(outputs, references, outputs, summary=False)
    assert got["rouge1"] != stemmed["rouge1"]  # stemming changes some scores, so the option is honoured


def test_sentence_split_option_overrides_the_dataset_default(library):
    reference, output = "The cat sat on the mat. The dog ran in the park.", "The dog ran in the park. The cat sat on the mat."
    split = library.score(sentence_lines(reference), sentence_lines(output))["rougeLsum"].fmeasure
    unsplit = library.score(reference, output)["rougeLsum"].fmeasure
    assert score([output], [reference], [output], summary=False, options=ScoringOptions(sentence_split=True))["rougeLsum"] == [split]
    assert score([output], [reference], [output], summary=True, options=ScoringOptions(sentence_split=False))["rougeLsum"] == [unsplit]
    assert split != unsplit


def test_list_reference_scores_as_score_multi():
    output, references = 'The answer is: "blue', ("The sky is blue.", "Blue.")
    unstemmed = rouge_scorer.RougeScorer(TYPES, use_stemmer=False)
    expected = unstemmed.score_multi(list(references), output)
    got = score([output], [references], [output], summary=False, options=ScoringOptions(stemming=False))
    assert [got[t][0] for t in TYPES] == [expected[t].fmeasure for t in TYPES]
    assert got["rouge1"][0] != unstemmed.score(str(list(references)), output)["rouge1"].fmeasure  # not the list's repr
    assert score([output], [references[:1]], [output], summary=False, options=ScoringOptions(stemming=False))["rouge1"] == [
        unstemmed.score(references[0], output)["rouge1"].fmeasure]


@pytest.mark.parametrize("reference, output", [
    ("Москва является столицей России.", "Столицей России является Москва."),
    ("北京是中国的首都。", "中国的首都是北京。"),
])
def test_non_latin_text_scores_with_the_unicode_tokenizer(reference, output):
    unicode = score([output], [reference], [reference], summary=False, options=ScoringOptions(tokenizer="unicode"))
    default = score([output], [reference], [reference], summary=False)
    assert all(unicode[name][0] > 0 for name in SCORE_COLUMNS)
    assert all(default[name][0] == 0 for name in SCORE_COLUMNS)
    assert mostly_dropped(reference) and not mostly_dropped("The capital of Russia is Moscow (Москва).")


def test_unicode_tokenizer_keeps_every_script_and_stems_only_latin():
    tokenizer = scoring._UnicodeTokenizer(stemming=True)
    assert tokenizer.tokenize("Running Бегущие_коты 你好 x2, ÉTÉ!") == ["run", "бегущие", "коты", "你", "好", "x2", "été"]
    latin = "The runners were running quickly to the finishing lines"
    assert tokenizer.tokenize(latin) == scoring._Tokenizer(stemming=True).tokenize(latin)


def test_bad_options_are_one_line_errors():
    with pytest.raises(ValueError, match="^unknown scoring.tokenizer 'icu'; choose from default, unicode$"):
        ScoringOptions(tokenizer="icu")
    with pytest.raises(ValueError, match="^scoring.stemming must be true or false, got 'no'$"):
        ScoringOptions(stemming="no")
