"""Requests -> prompt ids, crops and visual items: the checkpoint's template, its tokenizer.

A request is a list of chat messages (HF / OpenAI content lists: several turns, images
and videos in any turn) or a `(prompt, images, videos)` tuple. Visual items go where
the text puts them:

* typed placeholders: when any text holds `<image>` / `<video>` ("Compare <image> with
  <image>."), every placeholder stays where it was typed and the images / videos fill
  them in order (message order, then order within a message); the counts must agree,
  or a `PromptError` names both. Image / video content parts then carry data only.
* none typed: the image / video parts are rendered by the template (llava-hf OneVision:
  all images, then videos, at the start of their message); a tuple's images and videos
  go before its text, as HF's processor places them.

The text is rendered by the checkpoint's own jinja chat template (exactly as HF's
`apply_chat_template`), or by a LLaVA-NeXT conversation template named with
`conv_template` (data_pipelines/chat_template.py). The i-th image placeholder of the
rendered ids takes the i-th image, the j-th video placeholder the j-th video (HF's
processor consumes them the same way). Each image's item kind is the architecture's, as
HF's processor chooses it (`image_processing.image_kind`): OneVision runs a lone image
through anyres_max_9 and gives several images one padded crop each (docs/reference.md 4.2);
LLaVA-NeXT runs every image through anyres; LLaVA-1.5 gives each image one crop, center
cropped (llava-hf) or padded to square (the original), per `cfg.vision_aspect_ratio`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from data_pipelines import chat_template, image_processing, prompt, video
from lov_jax import visual_layout
from lov_jax.config import ModelConfig
from lov_jax.inference.engine import PromptInputs
from lov_jax.token_ids import IMAGE_TEXT, VIDEO_TEXT

# A request is a list of chat messages, or a (prompt, images, videos) tuple.
Request = Sequence[Mapping[str, Any]] | tuple


class PromptError(ValueError):
    """A request whose placeholders and visual items do not agree, or a bad message."""


class MediaError(PromptError):
    """An image / video that cannot be decoded; the message names the file."""


@dataclasses.dataclass(frozen=True)
class Prompter:
    """The checkpoint's tokenizer and prompt format.

    tokenizer: `tokenizers.Tokenizer`; chat_template: its jinja (None: use
    `conv_template`, a LLaVA-NeXT template name); special_tokens: the template's
    variables (bos_token, ...); system: a system prompt added to every request (None:
    the template's own choice).
    """

    tokenizer: Any
    chat_template: str | None = None
    conv_template: str | None = None
    special_tokens: Mapping[str, str] = dataclasses.field(default_factory=dict)
    system: str | None = None

    @classmethod
    def from_checkpoint(
        cls, path: str | Path, *, conv_template: str | None = None, system: str | None = None
    ) -> Prompter:
        """Tokenizer and chat template from an HF dir or an Orbax checkpoint's assets.

        `conv_template` replaces the checkpoint's jinja template by a named one."""
        from data_pipelines.tokenizer import load_tokenizer
        from lov_jax.pretrained import asset_dir

        assets = asset_dir(path)  # located once: tokenizer, template and special tokens
        jinja = None if conv_template else chat_template.load_chat_template(assets)
        return cls(
            load_tokenizer(assets), jinja, conv_template,
            chat_template.template_special_tokens(assets), system,
        )  # fmt: skip

    def render(self, messages: Sequence[Mapping[str, Any]]) -> str:
        return chat_template.render_prompt(
            messages, chat_template=self.chat_template, conv_template=self.conv_template,
            system=self.system, special_tokens=self.special_tokens,
        )  # fmt: skip

    def encode(self, cfg: ModelConfig, request: Request, num_frames: int = 8) -> PromptInputs:
        messages, images, videos = to_messages(request)
        text = self.render(messages)
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        return encode_ids(cfg, ids, images, videos, num_frames)


def _parts(content: Any, where: str) -> list[dict]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, (list, tuple)):
        raise PromptError(f"{where}: content is a {type(content).__name__}, not str or list")
    parts = []
    for k, part in enumerate(content):
        kind = part.get("type") if isinstance(part, Mapping) else None
        if kind not in ("text", "image", "video"):
            raise PromptError(f"{where}, part {k}: type {kind!r} not in text / image / video")
        parts.append(dict(part))
    return parts


def _media(part: Mapping[str, Any]) -> Any:
    """The image / video of a content part: under its type's key, `path` or `url`."""
    for key in (part["type"], "path", "url"):
        if part.get(key) is not None:
            return part[key]
    raise PromptError(f"a {part['type']} part has no data (keys {part['type']!r}, path, url)")


def to_messages(request: Request) -> tuple[list[dict], list, list]:
    """(messages for the template, images, videos) in placeholder order (module docstring)."""
    if isinstance(request, tuple):
        question, images, videos = (tuple(request) + ((), ()))[:3]
        images, videos = list(images or ()), list(videos or ())
        content = [{"type": "image", "image": i} for i in images]
        content += [{"type": "video", "video": v} for v in videos]
        content.append({"type": "text", "text": question})
        request = [{"role": "user", "content": content}]
    if not request:
        raise PromptError("a request needs at least one message")
    messages = []
    for m, msg in enumerate(request):
        if not isinstance(msg, Mapping) or "role" not in msg:
            raise PromptError(f"message {m}: expected a mapping with `role` and `content`")
        messages.append({**msg, "content": _parts(msg.get("content", ""), f"message {m}")})
    parts = [p for msg in messages for p in msg["content"]]
    texts = [p["text"] for p in parts if p["type"] == "text"]
    typed = sum(t.count(IMAGE_TEXT) for t in texts), sum(t.count(VIDEO_TEXT) for t in texts)
    images = [_media(p) for p in parts if p["type"] == "image"]
    videos = [_media(p) for p in parts if p["type"] == "video"]
    if typed != (0, 0):
        if typed != (len(images), len(videos)):
            raise PromptError(
                f"the text holds {typed[0]} {IMAGE_TEXT} and {typed[1]} {VIDEO_TEXT} "
                f"placeholders but the request gives {len(images)} image(s) and "
                f"{len(videos)} video(s)"
            )
        for msg in messages:  # typed placeholders: media parts carry data, not placement
            msg["content"] = [p for p in msg["content"] if p["type"] == "text"]
    else:
        for msg in messages:  # the template renders items by type; data stays with us
            msg["content"] = [{"type": p["type"]} if p["type"] != "text" else p
                              for p in msg["content"]]  # fmt: skip
    return messages, images, videos


def load_image(ref: Any):
    """A path, PIL image or uint8[H, W, 3] array -> RGB PIL image (alpha onto white, as
    HF's processors; `image_processing.to_rgb`)."""
    from PIL import Image

    if isinstance(ref, (str, Path)):
        if not Path(ref).is_file():
            raise FileNotFoundError(f"image not found: {ref}")
        try:
            with Image.open(ref) as im:
                im.load()
                return image_processing.to_rgb(im)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
            # truncated / corrupt files: PIL's message often names no file
            raise MediaError(f"cannot decode image {ref}: {err}") from err
    return image_processing.to_rgb(ref)


def load_frames(ref: Any, num_frames: int) -> np.ndarray:
    """A video path (uniformly sampled `num_frames`) or frames uint8[F, H, W, 3]."""
    if isinstance(ref, (str, Path)):
        try:
            return video.read_video(ref, num_frames)
        except FileNotFoundError:
            raise
        except (OSError, ValueError) as err:
            msg = str(err) if str(ref) in str(err) else f"cannot decode video {ref}: {err}"
            raise MediaError(msg) from err
    frames = np.asarray(ref)
    if frames.ndim != 4 or not len(frames):
        raise MediaError(f"video frames must be uint8[F>0, H, W, 3], got shape {frames.shape}")
    return frames


def encode_ids(
    cfg: ModelConfig, ids: Sequence[int], images: Sequence[Any], videos: Sequence[Any],
    num_frames: int = 8,
) -> PromptInputs:  # fmt: skip
    """Rendered ids (one placeholder id per item) + media -> PromptInputs, the items (and
    their crops) in the order their placeholders appear."""
    tokens = cfg.ids
    order = [t for t in ids if t in tokens.visual]
    n_img = sum(t == tokens.image for t in order)
    if (n_img, len(order) - n_img) != (len(images), len(videos)):
        raise PromptError(
            f"the rendered prompt holds {n_img} image and {len(order) - n_img} video "
            f"placeholder ids but the request gives {len(images)} image(s) and "
            f"{len(videos)} video(s)"
        )
    kind = image_processing.image_kind(cfg, len(images))  # the architecture's choice
    pending_images, pending_videos = iter(images), iter(videos)
    crops, items = [], []
    for t in order:
        if t == tokens.image:
            c, item = image_processing.preprocess(kind, load_image(next(pending_images)), cfg)
        else:
            frames = load_frames(next(pending_videos), num_frames)
            c = image_processing.video_frames(frames, cfg)
            item = visual_layout.VisualItem(kind="video", num_frames=len(frames))
        crops.append(c)
        items.append(item)
    expanded = prompt.expand_placeholders(ids, items, cfg)
    size = cfg.vision.image_size
    crops = np.concatenate(crops) if crops else np.zeros((0, size, size, 3), np.uint8)
    return PromptInputs(expanded, crops, items)
