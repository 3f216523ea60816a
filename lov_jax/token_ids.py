"""Special token ids, read from a checkpoint's own files (docs/style.md 14).

Nothing about a checkpoint's vocabulary is a constant in code: a llava-hf OneVision
checkpoint pads with `<|endoftext|>` and stops on `<|im_end|>`, a Vicuna one pads with
`<unk>` and stops on `</s>`, and their ids differ. `read_token_ids` collects them once
at load time into a `TokenIds` that travels in `ModelConfig.token_ids`, is stored with
Orbax checkpoints and written back on export.

Where each id comes from, first hit wins (the order HF's `generate` resolves them:
`generation_config.json` overrides the model config, the tokenizer is the fallback):

  image  config.json `image_token_index` | `image_token_id`; tokenizer `<image>`
  video  config.json `video_token_index` | `video_token_id`; tokenizer `<video>`; none
  eos    generation_config.json `eos_token_id` (int or list); config.json
         `text_config.eos_token_id` | `eos_token_id`; tokenizer_config.json `eos_token`
  pad    generation_config.json `pad_token_id`; config.json `text_config.pad_token_id` |
         `pad_token_id`; tokenizer_config.json `pad_token`; else the first eos id (what
         HF `generate` falls back to, with a warning)
  bos    generation_config.json `bos_token_id`; config.json `text_config.bos_token_id` |
         `bos_token_id`; tokenizer_config.json `bos_token`; none

Every id must lie inside the embedding table, and the tokenizer must map the
placeholder text (`<image>`, `<video>`) to the placeholder id: anything else is a
`TokenIdError` naming the file and field, raised before any compute.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

IMAGE_TEXT, VIDEO_TEXT = "<image>", "<video>"  # the placeholders as typed in prompts


class TokenIdError(ValueError):
    """A special id that is missing, out of the vocabulary, or disagrees with the tokenizer."""


@dataclasses.dataclass(frozen=True)
class TokenIds:
    """pad: fills padding positions (never attended, never trained);
    eos: the stop ids (generation ends at any of them; eos[0] is the turn end);
    image / video: the placeholder ids that visual tokens are expanded from
    (video None: the checkpoint has no video placeholder); bos: prepended by some
    templates (None: the tokenizer has none)."""

    pad: int
    eos: tuple[int, ...]
    image: int
    video: int | None = None
    bos: int | None = None

    def __post_init__(self):
        object.__setattr__(self, "eos", tuple(int(i) for i in self.eos))
        if not self.eos:
            raise TokenIdError("TokenIds.eos is empty: generation would never stop")

    @property
    def visual(self) -> tuple[int, ...]:
        """The placeholder ids (image, and video when there is one)."""
        return (self.image,) if self.video is None else (self.image, self.video)

    def placeholder_id(self, kind: str) -> int:
        """The placeholder id of a visual item kind ('video' or any image kind)."""
        if kind != "video":
            return self.image
        if self.video is None:
            raise TokenIdError("this checkpoint has no video placeholder (no video_token_index)")
        return self.video

    def to_json(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "eos": list(self.eos)}

    @classmethod
    def from_json(cls, d: Mapping[str, Any], source: str = "token_ids") -> TokenIds:
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise TokenIdError(f"{source}: unknown keys {sorted(unknown)}")
        try:
            return cls(**{**d, "eos": tuple(d["eos"])})
        except (KeyError, TypeError) as err:
            raise TokenIdError(f"{source}: {err}") from err

    def check(self, vocab_size: int, source: str = "token ids") -> None:
        """Every id inside an embedding table of `vocab_size` rows."""
        for name, value in self._named():
            if not 0 <= value < vocab_size:
                raise TokenIdError(
                    f"{source}: {name} = {value} is outside the embedding table "
                    f"(vocab_size {vocab_size})"
                )

    def check_tokenizer(self, tokenizer, source: str = "tokenizer") -> None:
        """The tokenizer parses each placeholder text to exactly its placeholder id."""
        for text, want in ((IMAGE_TEXT, self.image), (VIDEO_TEXT, self.video)):
            if want is None:
                continue
            got = tokenizer.token_to_id(text)
            if got != want:
                found = "has no such token" if got is None else f"maps it to {got}"
                raise TokenIdError(
                    f"{source}: the placeholder {text!r} must be one token with id {want} "
                    f"(the model config's placeholder id), but the tokenizer {found}"
                )

    def _named(self):
        yield "pad", self.pad
        for k, i in enumerate(self.eos):
            yield f"eos[{k}]", i
        yield "image", self.image
        for name in ("video", "bos"):
            if getattr(self, name) is not None:
                yield name, getattr(self, name)


# ---- reading a checkpoint's files --------------------------------------------------------


def _read_json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        obj = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise TokenIdError(f"{path}: cannot read ({err})") from err
    if not isinstance(obj, dict):
        raise TokenIdError(f"{path}: expected a JSON object")
    return obj


def _token_text(value: Any) -> str | None:
    """tokenizer_config.json writes special tokens as a string or an AddedToken dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _first(sources: Sequence[tuple[str, Any]]) -> tuple[str, Any]:
    for where, value in sources:
        if value is not None:
            return where, value
    return "", None


def read_token_ids(
    directory: str | Path,
    hf_config: Mapping[str, Any] | None = None,
    tokenizer=None,
    *,
    vocab_size: int | None = None,
    asset_dirs: Sequence[str | Path] = (),
) -> TokenIds:
    """TokenIds from config.json, generation_config.json and the tokenizer files of
    `directory` (plus `asset_dirs`, searched in order for the tokenizer-side files).

    `hf_config` defaults to `directory/config.json`; `tokenizer` (a `tokenizers.Tokenizer`)
    resolves token texts to ids and is checked against the placeholders.
    """
    directory = Path(directory)
    dirs = [directory, *map(Path, asset_dirs)]
    cfg_path = directory / "config.json"
    config = dict(hf_config) if hf_config is not None else (_read_json(cfg_path) or {})
    text = config.get("text_config") or {}

    def found(name: str) -> tuple[Path | None, dict]:
        for d in dirs:
            obj = _read_json(d / name)
            if obj is not None:
                return d / name, obj
        return None, {}

    gen_path, gen = found("generation_config.json")
    tok_path, tok_cfg = found("tokenizer_config.json")

    def by_text(field: str) -> tuple[str, Any]:
        token = _token_text(tok_cfg.get(field))
        if token is None or tokenizer is None:
            return "", None
        i = tokenizer.token_to_id(token)
        if i is None:
            raise TokenIdError(f"{tok_path}: {field} {token!r} is not a token of the tokenizer")
        return f"{tok_path}: {field}", i

    def placeholder(text_token: str) -> tuple[str, Any]:
        if tokenizer is None or tokenizer.token_to_id(text_token) is None:
            return "", None
        return f"tokenizer {text_token!r}", tokenizer.token_to_id(text_token)

    def pick(field: str, fallback_text: str) -> tuple[str, Any]:
        return _first(
            [
                (f"{gen_path}: {field}", gen.get(field)),
                (f"{cfg_path}: text_config.{field}", text.get(field)),
                (f"{cfg_path}: {field}", config.get(field)),
                by_text(fallback_text),
            ]
        )

    image_src, image = _first(
        [
            (f"{cfg_path}: image_token_index", config.get("image_token_index")),
            (f"{cfg_path}: image_token_id", config.get("image_token_id")),
            placeholder(IMAGE_TEXT),
        ]
    )
    video_src, video = _first(
        [
            (f"{cfg_path}: video_token_index", config.get("video_token_index")),
            (f"{cfg_path}: video_token_id", config.get("video_token_id")),
            placeholder(VIDEO_TEXT),
        ]
    )
    eos_src, eos = pick("eos_token_id", "eos_token")
    pad_src, pad = pick("pad_token_id", "pad_token")
    bos_src, bos = pick("bos_token_id", "bos_token")
    if image is None:
        raise TokenIdError(
            f"{cfg_path}: no image_token_index / image_token_id, and no tokenizer with an "
            f"{IMAGE_TEXT!r} token to take it from"
        )
    if eos is None:
        raise TokenIdError(
            f"{directory}: no eos id (generation_config.json eos_token_id, config.json "
            "eos_token_id, or tokenizer_config.json eos_token): generation could not stop"
        )
    eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else (eos,)
    ids = TokenIds(
        pad=eos_ids[0] if pad is None else pad, eos=eos_ids, image=image, video=video, bos=bos
    )
    sources = {"pad": pad_src or eos_src, "image": image_src, "video": video_src}
    sources |= {"bos": bos_src, **{f"eos[{k}]": eos_src for k in range(len(eos_ids))}}
    for name, value in ids._named():
        if not isinstance(value, int) or isinstance(value, bool):
            raise TokenIdError(f"{sources[name]}: {name} = {value!r} is not an integer id")
        if vocab_size is not None and not 0 <= value < vocab_size:
            raise TokenIdError(
                f"{sources[name]}: {name} = {value} is outside the embedding table "
                f"(vocab_size {vocab_size})"
            )
    if tokenizer is not None:
        ids.check_tokenizer(tokenizer, str(tok_path or directory))
    return ids


def token_ids_from_tokenizer(
    tokenizer, *, pad: str, eos: Sequence[str], bos: str | None = None
) -> TokenIds:
    """TokenIds of a tokenizer we build ourselves (training from a preset): by token text."""

    def tid(text: str) -> int:
        i = tokenizer.token_to_id(text)
        if i is None:
            raise TokenIdError(f"tokenizer has no {text!r} token")
        return int(i)

    video = tokenizer.token_to_id(VIDEO_TEXT)
    return TokenIds(
        pad=tid(pad),
        eos=tuple(tid(e) for e in eos),
        image=tid(IMAGE_TEXT),
        video=None if video is None else int(video),
        bos=None if bos is None else tid(bos),
    )
