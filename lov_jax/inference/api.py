"""`generate(params, cfg, request, tokenizer=...)`: chat messages or (prompt, images, videos) in,
text out.

Prompt rendering follows llava-hf's chat template (REFERENCE.md 7.1): per message
`<|im_start|>{role}\n`, one `<image>\n` per image item, one `<video>\n` per video item,
the text items, `<|im_end|>\n`; then `<|im_start|>assistant\n`. As in HF, a sample with
exactly one image uses anyres_max_9, several images use one padded crop each
(REFERENCE.md 4.2), and videos are sampled uniformly and resized frame by frame.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from data_pipelines import image_processing, prompt, video
from lov_jax import visual_layout
from lov_jax.config import ModelConfig
from lov_jax.inference.engine import GenerationConfig, GenerationOutput, Generator, PromptInputs

# A request is a list of chat messages, or a (prompt, images, videos) tuple.
Request = Sequence[Mapping[str, Any]] | tuple


def render_messages(messages: Sequence[Mapping[str, Any]]) -> tuple[str, list, list]:
    """Chat messages -> (prompt text with placeholders, images, videos) in item order.

    A message is {"role": ..., "content": str | [{"type": "text", "text": ...},
    {"type": "image", "image": path|PIL|array}, {"type": "video", "video": path|frames}]}.
    """
    text, images, videos = "", [], []
    for m in messages:
        content = m["content"]
        if isinstance(content, str):
            content = [{"type": "text", "text": content}]
        imgs = [c.get("image", c.get("path")) for c in content if c["type"] == "image"]
        vids = [c.get("video", c.get("path")) for c in content if c["type"] == "video"]
        words = "".join(c["text"] for c in content if c["type"] == "text")
        text += f"<|im_start|>{m['role']}\n"
        text += f"{prompt.IMAGE_PLACEHOLDER}\n" * len(imgs)
        text += f"{prompt.VIDEO_PLACEHOLDER}\n" * len(vids)
        text += f"{words}<|im_end|>\n"
        images += imgs
        videos += vids
    return text + "<|im_start|>assistant\n", images, videos


def load_image(ref: Any):
    """A path, PIL image or uint8[H, W, 3] array -> RGB PIL image."""
    from PIL import Image

    if isinstance(ref, (str, Path)):
        if not Path(ref).is_file():
            raise FileNotFoundError(f"image not found: {ref}")
        with Image.open(ref) as im:
            return im.convert("RGB")
    return image_processing.to_rgb(ref)


def load_frames(ref: Any, num_frames: int) -> np.ndarray:
    """A video path (uniformly sampled `num_frames`) or frames uint8[F, H, W, 3]."""
    if isinstance(ref, (str, Path)):
        return video.read_video(ref, num_frames)
    return np.asarray(ref)


def encode_prompt(
    cfg: ModelConfig,
    tokenizer,
    text: str,
    images: Sequence[Any] = (),
    videos: Sequence[Any] = (),
    num_frames: int = 8,
) -> PromptInputs:
    """Prompt text (placeholders in item order: images before videos) -> PromptInputs."""
    kind = "anyres" if len(images) == 1 else "pad"
    crops, items = [], []
    for ref in images:
        c, item = image_processing.preprocess(kind, load_image(ref), cfg)
        crops.append(c)
        items.append(item)
    for ref in videos:
        frames = load_frames(ref, num_frames)
        crops.append(image_processing.video_frames(frames, cfg))
        items.append(visual_layout.VisualItem(kind="video", num_frames=len(frames)))
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    tokens = prompt.expand_placeholders(ids, items, cfg)
    size = cfg.vision.image_size
    crops = np.concatenate(crops) if crops else np.zeros((0, size, size, 3), np.uint8)
    return PromptInputs(tokens, crops, items)


def request_inputs(
    cfg: ModelConfig, tokenizer, request: Request, num_frames: int = 8, system: str | None = None
) -> PromptInputs:
    """One request (messages, or (prompt, images, videos)) -> PromptInputs."""
    if isinstance(request, tuple):
        question, images, videos = (tuple(request) + ((), ()))[:3]
        images, videos = list(images or ()), list(videos or ())
        text = prompt.chat_prompt(question, len(images), len(videos), system=system)
    else:
        text, images, videos = render_messages(request)
    return encode_prompt(cfg, tokenizer, text, images, videos, num_frames)


def generate(
    params,
    cfg: ModelConfig,
    requests: Request | Sequence[Request],
    *,
    tokenizer,
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    stop_ids: Sequence[int] | None = None,
    seed: int = 0,
    num_frames: int = 8,
    generator: Generator | None = None,
    mesh=None,
    return_output: bool = False,
) -> str | list[str] | tuple[list[str], GenerationOutput]:
    """Generate answers. One request -> one string; a list of requests -> a batch.

    A request is chat messages (list of dicts) or a (prompt, images, videos) tuple.
    Decoding stops on `stop_ids` (default: the checkpoint's eos ids) or `max_new_tokens`; text
    is decoded without special tokens. Pass a `Generator` to reuse its compilations.
    """
    single = isinstance(requests, tuple) or (bool(requests) and isinstance(requests[0], Mapping))
    batch = [requests] if single else list(requests)
    inputs = [request_inputs(cfg, tokenizer, r, num_frames) for r in batch]
    gen = generator or Generator(params, cfg, mesh=mesh)
    stops = None if stop_ids is None else tuple(stop_ids)
    gcfg = GenerationConfig(max_new_tokens, temperature, top_k, top_p, stops, seed)
    out = gen.generate(inputs, gcfg)
    texts = [tokenizer.decode(t, skip_special_tokens=True) for t in out.tokens]
    if return_output:
        return texts, out
    return texts[0] if single else texts
