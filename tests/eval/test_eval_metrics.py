"""lmms-eval metrics on hand-made cases, normalisation corner cases included."""

from __future__ import annotations

import pytest

from lov_jax.eval import metrics
from lov_jax.eval.vqa_normalize import normalize_prediction, process_punctuation

OPTS = ["dog", "cat", "bird", "fish"]


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


def test_vqa_soft_accuracy():
    assert metrics.vqa_accuracy("two", ["2"] * 10)[0] == 1.0
    # 2 of 10 say yes: leave-one-out gives 1/3 (for the 2) or 2/3 (for the 8) -> 0.6
    assert metrics.vqa_accuracy("yes", ["yes"] * 2 + ["no"] * 8)[0] == pytest.approx(0.6)
    # 3 of 10: 2/3 for those three, 1 for the others -> 0.9 (not min(1, 3/3) = 1)
    assert metrics.vqa_accuracy("Cat.", ["cat"] * 3 + ["dog"] * 7)[0] == pytest.approx(0.9)
    assert metrics.vqa_accuracy("horse", ["cat"] * 10)[0] == 0.0
    # answers normalised only when annotators disagree: "the cat" vs "cat"
    assert metrics.vqa_accuracy("cat", ["the cat"] * 9 + ["cat"])[0] == 1.0
    assert metrics.vqa_accuracy("cat", ["The cat"] * 10)[0] == 0.0


def test_anls():
    assert metrics.anls("Hello", ["hello"])[0] == 1.0
    assert metrics.anls("helo", ["hello"])[0] == pytest.approx(0.8)
    assert metrics.anls("hel", ["hello"])[0] == pytest.approx(0.6)
    assert metrics.anls("he", ["hello"])[0] == 0.0  # 0.4 < threshold 0.5
    assert metrics.anls("abc", ["xyz", "abd"])[0] == pytest.approx(2 / 3)  # best answer
    # whitespace collapsed for the distance; the length is the raw strings' (13)
    assert metrics.anls("  New   York ", ["new york"])[0] == 1.0
    assert metrics.anls("new yorks", ["New York"])[0] == pytest.approx(1 - 1 / 9)
    assert metrics.anls("", [""])[0] == 1.0


def test_relaxed_accuracy():
    assert metrics.relaxed_accuracy("10.4", ["10"])[0] == 1.0
    assert metrics.relaxed_accuracy("10.6", ["10"])[0] == 0.0
    assert metrics.relaxed_accuracy("-9.6", ["-10"])[0] == 1.0
    assert metrics.relaxed_accuracy("5%", ["0.05"])[0] == 1.0  # % divides by 100
    assert metrics.relaxed_accuracy("0", ["0"])[0] == 1.0
    assert metrics.relaxed_accuracy("0.0", ["0"])[0] == 0.0  # zero target: string compare
    assert metrics.relaxed_accuracy("Yes", ["yes"])[0] == 1.0
    assert metrics.relaxed_accuracy("12", ["x", "12.5"])[0] == 1.0


def test_exact_match():
    assert metrics.exact_match(" Paris ", ["paris"])[0] == 1.0
    assert metrics.exact_match("paris.", ["paris"])[0] == 0.0
    assert metrics.exact_match("paris.", ["paris"], ignore_punctuation=True)[0] == 1.0
    assert metrics.exact_match("Paris", ["paris"], ignore_case=False)[0] == 0.0


@pytest.mark.parametrize(
    ("pred", "letter"),
    [
        ("B", "B"),
        ("(C) cat", "C"),
        ("The answer is D.", "D"),
        ("It is a cat", "B"),  # no letter: unique option text
        ("A or B", ""),  # two letters, no option text
        ("Cannot determine the answer", "Z"),
    ],
)
def test_mmbench_extraction(pred, letter):
    assert metrics.extract_choice(pred, OPTS, "mmbench") == letter


@pytest.mark.parametrize(
    ("pred", "letter"),
    [
        ("(B)", "B"),
        ("The answer is B.", "B"),
        ("(A) is wrong, (C) is right", "C"),  # several: the last occurrence
        ("I am fairly sure it shows a bird in the sky", "C"),  # > 5 words: option text
        ("C.", "C"),
    ],
)
def test_mmmu_extraction(pred, letter):
    assert metrics.extract_choice(pred, OPTS, "mmmu") == letter


def test_mmmu_fallback_is_seeded():
    a = metrics.extract_choice("no idea", OPTS, "mmmu", seed="q1")
    assert a in "ABCD" and a == metrics.extract_choice("no idea", OPTS, "mmmu", seed="q1")


@pytest.mark.parametrize(
    ("pred", "letter"),
    [
        ("The best answer is C.", "C"),
        ("D", "D"),
        ("Option B) something", "B"),
        ("this is a long answer with many words and no option letter at all", ""),
        ("A cat sits", "A"),  # lmms-eval takes the first capital A-D
    ],
)
def test_videomme_extraction(pred, letter):
    assert metrics.extract_choice(pred, OPTS, "videomme") == letter


def test_muirbench_scoring():
    assert metrics.mc_accuracy("B. a cat", ["B"], OPTS, parser="muirbench") == (1.0, "B")
    assert metrics.mc_accuracy(" b ", ["B"], OPTS, parser="muirbench")[0] == 1.0
    assert metrics.mc_accuracy("The answer is B", ["B"], OPTS, parser="muirbench")[0] == 0.0


def test_mc_gold_forms_and_errors():
    assert metrics.answer_letter("(B)", OPTS) == "B"
    assert metrics.answer_letter("cat", OPTS) == "B"
    assert metrics.score("mc_accuracy", "B", ["cat"], OPTS) == (1.0, "B")
    with pytest.raises(ValueError, match="neither"):
        metrics.answer_letter("E", OPTS)
    with pytest.raises(ValueError, match="unknown metric"):
        metrics.score("bleu", "x", ["x"])
    with pytest.raises(ValueError, match="no answer"):
        metrics.score("anls", "x", [])
