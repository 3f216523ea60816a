"""Per-sample scores as lmms-eval computes them (each function cites its lmms-eval origin).

Every scorer is `score(prediction, answers, options) -> (score in [0, 1], parsed)` where
`parsed` is what was compared (the extracted letter, the normalised answer) for the
per-sample log. Task-level values are plain means over all records of a task.
"""

from __future__ import annotations

import hashlib
import random
import re
import statistics
from collections.abc import Callable, Sequence

from lov_jax.eval import vqa_normalize as vqa

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def option_letters(options: Sequence[str]) -> list[str]:
    return list(LETTERS[: len(options)])


def format_options(options: Sequence[str]) -> str:
    """'A. opt\\nB. opt' (lmms-eval's MMBench / MMMU / MuirBench / VideoMME prompts)."""
    return "\n".join(f"{c}. {o}" for c, o in zip(option_letters(options), options, strict=True))


# ---- option-letter extraction ----------------------------------------------------------


def mmbench_can_infer(answer: str, choices: dict[str, str]) -> str | bool:
    """VLMEvalKit `can_infer` (lmms-eval mmbench_evals): a lone option letter, else a
    unique option text inside the answer, else False ("Z" for refusals)."""
    answer = str(answer)
    for refusal in (
        "Sorry, I can't help with images of people yet.",
        "I can't process this file.",
        "I'm sorry, but without the image provided",
        "Cannot determine the answer",
    ):
        if refusal in answer:
            return "Z"
    mod = answer
    for c in ".()[],:;!*#{}":
        mod = mod.replace(c, " ")
    splits = [x.strip() for x in mod.split()]
    count = sum(1 for c in choices if c in splits)
    if count == 1:
        for ch in choices:
            if ch in splits:
                return ch
    elif count == 0 and sum(1 for c in ("Z", "") if c in splits) == 1:
        return "Z"
    lowered = answer.lower()
    cands = [k for k, v in choices.items() if str(v).lower() in lowered]
    return cands[0] if len(cands) == 1 else False


def mmmu_parse_multi_choice(
    response: str, all_choices: Sequence[str], index2ans: dict[str, str], seed: str = ""
) -> str:
    """lmms-eval MMMU `parse_multi_choice_response`. The no-candidate fallback is a random
    choice there; here it is seeded by `seed` (the sample id) so reruns agree."""
    for char in (",", ".", "!", "?", ";", ":", "'"):
        response = response.strip(char)
    response = " " + response + " "
    index_ans, ans_with_brack, candidates = True, False, []
    for choice in all_choices:
        if f"({choice})" in response:
            candidates.append(choice)
            ans_with_brack = True
    if not candidates:
        candidates = [c for c in all_choices if f"{c} " in response]
    if not candidates:
        candidates = [c for c in all_choices if f"{c}." in response]
    if not candidates and len(response.split()) > 5:
        for index, ans in index2ans.items():
            if ans.lower() in response.lower():
                candidates.append(index)
                index_ans = False
    if not candidates:
        rng = random.Random(int(hashlib.sha256(seed.encode()).hexdigest()[:8], 16))
        return rng.choice(list(all_choices))
    if len(candidates) == 1:
        return candidates[0]
    if index_ans:
        pattern = "({})" if ans_with_brack else " {} "
        starts = [response.rfind(pattern.format(c)) for c in candidates]
    else:
        starts = [response.lower().rfind(index2ans[c].lower()) for c in candidates]
    return candidates[max(range(len(starts)), key=lambda i: (starts[i], -i))]


def videomme_extract(s: str) -> str:
    """lmms-eval VideoMME `extract_characters_regex` (its missing commas kept: two of the
    prefixes are concatenations)."""
    s = s.strip()
    prefixes = [
        "The best answer is",
        "The correct answer is",
        "The answer is",
        "The answer",
        "The best option isThe correct option is",  # noqa: ISC001 - as in lmms-eval
        "Best answer:Best option:",  # noqa: ISC001
    ]
    for prefix in prefixes:
        s = s.replace(prefix, "")
    if len(s.split()) > 10 and not re.search("[ABCD]", s):
        return ""
    match = re.search(r"[ABCD]", s)
    return "" if match is None else match[0]


def muirbench_extract(resp: str) -> str:
    """lmms-eval MuirBench `MultiChoiceRegexFilter`: a leading 'X.' else the raw response."""
    match = re.match(r"^\s*([A-Z])\.", resp)
    return match.group(1) if match else resp


MC_PARSERS = ("mmbench", "mmmu", "videomme", "muirbench")


def extract_choice(prediction: str, options: Sequence[str], parser: str, seed: str = "") -> str:
    letters = option_letters(options)
    if parser == "mmbench":
        got = mmbench_can_infer(prediction, dict(zip(letters, options, strict=True)))
        return got if isinstance(got, str) else ""
    if parser == "mmmu":
        return mmmu_parse_multi_choice(
            prediction, letters, dict(zip(letters, options, strict=True)), seed
        )
    if parser == "videomme":
        return videomme_extract(prediction)
    if parser == "muirbench":
        return muirbench_extract(prediction)
    raise ValueError(f"unknown multiple-choice parser {parser!r}; choose from {MC_PARSERS}")


def answer_letter(answer: str, options: Sequence[str]) -> str:
    """The gold option letter: 'B', '(B)', 'B.' or the option's text."""
    a = answer.strip()
    m = re.fullmatch(r"\(?([A-Z])\)?\.?", a)
    if m and m.group(1) in option_letters(options):
        return m.group(1)
    if a in options:
        return LETTERS[list(options).index(a)]
    raise ValueError(f"answer {answer!r} is neither an option letter nor an option text")


def mc_accuracy(prediction, answers, options, parser="mmbench", seed=""):
    if not options:
        raise ValueError("multiple-choice record without options")
    parsed = extract_choice(prediction, options, parser, seed)
    gold = answer_letter(answers[0], options)
    if parser == "muirbench":  # muir_aggregation: case/space-insensitive string compare
        return float(parsed.lower().strip() == gold.lower().strip()), parsed
    return float(parsed == gold), parsed


# ---- open-ended ------------------------------------------------------------------------


def exact_match(prediction, answers, options=None, ignore_case=True, ignore_punctuation=False):
    """HF `evaluate` exact_match (lmms-eval's generic metric), max over the references."""

    def norm(s: str) -> str:
        s = s.strip()
        if ignore_case:
            s = s.lower()
        if ignore_punctuation:
            s = re.sub(r"[^\w\s]", "", s)
        return s

    pred = norm(prediction)
    return float(any(pred == norm(a) for a in answers)), pred


def vqa_accuracy(prediction, answers, options=None):
    """lmms-eval `vqav2_process_results`: min(1, #matching other annotators / 3), averaged
    over leave-one-out subsets of the (10) answers; full normalisation only when the
    annotators disagree (as the official evaluation does)."""
    res = vqa.normalize_prediction(prediction)
    gts = [a.replace("\n", " ").replace("\t", " ").strip() for a in answers]
    if len(set(gts)) > 1:
        gts = [vqa.process_digit_article(vqa.process_punctuation(a)) for a in gts]
        res = vqa.process_digit_article(vqa.process_punctuation(res))
    accs = []
    for i in range(len(gts)):
        matching = [a for j, a in enumerate(gts) if j != i and a == res]
        accs.append(min(1.0, len(matching) / 3))
    return float(statistics.mean(accs)), res


def levenshtein(s1: str, s2: str) -> int:
    if len(s1) > len(s2):
        s1, s2 = s2, s1
    distances = list(range(len(s1) + 1))
    for i2, c2 in enumerate(s2):
        new = [i2 + 1]
        for i1, c1 in enumerate(s1):
            best = min(distances[i1], distances[i1 + 1], new[-1])
            new.append(distances[i1] if c1 == c2 else 1 + best)
        distances = new
    return distances[-1]


def anls(prediction, answers, options=None, threshold=0.5):
    """lmms-eval `anls` (DocVQA / InfoVQA): 1 - min normalised Levenshtein over the answers,
    0 below the threshold. Normalised: lower-cased, whitespace collapsed; the length is
    that of the raw strings, as lmms-eval has it."""
    values = []
    det = " ".join(prediction.strip().lower().split())
    for answer in answers:
        gt = " ".join(answer.strip().lower().split())
        length = max(len(answer.upper()), len(prediction.upper()))
        values.append(0.0 if length == 0 else levenshtein(gt, det) / length)
    result = 1 - min(values)
    return (0.0 if result < threshold else float(result)), det


def _to_float(text: str) -> float | None:
    try:
        return float(text.rstrip("%")) / 100.0 if text.endswith("%") else float(text)
    except ValueError:
        return None


def relaxed_accuracy(prediction, answers, options=None, max_relative_change=0.05):
    """lmms-eval ChartQA `relaxed_correctness`: numbers within 5% relative error (a
    trailing % divides by 100; a zero target falls back to string equality), else
    case-insensitive exact match. Max over the answers."""

    def one(target: str) -> bool:
        p, t = _to_float(prediction), _to_float(target)
        if p is not None and t:
            return abs(p - t) / abs(t) <= max_relative_change
        return prediction.lower() == target.lower()

    return float(any(one(a) for a in answers)), prediction


METRICS: dict[str, Callable] = {
    "mc_accuracy": mc_accuracy,
    "exact_match": exact_match,
    "vqa_accuracy": vqa_accuracy,
    "anls": anls,
    "relaxed_accuracy": relaxed_accuracy,
}


def score(
    metric: str,
    prediction: str,
    answers: Sequence[str],
    options: Sequence[str] | None = None,
    *,
    parser: str = "mmbench",
    seed: str = "",
) -> tuple[float, str]:
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; choose from {sorted(METRICS)}")
    if not answers:
        raise ValueError("record has no answer")
    if metric == "mc_accuracy":
        return mc_accuracy(prediction, answers, options, parser=parser, seed=seed)
    return METRICS[metric](prediction, list(answers), options)
