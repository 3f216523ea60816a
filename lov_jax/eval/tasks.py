"""Task files: jsonl records, or a yaml spec pointing at a jsonl.

Record (one json object per line):
    id        str (default "<task>:<line>")
    question  str
    images    [path, ...] (or `image`: path); `video`: path (or `videos`: [path])
    options   [str, ...]  multiple choice; the prompt lists them as "A. ..."
    answer    str, or `answers`: [str, ...] (VQAv2 / TextVQA: the 10 annotator answers);
              with options: the letter, '(B)', the option's index or its text
    metric    one of metrics.METRICS (else the task's); it names the parser, the score
              and the aggregation (mmbench, mmmu, mme, pope, textvqa_accuracy, ...)
    <field>   the record fields the metric groups by, named as the dataset's columns
              (metrics.Metric.fields): mme `category`, `question_id` (the image of a
              pair); mmbench `index` (circular copies: index % 1e6); mmstar `category`,
              `l2_category`; seedbench `data_type`; chartqa `type`; ocrbench `dataset`;
              mlvu `task_type`

yaml spec: {task, data (jsonl path, relative to the yaml), metric, media_root,
pre_prompt, post_prompt, num_frames, max_new_tokens, ignore_case, ignore_punctuation,
regexes_to_ignore}. The last three are lmms-eval's exact_match options (its defaults:
off). post_prompt defaults to the metric's lmms-eval default. Paths in records are
relative to `media_root` (default: the jsonl's folder).
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any

from data_pipelines.sample import Reason
from lov_jax.eval import metrics


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    name: str
    data: Path
    metric: str = "exact_match"
    media_root: Path | None = None
    pre_prompt: str = ""
    post_prompt: str | None = None  # None: the metric's (as lmms-eval's task yaml)
    num_frames: int = 8
    max_new_tokens: int = 32
    ignore_case: bool = False
    ignore_punctuation: bool = False
    regexes_to_ignore: tuple[str, ...] = ()
    source: Path | None = None  # the file the user named

    def __post_init__(self):
        metrics.get(self.metric)  # unknown names list the known ones
        for name in ("ignore_case", "ignore_punctuation"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"task {self.name}: `{name}` must be true or false")
        regexes = self.regexes_to_ignore
        if isinstance(regexes, str) or not all(isinstance(r, str) for r in regexes):
            raise ValueError(f"task {self.name}: `regexes_to_ignore` must be a list of strings")
        for r in regexes:
            try:
                re.compile(r)
            except re.error as err:
                raise ValueError(
                    f"task {self.name}: bad regex {r!r} in regexes_to_ignore: {err}"
                ) from None
        object.__setattr__(self, "regexes_to_ignore", tuple(regexes))

    def metric_args(self) -> dict[str, Any]:
        """The exact_match options (metrics.score passes each metric only its own)."""
        return {"ignore_case": self.ignore_case, "ignore_punctuation": self.ignore_punctuation,
                "regexes_to_ignore": self.regexes_to_ignore}  # fmt: skip

    def config(self) -> dict[str, Any]:
        fields = dataclasses.asdict(self)
        return {
            k: str(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v
            for k, v in fields.items()
        }


@dataclasses.dataclass
class Request:
    """A validated record, ready for the model: prompt text + media paths."""

    id: str
    index: int  # line order, for a stable merged order
    question: str  # the full user text (question, options, post prompt)
    images: list[str]
    videos: list[str]
    answers: list[str]  # with options: the gold letter (an MC metric's target)
    options: list[str] | None
    metric: str
    num_frames: int
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)  # metric's record fields


@dataclasses.dataclass
class BadRecord:
    id: str
    index: int
    reason: Reason  # data_pipelines.sample.Reason
    message: str
    prompt: str = ""
    target: Any = None
    metric: str | None = None  # the record's, when it could be read (else the task's)
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)


def load_task(path: str | Path) -> TaskSpec:
    path = Path(path)
    if path.suffix in (".yaml", ".yml"):
        import yaml

        raw = yaml.safe_load(path.read_text()) or {}
        if "data" not in raw:
            raise ValueError(f"{path}: task yaml needs a `data:` jsonl path")
        fields = {f.name for f in dataclasses.fields(TaskSpec)}
        unknown = set(raw) - fields - {"task"}
        if unknown:
            raise ValueError(f"{path}: unknown task keys {sorted(unknown)}")
        raw = dict(raw)
        name = raw.pop("task", path.stem)
        data = path.parent / raw.pop("data")
        root = raw.pop("media_root", None)
        root = None if root is None else path.parent / root
        try:
            return TaskSpec(name=name, data=data, media_root=root, source=path, **raw)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{path}: {err}") from None
    return TaskSpec(name=path.stem, data=path, source=path)


def read_records(spec: TaskSpec) -> list[Request | BadRecord]:
    """Every line of the task's jsonl, validated: a Request or a BadRecord (never dropped).

    Two records with one id are an error naming both lines (results are keyed by id)."""
    root = spec.media_root or spec.data.parent
    out: list[Request | BadRecord] = []
    seen: dict[str, int] = {}
    for index, line in enumerate(spec.data.read_text().splitlines()):
        if not line.strip():
            continue
        rid = f"{spec.name}:{index}"
        try:
            rec = json.loads(line)
            if not isinstance(rec, dict):
                raise ValueError(f"a record must be a json object, got {type(rec).__name__}")
            rid = str(rec.get("id", rid))
            if rid in seen:
                raise DuplicateId(
                    f"{spec.data}: record id {rid!r} on line {index + 1} repeats line "
                    f"{seen[rid] + 1}; ids must be unique"
                )
            seen[rid] = index
            out.append(_request(rec, rid, index, spec, root))
        except DuplicateId:
            raise
        except MissingMedia as err:
            out.append(BadRecord(rid, index, Reason.MISSING_MEDIA, str(err), err.prompt,
                                 err.answers, err.metric, err.meta))  # fmt: skip
        except (ValueError, TypeError, KeyError) as err:
            out.append(BadRecord(rid, index, Reason.MALFORMED_RECORD, str(err)))
    return out


class DuplicateId(ValueError):
    """Two records of a task share an id (not a bad record: the whole task is refused)."""


def _as_list(value) -> list:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


# ---- prompts: lmms-eval's `doc_to_text` per family (question, options, fields, pre, post) ----


def _options(options) -> str:
    return "" if options is None else "\n" + metrics.format_options(options)


def _prompt(question, options, meta, pre, post) -> str:
    """ai2d / muirbench / mmmu / seedbench / egoschema / docvqa / chartqa: question, the
    'A. text' lines, post prompt."""
    return f"{pre}{question}{_options(options)}{post}"


def _strip_replace(phrase: str):
    """mme / mmstar / realworldqa: the stripped question; a non-empty pre / post prompt
    replaces the dataset's own instruction (`phrase`)."""

    def prompt(question, options, meta, pre, post) -> str:
        question = question.strip()
        if pre or post:
            question = question.replace(phrase, "")
        return f"{pre}{question}{_options(options)}{post}"

    return prompt


def _mmbench(question, options, meta, pre, post) -> str:
    """en_utils.mmbench_doc_to_text: '[hint ]question There are several options:\nA. x'."""
    block = "There are several options:" + _options(options)
    hint = meta.get("hint")
    body = f"{hint} {question} {block}" if hint and hint != "nan" else f"{question} {block}"
    return f"{pre}{body}{post}"


def _scienceqa(question, options, meta, pre, post) -> str:
    context = f"Context: {meta['hint']}\n" if meta.get("hint") else ""
    return f"{pre}{context}{question}{_options(options)}{post}"


VIDEOMME_INSTRUCTION = (
    "Select the best answer to the following multiple-choice question based on the video "
    "and the subtitles. Respond with only the letter (A, B, C, or D) of the correct option."
)


def _videomme(question, options, meta, pre, post) -> str:
    return f"{pre}{VIDEOMME_INSTRUCTION}\n{question}{_options(options)}\n{post}"


def _nextqa(question, options, meta, pre, post) -> str:
    lines = [question.strip()] + [f"{c}. {o.strip()}" for c, o in
                                  zip(metrics.LETTERS, options or [], strict=False)]  # fmt: skip
    return pre + "\n".join(lines) + post


PROMPTS = {
    "mmbench": _mmbench,
    "scienceqa": _scienceqa,
    "videomme": _videomme,
    "nextqa_mc": _nextqa,
    "mme": _strip_replace(" Please answer yes or no."),
    "mmstar": _strip_replace(" Please answer yes or no."),
    "realworldqa": _strip_replace(
        "Please answer directly with only the letter of the correct option and nothing else."
    ),
    "textvqa_accuracy": lambda q, o, m, pre, post: f"{pre}{q.capitalize()}{_options(o)}{post}",
    "ocrbench": lambda q, o, m, pre, post: f"{pre}{q.strip()}{_options(o)}{post}",
    "pope": lambda q, o, m, pre, post: f"{pre}{q.strip()}{_options(o)}{post}",
}


class MissingMedia(FileNotFoundError):
    """A readable record whose media file is absent (keeps what the scorer needs)."""

    def __init__(self, message: str, prompt: str, answers, metric: str, meta: dict):
        super().__init__(message)
        self.prompt, self.answers, self.metric, self.meta = prompt, answers, metric, meta


def _request(rec: dict, rid: str, index: int, spec: TaskSpec, root: Path) -> Request:
    question = rec.get("question")
    if not isinstance(question, str) or not question.strip():
        raise ValueError("missing or empty `question`")
    if "parser" in rec:
        raise ValueError("`parser` is gone: the metric names its parser (mmbench, mmmu, ...)")
    answers = _as_list(rec.get("answers", rec.get("answer")))
    if not answers or not all(isinstance(a, (str, int, float)) for a in answers):
        raise ValueError("missing `answer`/`answers` (strings)")
    first = answers[0]
    answers = [str(a) for a in answers]
    name = rec.get("metric", spec.metric)
    metric = metrics.get(name)
    options = rec.get("options")
    if options is not None:
        if not isinstance(options, list) or not options or len(options) > len(metrics.LETTERS):
            raise ValueError("`options` must be a non-empty list")
        options = [str(o) for o in options]
    meta = {f: rec[f] for f in metric.fields + metric.optional_fields if f in rec}
    metrics.check_record(name, answers, options, meta)
    if options and name != "exact_match":
        if type(first) is int:  # a json number is the option's index (as HF datasets store it)
            if not 0 <= first < len(options):
                raise ValueError(f"answer index {first} out of range for {len(options)} options")
            answers = [metrics.LETTERS[first]]
        answers = [metrics.answer_letter(answers[0], options)]
    post = (
        metric.default_post_prompt(bool(options)) if spec.post_prompt is None else spec.post_prompt
    )
    text = PROMPTS.get(name, _prompt)(question, options, meta, spec.pre_prompt, post)
    images = [str(root / p) for p in _as_list(rec.get("images", rec.get("image")))]
    videos = [str(root / p) for p in _as_list(rec.get("videos", rec.get("video")))]
    for p in images + videos:
        if not Path(p).exists():
            raise MissingMedia(f"media file not found: {p}", text, answers, name, meta)
    return Request(
        id=rid, index=index, question=text, images=images, videos=videos,
        answers=answers, options=options, metric=name, meta=meta,
        num_frames=int(rec.get("num_frames", spec.num_frames)),
    )  # fmt: skip
