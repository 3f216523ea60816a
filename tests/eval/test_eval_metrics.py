"""The VQA answer normalisation (EvalAIAnswerProcessor) on hand-made corner cases.

The task metrics themselves are tested against lmms-eval in test_lmms_metrics.py.
"""

from __future__ import annotations

import pytest

from lov_jax.eval.vqa_normalize import normalize_prediction, process_punctuation


@pytest.mark.parametrize(
    ("raw", "norm"),
    [
        ("Two dogs.", "2 dogs"),  # number word, trailing period
        ("The Cat", "cat"),  # article, case
        ("an apple", "apple"),
        ("dont", "don't"),  # contraction table
        ("isnt it", "isn't it"),
        ("1,000", "1000"),  # commas dropped in word_tokenize
        ("yes!", "yes"),
        ("black-and-white", "black and white"),  # '-' inside a word -> space
        ("3.5", "3.5"),  # a period before a digit stays
        ("none", "0"),
        ("what's\tthat?", "what 's that"),  # "'s" split off, tab -> space
        ("  Ten\n", "10"),
    ],
)
def test_vqa_normalisation(raw, norm):
    assert normalize_prediction(raw) == norm


def test_vqa_punctuation_quirks():
    # With a digit,digit anywhere, punctuation is deleted rather than replaced by a space.
    assert process_punctuation("1,5 black-white") == "15 blackwhite"
    assert process_punctuation("a - b") == "a  b"  # "- " present: deleted
