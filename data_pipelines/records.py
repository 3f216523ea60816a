"""Record -> Sample: media decoding, visual kinds, chat template, expansion, targets.

`process_record` raises `BadSample(reason, message)` for bad input, the message naming
the record id and file[index]; the loader applies the policy (`sample.POLICIES`: skip and
count `skip/<reason>`, or raise). Reasons (`sample.Reason`): media.py's missing / corrupt
/ empty media; `placeholder_mismatch` (`<image>` count != image list length, video: != 1);
`malformed_record` (field types, roles, missing conversations); `too_long_tokens` /
`too_many_crops` (over `max_tokens` / `max_crops`, never truncated).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from data_pipelines import chat, media
from data_pipelines import video as video_lib
from data_pipelines.image_processing import image_kind, preprocess
from data_pipelines.prompt import expand_placeholders
from data_pipelines.sample import BadSample, Reason, Sample, over_budget
from data_pipelines.sources import INDEX_KEY, SOURCE_KEY
from lov_jax import visual_layout
from lov_jax.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class RecordOptions:
    """chat: template / loss mask / system prompt; video: frame sampling;
    max_tokens / max_crops: per-sample budgets (the packer's row budgets), None = none."""

    chat: chat.ChatOptions = chat.ChatOptions()
    video: media.VideoOptions = media.VideoOptions()
    max_tokens: int | None = None
    max_crops: int | None = None


def min_sample_tokens(tokenizer, options: chat.ChatOptions) -> int | None:
    """Tokens of the template's frame alone (system turn, one empty question and answer):
    no record can make a shorter sample. None when the template renders no empty turns."""
    turns = chat.normalize_turns([{"from": "human", "value": ""}, {"from": "gpt", "value": ""}])
    try:
        ids, _ = chat.tokenize_conversation(turns, tokenizer, options)
    except (BadSample, ValueError):  # e.g. `plain` wants an image: its records say so
        return None
    return len(ids)


def check_row_budget(tokenizer, options: RecordOptions) -> None:
    """Refuse, before any record is read, a token budget no sample can fit (else every
    sample is dropped as too long and the loader stops with its skip table)."""
    if options.max_tokens is None or tokenizer is None:  # no budget, or nothing to measure
        return
    frame = min_sample_tokens(tokenizer, options.chat)
    if frame is not None and options.max_tokens < frame:
        system = "with" if options.chat.system_prompt else "without"
        raise ValueError(
            f"seq_len / max_tokens {options.max_tokens} cannot hold one sample: the "
            f"{options.chat.template} template {system} a system prompt takes {frame} "
            "tokens for an empty question and answer"
        )


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
    """One LLaVA record (as `sources` yields it) -> Sample, or BadSample with the record
    named in the message."""
    try:
        return _process(record, cfg, tokenizer, options)
    except BadSample as err:
        raise BadSample(err.reason, f"{err.reason}: record {record_name(record)}: {err}") from err


def _process(record: dict, cfg: ModelConfig, tokenizer, options: RecordOptions) -> Sample:
    if not isinstance(record, dict):
        raise BadSample(Reason.MALFORMED_RECORD, f"record is a {type(record).__name__}")
    rid = str(record.get("id", f"{record.get(SOURCE_KEY, '')}#{record.get(INDEX_KEY, '')}"))
    image_refs = _image_refs(record)
    video_ref = record.get("video")
    if image_refs and video_ref is not None:
        raise BadSample(Reason.MALFORMED_RECORD, "record has both `image` and `video`")
    has_media = bool(image_refs) or video_ref is not None
    chat_opts = options.chat

    turns = chat.normalize_turns(record.get("conversations"))
    if has_media and chat_opts.move_image_to_front:
        turns = [(r, chat.move_image_to_front(t)) for r, t in turns]
    n_image, n_video = chat.count_placeholders(turns)
    if video_ref is not None:
        if n_image + n_video != 1:
            raise BadSample(
                Reason.PLACEHOLDER_MISMATCH,
                f"video record needs exactly one <image>/<video>, text has {n_image + n_video}",
            )
        turns = chat.image_to_video_placeholder(turns)
        # decoded before tokenizing: the time instruction needs the sampled frame times
        video = media.load_video_sample(video_ref, options.video)
        if options.video.add_time_instruction:
            text = video.time_instruction(options.video.fps, media.media_name(video_ref))
            ph = chat.VIDEO_PLACEHOLDER
            turns = [(r, video_lib.with_time_instruction(t, text, ph) if ph in t else t)
                     for r, t in turns]  # fmt: skip
    elif n_video or n_image != len(image_refs):
        raise BadSample(
            Reason.PLACEHOLDER_MISMATCH,
            f"text has {n_image} <image> and {n_video} <video> for {len(image_refs)} image(s)",
        )
    if chat_opts.template == "plain" and len(image_refs) > 1:
        raise BadSample(Reason.PLACEHOLDER_MISMATCH, "plain template takes one image")
    ids, trained = chat.tokenize_conversation(turns, tokenizer, chat_opts)

    # Media -> crops, in placeholder order (orig: image list order).
    crops, items = [], []
    if video_ref is not None:
        c, item = preprocess("video", video.frames, cfg)
        crops.append(c)
        items.append(item)
    elif image_refs:
        kind = image_kind(cfg, len(image_refs), plain=chat_opts.template == "plain")
        for ref in image_refs:
            c, item = preprocess(kind, media.load_image(ref), cfg)
            crops.append(c)
            items.append(item)
    num_crops = sum(len(c) for c in crops)
    visual_ids = cfg.ids.visual
    counts = [visual_layout.num_tokens(item, cfg) for item in items]
    total = len(ids) - len(items) + sum(counts)
    reason = over_budget(total, num_crops, options.max_tokens, options.max_crops)
    if reason is not None:
        budgets = f"max_tokens {options.max_tokens}, max_crops {options.max_crops}"
        raise BadSample(reason, f"{total} tokens, {num_crops} crops: over {budgets}")
    tokens = expand_placeholders(ids, items, cfg)
    labels = chat.expand_trained(ids, trained, counts, visual_ids)
    targets, loss_mask = chat.next_token_targets(tokens, labels, visual_ids, cfg.ids.pad)
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
