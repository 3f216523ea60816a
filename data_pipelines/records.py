"""Record -> Sample: media decoding, visual kinds, chat template, expansion, targets.

`process_record` raises `SkipSample(reason, message)` for bad input; `SkipCounter`
applies the policy (`skip`: drop, count the reason and log; `raise`: `BadRecordError`
naming the record id and file). Reasons:

  missing_image, corrupt_image, missing_video, corrupt_video, empty_video  (media.py)
  placeholder_mismatch  `<image>` count != image list length (video: != 1)
  malformed_record      unknown field types, roles, missing conversations
  too_long              over `max_tokens` / `max_crops` (never truncated)
"""

from __future__ import annotations

import collections
import dataclasses
import logging
from collections.abc import Callable
from typing import Any

import numpy as np

from data_pipelines import chat, media
from data_pipelines.image_processing import preprocess
from data_pipelines.prompt import expand_placeholders
from data_pipelines.sample import Sample, SkipSample
from data_pipelines.sources import INDEX_KEY, SOURCE_KEY
from lov_jax import visual_layout
from lov_jax.config import ModelConfig

log = logging.getLogger(__name__)

POLICIES = ("skip", "raise")
PAD_ID = 151643  # <|endoftext|>, Qwen2-Instruct's pad token (REFERENCE.md 7.3)


@dataclasses.dataclass(frozen=True)
class RecordOptions:
    """chat: template / loss mask / system prompt; video: frame sampling;
    max_tokens / max_crops: per-sample budgets (the packer's row budgets), None = none."""

    chat: chat.ChatOptions = chat.ChatOptions()
    video: media.VideoOptions = media.VideoOptions()
    max_tokens: int | None = None
    max_crops: int | None = None
    pad_id: int = PAD_ID


class BadRecordError(ValueError):
    """Bad input under policy `raise`; `reason` as in SkipSample."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def record_name(record: Any) -> str:
    """'id' (file[index]) for messages."""
    if not isinstance(record, dict):
        return f"<{type(record).__name__} record>"
    rid = record.get("id", "<no id>")
    where = record.get(SOURCE_KEY)
    if where is None:
        return repr(str(rid))
    index = record.get(INDEX_KEY)
    return f"{str(rid)!r} ({where}{'' if index is None else f'[{index}]'})"


def _image_refs(record: dict) -> list[Any]:
    refs = record.get("image")
    if refs is None:
        return []
    if isinstance(refs, (list, tuple)):
        return list(refs)
    if isinstance(refs, np.ndarray) and refs.dtype == object:
        return list(refs)
    return [refs]


def process_record(
    record: dict, cfg: ModelConfig, tokenizer, options: RecordOptions = RecordOptions()
) -> Sample:
    """One LLaVA record (as `sources` yields it) -> Sample, or SkipSample with the record
    named in the message."""
    try:
        return _process(record, cfg, tokenizer, options)
    except SkipSample as err:
        raise SkipSample(err.reason, f"{err.reason}: record {record_name(record)}: {err}") from err


def _process(record: dict, cfg: ModelConfig, tokenizer, options: RecordOptions) -> Sample:
    if not isinstance(record, dict):
        raise SkipSample("malformed_record", f"record is a {type(record).__name__}")
    rid = str(record.get("id", f"{record.get(SOURCE_KEY, '')}#{record.get(INDEX_KEY, '')}"))
    image_refs = _image_refs(record)
    video_ref = record.get("video")
    if image_refs and video_ref is not None:
        raise SkipSample("malformed_record", "record has both `image` and `video`")
    has_media = bool(image_refs) or video_ref is not None
    chat_opts = options.chat

    turns = chat.normalize_turns(record.get("conversations"))
    if has_media and chat_opts.move_image_to_front:
        turns = [(r, chat.move_image_to_front(t)) for r, t in turns]
    n_image, n_video = chat.count_placeholders(turns)
    if video_ref is not None:
        if n_image + n_video != 1:
            raise SkipSample(
                "placeholder_mismatch",
                f"video record needs exactly one <image>/<video>, text has {n_image + n_video}",
            )
        turns = chat.image_to_video_placeholder(turns)
    elif n_video or n_image != len(image_refs):
        raise SkipSample(
            "placeholder_mismatch",
            f"text has {n_image} <image> and {n_video} <video> for {len(image_refs)} image(s)",
        )
    if chat_opts.template == "plain" and len(image_refs) > 1:
        raise SkipSample("placeholder_mismatch", "plain template takes one image")
    ids, trained = chat.tokenize_conversation(turns, tokenizer, chat_opts)

    # Media -> crops, in placeholder order (orig: image list order).
    crops, items = [], []
    if video_ref is not None:
        frames = media.load_video(video_ref, options.video)
        c, item = preprocess("video", frames, cfg)
        crops.append(c)
        items.append(item)
    elif image_refs:
        kind = "square" if chat_opts.template == "plain" else "pad"
        if len(image_refs) == 1 and chat_opts.template != "plain":
            kind = "anyres"
        for ref in image_refs:
            c, item = preprocess(kind, media.load_image(ref), cfg)
            crops.append(c)
            items.append(item)
    num_crops = sum(len(c) for c in crops)
    if options.max_crops is not None and num_crops > options.max_crops:
        raise SkipSample("too_long", f"{num_crops} crops > max_crops {options.max_crops}")

    visual_ids = (cfg.image_token_id, cfg.video_token_id)
    counts = [visual_layout.num_tokens(item, cfg) for item in items]
    total = len(ids) - len(items) + sum(counts)
    if options.max_tokens is not None and total > options.max_tokens:
        raise SkipSample("too_long", f"{total} tokens > max_tokens {options.max_tokens}")
    tokens = expand_placeholders(ids, items, cfg)
    labels = chat.expand_trained(ids, trained, counts, visual_ids)
    targets, loss_mask = chat.next_token_targets(tokens, labels, visual_ids, options.pad_id)
    s = cfg.vision.image_size
    all_crops = np.concatenate(crops) if crops else np.zeros((0, s, s, 3), np.uint8)
    return Sample(
        id=rid,
        tokens=tokens,
        targets=targets,
        loss_mask=loss_mask,
        crops=all_crops,
        items=items,
        source=str(record.get(SOURCE_KEY, "")),
    )


class SkipCounter:
    """Applies the bad-input policy and counts skip reasons.

    policy "skip": a SkipSample becomes None, `counts[reason] += 1`, logged (the first
    `log_first` per reason at WARNING, later ones at DEBUG). policy "raise":
    BadRecordError with the record's id and file. Counts are plain dicts so per-worker
    counters can be merged (`merge`) and reported by the loader.
    """

    def __init__(self, policy: str = "skip", log_first: int = 10):
        if policy not in POLICIES:
            raise ValueError(f"policy {policy!r} not in {POLICIES}")
        self.policy, self.log_first = policy, log_first
        self.counts: collections.Counter[str] = collections.Counter()
        self.seen = 0

    def apply(self, fn: Callable[..., Sample], record: Any, *args, **kwargs) -> Sample | None:
        self.seen += 1
        try:
            return fn(record, *args, **kwargs)
        except SkipSample as err:
            if self.policy == "raise":
                raise BadRecordError(err.reason, str(err)) from err
            self.counts[err.reason] += 1
            level = logging.WARNING if self.counts[err.reason] <= self.log_first else logging.DEBUG
            log.log(level, "skipping sample: %s", err)
            return None

    def process(
        self, record: Any, cfg: ModelConfig, tokenizer, options: RecordOptions = RecordOptions()
    ) -> Sample | None:
        return self.apply(process_record, record, cfg, tokenizer, options)

    @property
    def skipped(self) -> int:
        return sum(self.counts.values())

    def stats(self) -> dict[str, int]:
        return {"seen": self.seen, "skipped": self.skipped, **dict(sorted(self.counts.items()))}

    def merge(self, other: SkipCounter | dict[str, int]) -> None:
        counts = other.counts if isinstance(other, SkipCounter) else other
        self.counts.update({k: v for k, v in counts.items() if k not in ("seen", "skipped")})
        self.seen += other.seen if isinstance(other, SkipCounter) else other.get("seen", 0)
