"""Task metrics equal to lmms-eval's `process_results` + aggregation, family by family.

Read at EvolvingLMMs-Lab/lmms-eval@75571cfe0fa36ca5ec2e6aa2bb268f9d38295af3 (2026-08-06):
`lmms_eval/tasks/<family>/utils.py` and yaml, `lmms_eval/api/metrics.py` (exact_match,
anls), `lmms_eval/api/task.py` (`process_results`: the prediction is stripped, the gold
is not), `lmms_eval/filters/`, `lmms_eval/tasks/_task_utils/` (`mcq_extract.py`,
`mmmu_mcq_utils.py`, `vqa_eval_metric.py`). Answer parsers live in
`lov_jax.eval.answer_parsing`, the VQA answer normalisation in `lov_jax.eval.vqa_normalize`.

A task file names a metric (`METRICS`): it picks the parser, the per-sample score and the
aggregation, and the values reported are named as lmms-eval's results.json names them
(`mme_perception_score`, `pope_f1_score`, `relaxed_overall`, ...) on lmms-eval's scale
(MMBench and Video-MME in percent, MME as summed category scores, OCRBench as the sum of
hits over 1000). Fields an aggregation groups by (MME's `question_id` image pairs and
`category`, MMBench's circular `index`, MMStar's `category` / `l2_category`, ...) are
record fields with the dataset's column names (`Metric.fields`).

Deviations, all deliberate: MMBench is scored as lmms-eval's `mmbench_*_static` variant
(its matcher, then the `extract_mcq_answer` fallback) instead of asking GPT when the
matcher fails; MMMU / NExT-QA / EgoSchema's unseeded random fallback is seeded by the
sample id; EgoSchema's full test set is scored by a web server in lmms-eval, here by the
local `egoschema_subset` accuracy (needs the answers).

Benchmarks of the LLaVA-OneVision paper that need a GPT judge and are left to lmms-eval
(run it against `lov-jax serve`): MM-Vet, LLaVA-Bench (in-the-wild) and LLaVA-Wilder,
ImageDC / VideoDetailCaption, MathVista and MathVerse (GPT answer extraction),
ActivityNet-QA, VideoChatGPT, LiveBench, MMBench with GPT matching, and every
`*_reasoning` variant. Rule-based ones the paper reports that are not here yet (lmms-eval
has them): MVBench, PerceptionTest, LongVideoBench, BLINK, Mantis, Q-Bench and the
LLaVA-Interleave bench.
"""

from __future__ import annotations

import dataclasses
import math
import re
import statistics
import string
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from lov_jax.eval import answer_parsing as ap
from lov_jax.eval import vqa_normalize as vqa

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
MC_POST_PROMPT = "\nAnswer with the option's letter from the given choices directly."
OPEN_POST_PROMPT = "\nAnswer the question using a single word or phrase."


@dataclasses.dataclass(frozen=True)
class Sample:
    """One scored record: the raw model text, the gold answer(s), the options (texts, in
    letter order) and the record fields its metric reads (`Metric.fields`)."""

    id: str
    prediction: str
    answers: Sequence[str]
    options: Sequence[str] | None = None
    meta: Mapping[str, Any] = dataclasses.field(default_factory=dict)


def option_letters(options: Sequence[str]) -> list[str]:
    return list(LETTERS[: len(options)])


def format_options(options: Sequence[str]) -> str:
    """'A. opt\\nB. opt' (the option block of lmms-eval's MC prompts)."""
    return "\n".join(f"{c}. {o}" for c, o in zip(option_letters(options), options, strict=True))


def answer_letter(answer: str, options: Sequence[str]) -> str:
    """The gold option letter: 'B', '(B)', 'B.', the option's index ('1') or its text."""
    a = answer.strip()
    m = re.fullmatch(r"\(?([A-Z])\)?\.?", a)
    if m and m.group(1) in option_letters(options):
        return m.group(1)
    if a in options:
        return LETTERS[list(options).index(a)]
    if a.isdigit() and int(a) < len(options):  # HF datasets store the index (ScienceQA, AI2D)
        return LETTERS[int(a)]
    raise ValueError(f"answer {answer!r} is neither an option letter, index nor text")


def _gold_letter(s: Sample) -> str:
    return answer_letter(s.answers[0], s.options) if s.options else s.answers[0]


def _pred(s: Sample) -> str:
    return s.prediction.strip()  # api/task.py strips every generation before scoring


# ---- per-sample scores: (Sample, **task args) -> (score, parsed) ---------------------------


def exact_match(s: Sample, ignore_case=False, ignore_punctuation=False, regexes_to_ignore=()):
    """api/metrics.py `exact_match_hf_evaluate`, any of the golds (multiple targets):
    regexes removed from both sides, then lower case, then ASCII `string.punctuation`
    deleted (not unicode punctuation: '。' stays)."""
    table = str.maketrans("", "", string.punctuation)

    def norm(text: str) -> str:
        for pattern in regexes_to_ignore:
            text = re.sub(pattern, "", text)
        text = text.lower() if ignore_case else text
        return text.translate(table) if ignore_punctuation else text

    pred = norm(_pred(s))
    return float(any(pred == norm(a) for a in s.answers)), pred


def anls(s: Sample, threshold: float = 0.5):
    """api/metrics.py `anls` (DocVQA, InfoVQA): 1 - min normalised Levenshtein distance
    over the golds, 0 below the threshold; the distance on lower-cased,
    whitespace-collapsed strings, the length from the unnormalised ones (upper-cased)."""
    pred = _pred(s)
    det = " ".join(pred.strip().lower().split())
    values = []
    for answer in s.answers:
        gt = " ".join(answer.strip().lower().split())
        length = max(len(answer.upper()), len(pred.upper()))
        values.append(0.0 if length == 0 else levenshtein(gt, det) / length)
    result = 1 - min(values)
    return (0.0 if result < threshold else float(result)), det


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


def _to_float(text: str) -> float | None:
    try:
        return float(text.rstrip("%")) / 100.0 if text.endswith("%") else float(text)
    except ValueError:
        return None


def relaxed_correctness(prediction: str, target: str, max_relative_change: float = 0.05):
    """chartqa/utils.py: within 5% of a numeric gold (a trailing '%' divides by 100; a zero
    gold falls back to string equality), else case-insensitive equality."""
    p, t = _to_float(prediction), _to_float(target)
    if p is not None and t:
        return abs(p - t) / abs(t) <= max_relative_change
    return prediction.lower() == target.lower()


def chartqa(s: Sample):
    pred = _pred(s)
    return float(any(relaxed_correctness(pred, a) for a in s.answers)), pred


def vqav2(s: Sample):
    """vqav2/utils.py `vqav2_process_results`: both sides through the punctuation and
    digit/article steps (no lower-casing first, no "'s" split: not the full processor);
    the mean over leave-one-out subsets of min(1, #matches / 3)."""
    res = _pred(s).replace("\n", " ").replace("\t", " ").strip()
    res = vqa.process_digit_article(vqa.process_punctuation(res))
    gts = [a.replace("\n", " ").replace("\t", " ").strip() for a in s.answers]
    gts = [vqa.process_digit_article(vqa.process_punctuation(a)) for a in gts]
    return _leave_one_out(res, gts), res


def textvqa(s: Sample):
    """textvqa/utils.py: `EvalAIAnswerProcessor` on the prediction and every gold."""
    res = vqa.normalize_prediction(_pred(s))
    return _leave_one_out(res, [vqa.normalize_prediction(a) for a in s.answers]), res


def _leave_one_out(res: str, gts: Sequence[str]) -> float:
    others = [[g for j, g in enumerate(gts) if j != i] for i in range(len(gts))]
    return float(statistics.mean(min(1.0, sum(g == res for g in o) / 3) for o in others))


def ocrbench(s: Sample):
    """ocrbench/utils.py: a gold contained in the prediction; HME100k (formulas) ignores
    all spaces and keeps case, the others fold fullwidth ASCII and lower-case."""
    pred = _pred(s)
    formula = s.meta.get("dataset") == "HME100k"

    def norm(t: str) -> str:
        if formula:
            return t.strip().replace("\n", " ").replace(" ", "")
        return _fold_fullwidth(t).lower().strip().replace("\n", " ")

    return float(any(norm(a) in norm(pred) for a in s.answers)), pred


def _fold_fullwidth(text: str) -> str:
    return "".join(
        chr(ord(c) - 0xFEE0) if 0xFF01 <= ord(c) <= 0xFF5E else " " if ord(c) == 0x3000 else c
        for c in text
    )


def scienceqa(s: Sample):
    """scienceqa/utils.py `sqa_process_results` (LLaVA's rule): the whole answer is the
    letter, or it starts with an upper-case 'X.'."""
    target, pred = _gold_letter(s).strip().lower(), _pred(s)
    if pred.lower() == target:
        return 1.0, pred
    if len(pred) >= 2 and pred[0].isupper() and pred[1] == ".":
        return float(pred[0].lower() == target), pred[0]
    return 0.0, pred


def seedbench(s: Sample):
    """seedbench/utils.py: the first character of the answer is the choice."""
    pred = _pred(s)
    pred = pred[0] if len(pred) > 1 else pred
    return float(pred.lower().strip() == _gold_letter(s).lower().strip()), pred


def seedbench_2(s: Sample):
    """seedbench_2/utils.py: the first character, compared case-sensitively."""
    pred = _pred(s)
    pred = pred[0] if len(pred) > 1 else pred
    return float(pred == _gold_letter(s)), pred


def mme(s: Sample):
    pred = ap.mme_yes_no(s.prediction)
    return float(pred == _yes_no_gold(s.answers[0])), pred


def pope(s: Sample):
    pred = s.prediction.lower().strip()  # the whole answer must be yes or no
    return float(pred == _yes_no_gold(s.answers[0], strip_period=False)), pred


def _yes_no_gold(answer: str, strip_period: bool = True) -> str:
    gold = answer.lower().strip()
    gold = gold.replace(".", "") if strip_period else gold
    if gold not in ("yes", "no"):
        raise ValueError(f"the answer must be yes or no, got {answer!r}")
    return gold


def realworldqa(s: Sample):
    pred, gold = _pred(s), _gold_letter(s).strip()
    if gold.upper() in ("A", "B", "C", "D"):
        got = ap.extract_mcq_answer(pred, ["A", "B", "C", "D"])
        return float(got == gold.upper()), got
    got = pred.lower().strip().rstrip(".")
    return float(got == gold.lower()), got


def mcq_abcd(s: Sample):
    """`extract_mcq_answer` over A-D (MMStar, Video-MME, MLVU); case-insensitive gold."""
    got = ap.extract_mcq_answer(_pred(s), ["A", "B", "C", "D"])
    return float(got.lower() == _gold_letter(s).strip().lower()), got


def leading_letter_match(s: Sample):
    """MuirBench and AI2D: the `MultiChoiceRegexFilter` letter, then a case-insensitive
    compare (AI2D's exact_match also drops ASCII punctuation: '(B)' scores)."""
    got = ap.leading_letter(_pred(s))
    table = str.maketrans("", "", string.punctuation)
    pred, gold = got.lower().translate(table), _gold_letter(s).lower().translate(table)
    return float(pred == gold), got


def muirbench(s: Sample):
    got = ap.leading_letter(_pred(s))
    return float(got.lower().strip() == _gold_letter(s).lower().strip()), got


def mmbench(s: Sample):
    """The circular matcher of one record: `can_infer` on the prediction (options A-D),
    else the static `extract_mcq_answer` over the option letters."""
    pred = _pred(s)
    choices = dict(zip("ABCD", s.options, strict=False))
    got = ap.mmbench_can_infer(pred, choices) or ap.extract_mcq_answer(pred, sorted(choices))
    return float(got == _gold_letter(s)), got


def mmmu(s: Sample):
    """mmmu/utils.py. Multiple choice: `parse_multi_choice_response` against the gold
    letter. Open: `eval_open(gold, str(parse_open_response(pred)[0]))` as lmms-eval has
    it: that iterates the CHARACTERS of the first parsed answer, so an open question only
    scores when its gold is empty (a quirk of the reference, kept)."""
    pred = _pred(s)
    if s.options:
        letters = option_letters(s.options)
        got, _ = ap.mmmu_parse_multi_choice(
            pred, letters, dict(zip(letters, s.options, strict=True)), s.id
        )
        return float(got == _gold_letter(s)), got
    parsed = ap.mmmu_parse_open_response(pred)
    first = str(parsed[0]) if parsed else ""
    return float(ap.mmmu_eval_open(s.answers[0], first)), first


def nextqa_mc(s: Sample):
    """nextqa/utils.py `nextqa_mc_process_results` (MMMU's parser, options stripped)."""
    letters = option_letters(s.options)
    index2ans = {c: o.strip() for c, o in zip(letters, s.options, strict=True)}
    got, _ = ap.mmmu_parse_multi_choice(_pred(s), letters, index2ans, s.id)
    return float(got == _gold_letter(s)), got


def egoschema(s: Sample):
    """egoschema/utils.py `egoschema_process_results_generation`; the dataset's option
    strings carry their letter ('A. text'), which the text match sees."""
    letters = option_letters(s.options)
    index2ans = {c: f"{c}. {o}".strip() for c, o in zip(letters, s.options, strict=True)}
    got, _ = ap.egoschema_parse_multi_choice(_pred(s), letters, index2ans, s.id)
    index = letters.index(got) if got in letters[:5] else -1
    return float(str(LETTERS.index(_gold_letter(s))) == str(index)), got


# ---- aggregations: rows -> {value name: value} ------------------------------------------
# A row is what the runner logs: score, parsed, target (gold or golds), meta.


def _mean_of(name: str) -> Callable[[list[dict]], dict[str, float]]:
    return lambda rows: {name: statistics.fmean(float(r["score"]) for r in rows)}


def _target(row: dict) -> str:
    t = row["target"]
    return t[0] if isinstance(t, list) else t


def _parsed(row: dict) -> str:
    return "" if row["parsed"] is None else str(row["parsed"])


def agg_pope(rows):
    """pope/utils.py: precision / recall over the exact answers 'yes' / 'no' (anything
    else is neither); the yes ratio is that of the GOLD answers, as lmms-eval has it."""
    pairs = [(_parsed(r), _target(r).lower().strip()) for r in rows]
    tp = sum(g == "yes" and p == "yes" for p, g in pairs)
    fp = sum(g == "no" and p == "yes" for p, g in pairs)
    fn = sum(g == "yes" and p == "no" for p, g in pairs)
    yes, no = sum(g == "yes" for _, g in pairs), sum(g == "no" for _, g in pairs)
    precision = tp / (tp + fp) if tp + fp else 0
    recall = tp / (tp + fn) if tp + fn else 0
    return {
        "pope_accuracy": statistics.fmean(float(r["score"]) for r in rows),
        "pope_precision": precision,
        "pope_recall": recall,
        "pope_f1_score": 2 * precision * recall / (precision + recall) if precision + recall else 0,
        "pope_yes_ratio": yes / (yes + no) if yes + no else 0,
    }


MME_PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene",
                  "landmark", "artwork", "OCR")  # fmt: skip


def agg_mme(rows):
    """mme/utils.py: per category, the mean over images (`question_id`, two questions
    each) of accuracy + accuracy+ (both right), in percent; perception and cognition are
    sums over their categories (any category not in perception is cognition)."""
    by_key: dict[str, dict[str, dict[str, list[float]]]] = defaultdict(lambda: defaultdict(dict))
    for r in rows:
        cat = r["meta"]["category"]
        key = "mme_perception_score" if cat in MME_PERCEPTION else "mme_cognition_score"
        by_key[key][cat].setdefault(str(r["meta"]["question_id"]), []).append(float(r["score"]))
    out = {}
    for key, cats in by_key.items():
        total = 0.0
        for cat, images in cats.items():
            for qid, scores in images.items():
                if len(scores) != 2:
                    raise ValueError(f"MME scores image pairs: question_id {qid!r} ({cat}) "
                                     f"has {len(scores)} question(s), not 2")  # fmt: skip
            total += sum(sum(v) / 2 * 100 + (sum(v) == 2) * 100 for v in images.values()) / len(
                images
            )
        out[key] = total
    return out


def agg_mmbench(rows):
    """mmbench_evals.py `eval_result` (circular): a question (`index` < 1e6) is a hit when
    it and all its rotated copies (`index` % 1e6 equal) are right; percent of questions.
    Records without an `index` are their own question."""
    groups: dict[Any, list[float]] = defaultdict(list)
    mains = []
    for n, r in enumerate(rows):
        index = r["meta"].get("index")
        key = ("row", n) if index is None else int(index) % 1_000_000
        groups[key].append(float(r["score"]))
        if index is None or int(index) < 1_000_000:
            mains.append(key)
    hits = [float(all(v == 1.0 for v in groups[k])) for k in mains]
    return {"gpt_eval_score": 100 * statistics.fmean(hits) if hits else 0.0}


def agg_mmstar(rows):
    """mmstar/utils.py: the mean of per-`l2_category` means, for each `category` and over
    all records ('average')."""

    def mean_of_l2(rs):
        by_l2 = defaultdict(list)
        for r in rs:
            by_l2[r["meta"].get("l2_category", "")].append(float(r["score"]))
        return statistics.fmean(statistics.fmean(v) for v in by_l2.values())

    by_cat = defaultdict(list)
    for r in rows:
        if "category" in r["meta"]:
            by_cat[r["meta"]["category"]].append(r)
    return {**{c: mean_of_l2(rs) for c, rs in sorted(by_cat.items())}, "average": mean_of_l2(rows)}


def agg_chartqa(rows):
    out = {"relaxed_overall": statistics.fmean(float(r["score"]) for r in rows)}
    for name, pick in (("relaxed_human_split", True), ("relaxed_augmented_split", False)):
        rs = [
            r for r in rows if "type" in r["meta"] and (r["meta"]["type"] == "human_test") is pick
        ]
        if rs:
            out[name] = statistics.fmean(float(r["score"]) for r in rs)
    return out


def agg_seedbench(rows):
    """seedbench/utils.py: accuracy per `data_type` ('seed_image', 'seed_video') and all;
    SEED-Bench-2's types have spaces, joined by '_' ('seed_Single_Image')."""
    out = {}
    for dtype in sorted({r["meta"]["data_type"] for r in rows if "data_type" in r["meta"]}):
        rs = [r for r in rows if r["meta"].get("data_type") == dtype]
        out[f"seed_{'_'.join(dtype.split(' '))}"] = statistics.fmean(float(r["score"]) for r in rs)
    out["seed_all"] = statistics.fmean(float(r["score"]) for r in rows)
    return out


def agg_videomme(rows):
    """videomme/utils.py: percent; the aggregate compares the parsed letter to the gold
    case-sensitively (the per-sample score does not)."""
    return {"videomme_perception_score": 100 * statistics.fmean(
        float(_parsed(r) == _target(r)) for r in rows)}  # fmt: skip


MLVU_TASK_TYPES = {
    "mlvu_dev": ("anomaly_reco", "count", "ego", "needle", "order", "plotQA", "topic_reasoning"),
    "mlvu_test": ("anomaly_reco", "count", "ego", "needleQA", "order", "plotQA", "sportsQA",
                  "topic_reasoning", "tutorialQA"),
}  # fmt: skip


def _agg_mlvu(split: str):
    """mlvu/utils.py: percent per `task_type`, averaged over ALL of the split's task types
    (a type with no records counts as 0, as lmms-eval has it)."""

    def agg(rows):
        types = MLVU_TASK_TYPES[split]
        accs = []
        for t in types:
            rs = [r for r in rows if r["meta"]["task_type"] == t]
            accs.append(100 * sum(_parsed(r) == _target(r) for r in rs) / len(rs) if rs else 0)
        return {"mlvu_percetion_score": sum(accs) / len(types)}  # sic: lmms-eval's name

    return agg


def agg_mmmu(rows):
    """mmmu/utils.py `mmmu_aggregate_results`: instance-level accuracy (the count-weighted
    mean of the subject accuracies is the plain mean), rounded to 5 decimals."""
    return {"mmmu_acc": round(statistics.fmean(float(r["score"]) for r in rows), 5)}


def agg_ocrbench(rows):
    """ocrbench/utils.py: the number of hits over 1000 (the benchmark's size; a subset
    scores lower than its accuracy, as in lmms-eval)."""
    return {"ocrbench_accuracy": sum(float(r["score"]) for r in rows) / 1000}


# ---- the registry ---------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Metric:
    """score: (Sample, **task args) -> (score, parsed). aggregate: rows -> values.
    choices: True needs `options`, False forbids them, None either. fields: record fields
    copied into `Sample.meta` (required ones first, then optional). means: the values
    that are plain means of the per-sample scores (they get a standard error)."""

    score: Callable[..., tuple[float, Any]]
    aggregate: Callable[[list[dict]], dict[str, float]]
    choices: bool | None
    post_prompt: str = OPEN_POST_PROMPT
    fields: tuple[str, ...] = ()
    optional_fields: tuple[str, ...] = ()
    means: tuple[str, ...] = ()
    task_args: tuple[str, ...] = ()
    open_post_prompt: str | None = None  # for a record without options, where different

    def default_post_prompt(self, has_options: bool) -> str:
        if not has_options and self.open_post_prompt is not None:
            return self.open_post_prompt
        return self.post_prompt


def _mean_metric(fn, name, choices, post_prompt=OPEN_POST_PROMPT, **kw) -> Metric:
    return Metric(fn, _mean_of(name), choices, post_prompt, means=(name,), **kw)


METRICS: dict[str, Metric] = {
    "exact_match": _mean_metric(
        exact_match, "exact_match", None,
        task_args=("ignore_case", "ignore_punctuation", "regexes_to_ignore"),
    ),
    "anls": _mean_metric(anls, "anls", False),
    "chartqa": Metric(chartqa, agg_chartqa, False, "\nAnswer the question with a single word.",
                      optional_fields=("type",), means=("relaxed_overall",)),
    "vqav2_accuracy": _mean_metric(vqav2, "exact_match", False),
    "textvqa_accuracy": _mean_metric(textvqa, "exact_match", False),
    "ocrbench": Metric(ocrbench, agg_ocrbench, False, "",
                       optional_fields=("dataset", "question_type")),
    "mme": Metric(mme, agg_mme, False, fields=("category", "question_id")),
    "pope": Metric(pope, agg_pope, False, means=("pope_accuracy",)),
    "mmbench": Metric(mmbench, agg_mmbench, True, "\n" + MC_POST_PROMPT,
                      optional_fields=("index", "hint")),
    "mmmu": Metric(mmmu, agg_mmmu, None, "\n\n" + MC_POST_PROMPT.strip(),
                   open_post_prompt="\n\n" + OPEN_POST_PROMPT.strip()),
    "mmstar": Metric(mcq_abcd, agg_mmstar, None, MC_POST_PROMPT.rstrip("."),
                     optional_fields=("category", "l2_category")),
    "ai2d": _mean_metric(leading_letter_match, "exact_match", True, MC_POST_PROMPT),
    "scienceqa": _mean_metric(scienceqa, "exact_match", True, MC_POST_PROMPT,
                              optional_fields=("hint",)),
    "seedbench": Metric(seedbench, agg_seedbench, True, MC_POST_PROMPT,
                        optional_fields=("data_type",), means=("seed_all",)),
    "seedbench_2": Metric(seedbench_2, agg_seedbench, True, "\n" + MC_POST_PROMPT.strip(),
                          optional_fields=("data_type",), means=("seed_all",)),
    "realworldqa": _mean_metric(realworldqa, "exact_match", None, ""),
    "videomme": Metric(mcq_abcd, agg_videomme, None, MC_POST_PROMPT),
    "mlvu_dev": Metric(mcq_abcd, _agg_mlvu("mlvu_dev"), None,
                       "\nOnly give the best option.\nBest option: (", fields=("task_type",)),
    "mlvu_test": Metric(mcq_abcd, _agg_mlvu("mlvu_test"), None,
                        "\nOnly give the best option.\nBest option: (", fields=("task_type",)),
    "nextqa_mc": _mean_metric(nextqa_mc, "exact_match", True, ""),
    "egoschema": _mean_metric(egoschema, "score", True, MC_POST_PROMPT),
    "muirbench": _mean_metric(muirbench, "muirbench_score_overall", True, MC_POST_PROMPT),
}  # fmt: skip


def get(name: str) -> Metric:
    if name not in METRICS:
        raise ValueError(f"unknown metric {name!r}; known: {', '.join(sorted(METRICS))}")
    return METRICS[name]


def check_record(name: str, answers: Sequence[str], options: Sequence[str] | None,
                 meta: Mapping[str, Any]) -> None:  # fmt: skip
    """What a record must hold for its metric: raises ValueError naming the field."""
    m = get(name)
    if not answers:
        raise ValueError("record has no answer")
    if m.choices and not options:
        raise ValueError(f"metric {name!r} needs `options`")
    if m.choices is False and options:
        raise ValueError(f"metric {name!r} is open-ended: drop `options`")
    for f in m.fields:
        if f not in meta:
            raise ValueError(f"metric {name!r} needs the record field `{f}`")
    if options and m.score is not exact_match:
        answer_letter(answers[0], options)  # raises when the gold is not an option
    if name in ("mme", "pope"):
        _yes_no_gold(answers[0], strip_period=name == "mme")
    if name.startswith("mlvu") and meta["task_type"] not in MLVU_TASK_TYPES[name]:
        raise ValueError(f"task_type {meta['task_type']!r} is not one of {name}'s: "
                         f"{', '.join(MLVU_TASK_TYPES[name])}")  # fmt: skip


def score(name: str, sample: Sample, **task_args) -> tuple[float, Any]:
    """The per-sample score and what was compared (the parsed letter, the normalised
    answer). `task_args` the metric does not take are ignored."""
    m = get(name)
    if not sample.answers:
        raise ValueError("record has no answer")
    return m.score(sample, **{k: v for k, v in task_args.items() if k in m.task_args})


def aggregate(rows: Sequence[dict]) -> dict[str, dict[str, float]]:
    """All values of a task: each metric's aggregation over its rows, as
    {value name: {value, stderr, n}} (stderr NaN unless the value is a plain mean). A
    value name two metrics of one task both report is prefixed 'metric:'."""
    by_metric: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        if all(f in (r.get("meta") or {}) for f in get(r["metric"]).fields):
            by_metric[r["metric"]].append(r)  # else an unreadable record (in bad_records)
    per_metric = {}
    for name, rs in sorted(by_metric.items()):
        m = get(name)
        values = m.aggregate(rs)
        n = len(rs)
        scores = [float(r["score"]) for r in rs]
        stderr = statistics.stdev(scores) / math.sqrt(n) if n > 1 else math.nan
        per_metric[name] = {
            k: {"value": float(v), "stderr": stderr if k in m.means else math.nan, "n": n}
            for k, v in values.items()
        }
    counts = defaultdict(int)
    for values in per_metric.values():
        for k in values:
            counts[k] += 1
    return {
        (k if counts[k] == 1 else f"{name}:{k}"): v
        for name, values in per_metric.items()
        for k, v in values.items()
    }
