"""The degenerate-output rule on hand-made outputs, and what each mode does to the scores."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.analysis.degenerate import EXCLUDED_SCORE, apply_mode, degenerate_flags, degenerate_reason


@pytest.mark.parametrize("text, reason", [
    ("", "empty"),
    ("  \n\t ", "empty"),
    ("...", "no letter or digit"),
    ("/ , -- !", "no letter or digit"),
    ("The  and in", "function words only"),
    ("A,", "function words only"),
    ("the the the", "function words only"),
    ("Plants Plants Plants Plants", "one word repeated"),
    ("yes yes yes", "one word repeated"),
    ("I like it. I like it. I like it. I like it.", "repeated n-grams"),
    ("Paris", None),
    ("Plants/", None),
    ("42", None),
    ("yes yes", None),  # two words: too short to call a repetition
    ("The cat sat on the mat and looked at the dog.", None),
    ("Photosynthesis turns light into chemical energy; plants store it as sugar.", None),
    ("Le chat dort.", None),
])
def test_rule_on_hand_made_outputs(text, reason):
    assert degenerate_reason(text) == reason


def test_repetition_rate_threshold():
    # 8 words, 6 trigrams: "a b c a b c a b" repeats 3 of 6 (rate 0.5, not above): passes; one more loop fails
    assert degenerate_reason("red green blue red green blue red green") is None
    assert degenerate_reason("red green blue red green blue red green blue") == "repeated n-grams"  # 4 of 7


def test_modes():
    scores = np.array([[0.5, 0.9, 0.2], [0.4, 0.3, 0.8]])
    flags = np.array([[True, True, False], [False, False, True]])
    np.testing.assert_array_equal(apply_mode(scores, flags, "keep"), scores)
    np.testing.assert_array_equal(apply_mode(scores, flags, "zero"), [[0.0, 0.0, 0.2], [0.4, 0.3, 0.0]])
    np.testing.assert_array_equal(apply_mode(scores, flags, "exclude", reference=0),
                                  [[0.0, EXCLUDED_SCORE, 0.2], [0.4, 0.3, EXCLUDED_SCORE]])
    assert list(degenerate_flags(["", "fine answer", "..."])) == [True, False, True]
    with pytest.raises(ValueError, match="unknown degenerate mode 'drop'"):
        apply_mode(scores, flags, "drop")
    with pytest.raises(ValueError, match="differ in shape"):
        apply_mode(scores, flags[:1], "zero")
