"""Answer extraction from free-form model output, as lmms-eval's tasks do it.

Each function names its lmms-eval origin (paths under `lmms_eval/tasks/`, commit in
`lov_jax.eval.metrics`). Behaviour is kept to the letter, quirks included; where a quirk
is surprising the comment says so. The only deliberate deviation: lmms-eval's MMMU-style
parsers fall back to `random.choice` (unseeded) when nothing matches; here that choice is
seeded by the sample id so reruns agree (`seeded_choice`).
"""

from __future__ import annotations

import hashlib
import random
import re
import string
from collections.abc import Mapping, Sequence

# ---- _task_utils/mcq_extract.py `extract_mcq_answer` -----------------------------------

_ANSWER_PHRASES = (
    "the answer is", "answer is", "the correct answer is", "correct answer is",
    "the best answer is", "best answer is", "the correct option is", "correct option is",
    "the best option is", "best option is", "the choice is", "choice is",
    "the correct choice is", "correct choice is", "i choose", "i select", "i pick",
    "my answer is", "my choice is",
    "옵션", "정답은", "답은", "답:", "答案是", "答案为", "选", "答えは",
)  # fmt: skip
_FORMAT_PRIORITY = {
    "start": 10, "end": 9, "phrase": 7, "parentheses": 6, "period": 5, "colon": 4,
    "right_paren": 3, "space": 2, "fallback": 0,
}  # fmt: skip


def extract_mcq_answer(response: str, choices: Sequence[str] | None = None) -> str:
    """The shared extractor (MMStar, RealWorldQA, Video-MME, MLVU, MMBench's static
    fallback): every letter found in any of the formats `(A)`, `A.`, `A:`, `A)`, `A `,
    after an answer phrase, at the start or at the end; the highest-priority format wins,
    then the last position. '' when nothing matches."""
    if not response or not response.strip():
        return ""
    choices = choices or tuple("ABCDEFGH")
    text = response.strip()
    for char in (",", ".", "!", "?", ";", ":", "'", '"'):
        text = text.strip(char)
    text = " " + text + " "
    cands: list[tuple[str, int, str]] = []
    for fmt, pattern in (
        ("parentheses", "({})"), ("period", "{}."), ("colon", "{}:"),
        ("right_paren", "{})"), ("space", "{} "),
    ):  # fmt: skip
        for ch in choices:
            if pattern.format(ch) in text:
                cands.append((ch, text.rfind(pattern.format(ch)), fmt))
    lower = text.lower()
    for phrase in _ANSWER_PHRASES:
        idx = lower.find(phrase)
        if idx != -1:
            for ch in choices:
                pos = text.find(ch, idx + len(phrase))  # any later occurrence, even in a word
                if pos != -1:
                    cands.append((ch, pos, "phrase"))
    stripped = text.strip()
    for ch in choices:
        if stripped.startswith(ch) and (len(stripped) == 1 or not stripped[1].isalpha()):
            cands.append((ch, 0, "start"))
    for ch in choices:
        if stripped.endswith(ch) and (len(stripped) == 1 or not stripped[-2].isalpha()):
            cands.append((ch, len(text) - 1, "end"))
    if not cands:
        cands = [(ch, text.rfind(ch), "fallback") for ch in choices if ch in text]
    if not cands:
        return ""
    # sorted(..., reverse=True) is stable: among equal keys the first appended wins
    cands.sort(key=lambda c: (_FORMAT_PRIORITY[c[2]], c[1]), reverse=True)
    return cands[0][0]


# ---- mmbench/mmbench_evals.py `MMBench_Evaluator.can_infer` ----------------------------

_MMBENCH_TUPS = (
    ("", "."), ("", ","), ("", ":"), ("", ")"), ("", ")."), ("(", ")"), ("(", ")."),
    (":", ""), (":", ","), (":", "."), (":", ")"), (":", ")."),
)  # fmt: skip


def mmbench_can_infer_option(answer: str, num_choice: int = 5) -> str | bool:
    """A letter that stands alone as a word (bare, then with one of the prefix/suffix
    forms); a bare 'A' in a response of more than 3 words is taken for an article and
    skipped to the suffixed forms. False when none or several."""
    choices = string.ascii_uppercase[:num_choice]
    if "Failed to obtain answer via API" in answer:
        return False
    splits = [x.strip() for x in answer.split()]

    def count(prefix: str = "", suffix: str = "") -> int:
        return sum(prefix + c + suffix in splits for c in choices)

    if count() == 1:
        for ch in choices:
            if "A" in splits and len(splits) > 3:
                break
            if ch in splits:
                return ch
    for prefix, suffix in _MMBENCH_TUPS:
        if count(prefix, suffix) == 1:
            for ch in choices:
                if prefix + ch + suffix in splits:
                    return ch
    return False


def mmbench_can_infer_text(answer: str, choices: Mapping[str, str]) -> str | bool:
    """The one option whose (lower-cased) text occurs in the answer, else False."""
    answer = answer.lower()
    cands = [k for k, v in choices.items() if str(v).lower() in answer]
    return cands[0] if len(cands) == 1 else False


def mmbench_can_infer(answer: str, choices: Mapping[str, str]) -> str | bool:
    return mmbench_can_infer_option(answer) or mmbench_can_infer_text(answer, choices)


# ---- mmmu (and nextqa) `parse_multi_choice_response` ------------------------------------


def seeded_choice(options: Sequence[str], seed: str) -> str:
    """Stands in for lmms-eval's unseeded `random.choice` fallback (see module doc)."""
    rng = random.Random(int(hashlib.sha256(seed.encode()).hexdigest()[:8], 16))
    return rng.choice(list(options))


def mmmu_parse_multi_choice(
    response: str, all_choices: Sequence[str], index2ans: Mapping[str, str], seed: str = ""
) -> tuple[str, bool]:
    """_task_utils/mmmu_mcq_utils.py `parse_mmmu_multi_choice_response` (NExT-QA's copy is
    identical). Returns (letter, fell_back): fell_back when no candidate matched and the
    letter is the seeded random choice."""
    for char in (",", ".", "!", "?", ";", ":", "'"):
        response = response.strip(char)
    response = " " + response + " "
    index_ans, ans_with_brack, cands = True, False, []
    for choice in all_choices:
        if f"({choice})" in response:
            cands.append(choice)
            ans_with_brack = True
    if not cands:
        cands = [c for c in all_choices if f"{c} " in response]
    if not cands:
        cands = [c for c in all_choices if f"{c}." in response]
    if not cands and len(response.split()) > 5:
        for index, ans in index2ans.items():
            if ans.lower() in response.lower():
                cands.append(index)
                index_ans = False
    if not cands:
        return seeded_choice(all_choices, seed), True
    if len(cands) == 1:
        return cands[0], False
    if index_ans:
        pattern = "({})" if ans_with_brack else " {} "
        starts = [response.rfind(pattern.format(c)) for c in cands]
    else:
        starts = [response.lower().rfind(index2ans[c].lower()) for c in cands]
    return cands[starts.index(max(starts))], False  # np.argmax: the first maximum


def egoschema_parse_multi_choice(
    response: str, all_choices: Sequence[str], index2ans: Mapping[str, str], seed: str = ""
) -> tuple[str, bool]:
    """egoschema/utils.py `parse_multi_choice_response`: unlike MMMU's, all three letter
    forms are collected (no early stop) and the FIRST occurrence wins (np.argmin)."""
    for char in (",", ".", "!", "?", ";", ":", "'"):
        response = response.strip(char)
    response = " " + response + " "
    index_ans, cands = True, []
    for pattern in ("({})", "{} ", "{}."):
        cands += [pattern.format(c) for c in all_choices if pattern.format(c) in response]
    if not cands and len(response.split()) > 5:
        for index, ans in index2ans.items():
            if ans.lower() in response.lower():
                cands.append(index)
                index_ans = False
    if not cands:
        return seeded_choice(all_choices, seed), True
    if len(cands) > 1:
        if index_ans:
            starts = [response.rfind(c) for c in cands]
        else:
            starts = [response.lower().rfind(index2ans[c].lower()) for c in cands]
        pick = cands[starts.index(min(starts))]
    else:
        pick = cands[0]
    return pick.replace("(", "").replace(")", "").replace(".", "").strip(), False


def leading_letter(resp: str) -> str:
    """The `MultiChoiceRegexFilter` of ai2d/utils.py and muirbench/utils.py: the letter of
    a leading 'X.', else the response unchanged."""
    match = re.match(r"^\s*([A-Z])\.", resp)
    return match.group(1) if match else resp


# ---- mmmu/utils.py open questions (from the official MMMU eval_utils) -------------------


def mmmu_extract_numbers(text: str) -> list[str]:
    commas = re.findall(r"-?\b\d{1,3}(?:,\d{3})+\b", text)
    scientific = re.findall(r"-?\d+(?:\.\d+)?[eE][+-]?\d+", text)
    simple = re.findall(r"-?(?:\d+\.\d+|\.\d+|\d+\b)(?![eE][+-]?\d+)(?![,\d])", text)
    return commas + scientific + simple


def _is_number(text: str) -> bool:
    try:
        float(text.replace(",", ""))
        return True
    except ValueError:
        return False


def mmmu_normalize_str(text: str) -> list:
    """A number becomes [round(float, 2)]; a one-character string [' x', 'x '] (to avoid
    trivial substring matches); else [lower-cased string]."""
    text = text.strip()
    if _is_number(text):
        return [round(float(text.replace(",", "")), 2)]
    text = text.lower()
    return [" " + text, text + " "] if len(text) == 1 else [text]


_KEY_INDICATORS = ("could be ", "so ", "is ", "thus ", "therefore ", "final ", "answer ",
                   "result ")  # fmt: skip
_TRIVIAL = (":", ",", ".", "!", "?", ";", ":", "'")


def mmmu_parse_open_response(response: str) -> list:
    """`parse_open_response`: the shortest tail after a key phrase in each sentence (or
    the whole response), plus every number in them, normalised, deduplicated. Returned
    sorted by repr (lmms-eval returns `list(set(...))`, whose order only matters for the
    logged first element; the score does not depend on it)."""
    response = response.strip().strip(".").lower()
    # sic: the split looks for ". " before a capital, but the text is already lower case
    subs = re.split(r"\.\s(?=[A-Z])|\n", response)
    keys = []
    for index, resp in enumerate(subs):
        indicators = _KEY_INDICATORS + (("=",) if index == len(subs) - 1 else ())
        shortest = None
        for ind in indicators:
            if ind in resp:
                tail = resp.split(ind)[-1].strip()
                if not shortest or len(tail) < len(shortest):
                    shortest = tail
        if shortest and shortest.strip() not in _TRIVIAL:
            keys.append(shortest)
    if not keys:
        keys = [response]
    preds = list(keys)
    for resp in keys:
        preds.extend(mmmu_extract_numbers(resp))
    normed = []
    for p in preds:
        normed.extend(mmmu_normalize_str(p))
    return sorted(set(normed), key=repr)


def mmmu_eval_open(gold: str | Sequence[str], preds: Sequence) -> bool:
    """`eval_open`: a string prediction matches when a normalised gold string is a
    substring of it; a number when it equals a normalised gold number."""
    golds = [gold] if isinstance(gold, str) else list(gold)
    norm_answers = [n for g in golds for n in mmmu_normalize_str(g)]
    for pred in preds:
        if isinstance(pred, str):
            if any(isinstance(n, str) and n in pred for n in norm_answers):
                return True
        elif pred in norm_answers:
            return True
    return False


# ---- mme/utils.py `parse_pred_ans` (from Otter) -------------------------------------------


def mme_yes_no(pred: str) -> str:
    """'yes' / 'no' / 'other': periods dropped; a lone y/n; else 'yes' or 'no' within the
    first four characters, 'yes' first ('yes, no' is 'yes'; 'not sure' is 'no')."""
    pred = pred.lower().strip().replace(".", "")
    if pred in ("yes", "no"):
        return pred
    if len(pred) == 1:
        return {"y": "yes", "n": "no"}.get(pred, "other")
    head = pred[:4]
    if "yes" in head:
        return "yes"
    return "no" if "no" in head else "other"
