"""Task files: jsonl records, or a yaml spec pointing at a jsonl.

Record (one json object per line):
    id        str (default "<task>:<line>")
    question  str
    images    [path, ...] (or `image`: path); `video`: path (or `videos`: [path])
    options   [str, ...]  multiple choice; the prompt lists them as "A. ..."
    answer    str, or `answers`: [str, ...] (VQAv2: the 10 annotator answers)
    metric    one of metrics.METRICS (else the task's default)
    parser    option-letter extraction for mc_accuracy (metrics.MC_PARSERS)

yaml spec: {task, data (jsonl path, relative to the yaml), metric, parser, media_root,
pre_prompt, post_prompt, num_frames, max_new_tokens, ignore_case, ignore_punctuation}.
Paths in records are relative to `media_root` (default: the jsonl's folder).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from data_pipelines.sample import Reason
from lov_jax.eval import metrics

MC_POST_PROMPT = "\nAnswer with the option's letter from the given choices directly."
OPEN_POST_PROMPT = "\nAnswer the question using a single word or phrase."


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    name: str
    data: Path
    metric: str = "exact_match"
    parser: str = "mmbench"
    media_root: Path | None = None
    pre_prompt: str = ""
    post_prompt: str | None = None  # None: by metric (MC vs open-ended, as lmms-eval)
    num_frames: int = 8
    max_new_tokens: int = 32
    source: Path | None = None  # the file the user named

    def config(self) -> dict[str, Any]:
        fields = dataclasses.asdict(self)
        return {k: str(v) if isinstance(v, Path) else v for k, v in fields.items()}


@dataclasses.dataclass
class Request:
    """A validated record, ready for the model: prompt text + media paths."""

    id: str
    index: int  # line order, for a stable merged order
    question: str  # the full user text (question, options, post prompt)
    images: list[str]
    videos: list[str]
    answers: list[str]
    options: list[str] | None
    metric: str
    parser: str
    num_frames: int


@dataclasses.dataclass
class BadRecord:
    id: str
    index: int
    reason: Reason  # data_pipelines.sample.Reason
    message: str
    prompt: str = ""
    target: Any = None


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
        return TaskSpec(name=name, data=data, media_root=root, source=path, **raw)
    return TaskSpec(name=path.stem, data=path, source=path)


def read_records(spec: TaskSpec) -> list[Request | BadRecord]:
    """Every line of the task's jsonl, validated: a Request or a BadRecord (never dropped)."""
    root = spec.media_root or spec.data.parent
    out: list[Request | BadRecord] = []
    seen: set[str] = set()
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
                raise ValueError(f"duplicate id {rid!r}")
            seen.add(rid)
            out.append(_request(rec, rid, index, spec, root))
        except (ValueError, TypeError, KeyError) as err:
            out.append(BadRecord(rid, index, Reason.MALFORMED_RECORD, str(err)))
        except FileNotFoundError as err:
            out.append(BadRecord(rid, index, Reason.MISSING_MEDIA, str(err)))
    return out


def _as_list(value) -> list:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _request(rec: dict, rid: str, index: int, spec: TaskSpec, root: Path) -> Request:
    question = rec.get("question")
    if not isinstance(question, str) or not question.strip():
        raise ValueError("missing or empty `question`")
    answers = _as_list(rec.get("answers", rec.get("answer")))
    if not answers or not all(isinstance(a, (str, int, float)) for a in answers):
        raise ValueError("missing `answer`/`answers` (strings)")
    answers = [str(a) for a in answers]
    metric = rec.get("metric", spec.metric)
    if metric not in metrics.METRICS:
        raise ValueError(f"unknown metric {metric!r}")
    parser = rec.get("parser", spec.parser)
    options = rec.get("options")
    if options is not None:
        if not isinstance(options, list) or not options or len(options) > len(metrics.LETTERS):
            raise ValueError("`options` must be a non-empty list")
        options = [str(o) for o in options]
    if metric == "mc_accuracy":
        if options is None:
            raise ValueError("mc_accuracy needs `options`")
        if parser not in metrics.MC_PARSERS:
            raise ValueError(f"unknown parser {parser!r}")
        metrics.answer_letter(answers[0], options)  # raises when the gold is not an option
    images = [str(root / p) for p in _as_list(rec.get("images", rec.get("image")))]
    videos = [str(root / p) for p in _as_list(rec.get("videos", rec.get("video")))]
    for p in images + videos:
        if not Path(p).exists():
            raise FileNotFoundError(f"media file not found: {p}")
    text = spec.pre_prompt + question
    if options is not None:
        text += "\n" + metrics.format_options(options)
    post = spec.post_prompt
    if post is None:
        post = MC_POST_PROMPT if metric == "mc_accuracy" else OPEN_POST_PROMPT
    return Request(
        id=rid, index=index, question=text + post, images=images, videos=videos,
        answers=answers, options=options, metric=metric, parser=parser,
        num_frames=int(rec.get("num_frames", spec.num_frames)),
    )  # fmt: skip
