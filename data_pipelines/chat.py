"""Chat templating, tokenisation and loss masks (REFERENCE.md 7).

Two steps, kept apart so that placeholder expansion can sit between them:

1. `tokenize_conversation(turns, tokenizer, options)` -> (ids int32[T], trained bool[T]).
   `trained` is *label aligned*, in the HF/orig sense: trained[j] says whether token j
   is a label (orig: labels[j] != -100), i.e. whether it is trained to be predicted
   from position j - 1. Placeholders are single ids (151646 `<image>`, 151647
   `<video>`) here.
2. `next_token_targets(tokens, trained, visual_ids, pad_id)` after expansion ->
   targets[t] = tokens[t + 1], loss_mask[t] = trained[t + 1], last position (pad, 0).

Loss-mask modes of the `qwen` (ChatML) template, per turn piece
`<|im_start|>{role}\\n{content}<|im_end|>\\n`:

* `assistant` (HF convention, TRL `assistant_only_loss`): labels are the assistant
  content tokens and the closing `<|im_end|>`; never the `<|im_start|>assistant\\n`
  header, the "\\n" after `<|im_end|>`, system or user tokens. (llava-hf's template
  wraps only the content in `{% generation %}`; we add `<|im_end|>` so the model learns
  to stop.) Predicting the first content token from the header's "\\n" is trained;
  predicting the next `<|im_start|>` after an assistant turn is not.
* `llava_next` (orig `preprocess_qwen`, exactly): labels are whole assistant pieces
  (header, content, `<|im_end|>`, trailing "\\n"); then every token equal to 198 ("\\n"),
  `<|im_start|>` or `<|im_end|>` anywhere (system and user turns included) is a label.

`plain` (stage 1, orig `preprocess_plain`): `<image>` + caption + "\\n"; every token
but the placeholder is a label. The mask mode is ignored.

Visual tokens are never labels (orig: the spliced feature block gets -100). After the
shift that means: no target is a visual token, and a visual position is trained only
when the token after the run is a label - in practice the "\\n" after `<image>` in
`llava_next` mode (orig trains it, predicted from the last visual token); in
`assistant` mode only if a placeholder sits inside an assistant turn.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from data_pipelines.sample import SkipSample

IMAGE_PLACEHOLDER = "<image>"
VIDEO_PLACEHOLDER = "<video>"
IM_START, IM_END, ENDOFTEXT = "<|im_start|>", "<|im_end|>", "<|endoftext|>"
NEWLINE_ID = 198  # "\n" alone in the Qwen2 vocabulary
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."
TEMPLATES = ("qwen", "plain")
MASK_MODES = ("assistant", "llava_next")

# orig `preprocess_qwen` roles; "user"/"assistant"/"system" pass through.
ROLE_ALIASES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
}


@dataclasses.dataclass(frozen=True)
class ChatOptions:
    """template: "qwen" | "plain"; loss_mask: "assistant" | "llava_next";
    system_prompt: the system turn of "qwen" (None: no system turn);
    move_image_to_front: orig `preprocess_multimodal` quirk (media records only)."""

    template: str = "qwen"
    loss_mask: str = "assistant"
    system_prompt: str | None = DEFAULT_SYSTEM_PROMPT
    move_image_to_front: bool = True

    def __post_init__(self):
        if self.template not in TEMPLATES:
            raise ValueError(f"template {self.template!r} not in {TEMPLATES}")
        if self.loss_mask not in MASK_MODES:
            raise ValueError(f"loss_mask {self.loss_mask!r} not in {MASK_MODES}")


# ---- conversations ---------------------------------------------------------------------


def normalize_turns(conversations: Any) -> list[tuple[str, str]]:
    """LLaVA `conversations` -> [(role, text)] with roles user/assistant/system.

    Accepts {from, value} and {role, content}. A leading turn that is not the user's is
    dropped (orig). Raises SkipSample('malformed_record') for anything else.
    """
    if not isinstance(conversations, (list, tuple)) or not conversations:
        raise SkipSample("malformed_record", "`conversations` must be a non-empty list")
    turns = []
    for k, turn in enumerate(conversations):
        if not isinstance(turn, dict):
            raise SkipSample("malformed_record", f"turn {k} is a {type(turn).__name__}")
        role = turn.get("role", turn.get("from"))
        text = turn.get("content", turn.get("value"))
        if role not in ROLE_ALIASES:
            raise SkipSample("malformed_record", f"turn {k} has unknown role {role!r}")
        if not isinstance(text, str):
            raise SkipSample(
                "malformed_record", f"turn {k} text is a {type(text).__name__}, not str"
            )
        turns.append((ROLE_ALIASES[role], text))
    if turns[0][0] != "user":
        turns = turns[1:]
    if not turns:
        raise SkipSample("malformed_record", "no turns left after dropping the leading one")
    return turns


def move_image_to_front(text: str) -> str:
    """Orig `preprocess_multimodal`: a turn with exactly one `<image>`, not at the start,
    becomes `<image>\\n` + the rest stripped. (Also strips its noisy-caption tag.)"""
    if text.count(IMAGE_PLACEHOLDER) == 1 and not text.startswith(IMAGE_PLACEHOLDER):
        text = IMAGE_PLACEHOLDER + "\n" + text.replace(IMAGE_PLACEHOLDER, "").strip()
        text = text.strip()
    # orig: "For videoInstruct-100k noisy_data"
    return text.replace("QA_GT_caption_based_noisy", "")


def count_placeholders(turns: Sequence[tuple[str, str]]) -> tuple[int, int]:
    """(number of `<image>`, number of `<video>`) over all turns."""
    return (
        sum(t.count(IMAGE_PLACEHOLDER) for _, t in turns),
        sum(t.count(VIDEO_PLACEHOLDER) for _, t in turns),
    )


def image_to_video_placeholder(turns: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Video records use `<image>` in the human turn (orig); we need `<video>`."""
    return [(r, t.replace(IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER)) for r, t in turns]


# ---- tokenisation ----------------------------------------------------------------------


def encode(tokenizer, text: str) -> list[int]:
    """Ids of `text`, special tokens in the text parsed, nothing added (orig/HF)."""
    return list(tokenizer.encode(text, add_special_tokens=False).ids)


def _token_id(tokenizer, token: str) -> int:
    i = tokenizer.token_to_id(token)
    if i is None:
        raise ValueError(f"tokenizer has no {token!r} token")
    return int(i)


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def tokenize_conversation(
    turns: Sequence[tuple[str, str]], tokenizer, options: ChatOptions = ChatOptions()
) -> tuple[np.ndarray, np.ndarray]:
    """Render + tokenise. Returns (ids int32[T], trained bool[T], label aligned)."""
    if options.template == "plain":
        return _tokenize_plain(turns, tokenizer)
    pieces = []
    if options.system_prompt is not None:
        pieces.append(("system", options.system_prompt))
    pieces += list(turns)
    ids: list[int] = []
    trained: list[bool] = []
    for role, content in pieces:
        # Each piece is tokenised on its own, as orig (`apply_chat_template` per turn).
        piece = encode(tokenizer, f"{IM_START}{role}\n{content}{IM_END}\n")
        if role != "assistant":
            mask = [False] * len(piece)
        elif options.loss_mask == "llava_next":
            mask = [True] * len(piece)
        else:
            # content = between the header and the closing [<|im_end|>, "\n"]; a content
            # starting with whitespace may merge with the header's "\n" (then trained).
            header = encode(tokenizer, f"{IM_START}{role}\n")
            start = _common_prefix(piece, header)
            mask = [start <= j < len(piece) - 1 for j in range(len(piece))]
        ids += piece
        trained += mask
    trained_arr = np.asarray(trained, bool)
    ids_arr = np.asarray(ids, np.int32)
    if options.loss_mask == "llava_next":
        unmask = [NEWLINE_ID, _token_id(tokenizer, IM_START), _token_id(tokenizer, IM_END)]
        trained_arr |= np.isin(ids_arr, unmask)
    return ids_arr, trained_arr


def _tokenize_plain(turns, tokenizer) -> tuple[np.ndarray, np.ndarray]:
    """Orig `preprocess_plain`: 2 turns; the human turn is replaced by its placeholder."""
    if len(turns) != 2 or turns[0][0] != "user" or turns[1][0] != "assistant":
        raise SkipSample("malformed_record", "plain template needs one user + one assistant turn")
    first = turns[0][1]
    has_video = VIDEO_PLACEHOLDER in first
    if IMAGE_PLACEHOLDER not in first and not has_video:
        raise SkipSample("placeholder_mismatch", "plain template: user turn has no <image>")
    placeholder = VIDEO_PLACEHOLDER if has_video else IMAGE_PLACEHOLDER
    # orig tokenises around the placeholder (`tokenizer_image_token`); with <image> a
    # special token, one call over the whole string gives the same ids.
    ids = np.asarray(encode(tokenizer, placeholder + turns[1][1] + "\n"), np.int32)
    trained = np.ones(len(ids), bool)
    trained[0] = False
    return ids, trained


# ---- expansion and targets -------------------------------------------------------------


def expand_trained(
    ids: np.ndarray, trained: np.ndarray, counts: Sequence[int], visual_ids: Sequence[int]
) -> np.ndarray:
    """Repeat the label flags like `prompt.expand_placeholders` repeats the ids: the
    i-th placeholder becomes counts[i] positions, none of them a label."""
    is_visual = np.isin(ids, visual_ids)
    if int(is_visual.sum()) != len(counts):
        raise ValueError(f"{int(is_visual.sum())} placeholders but {len(counts)} counts")
    repeats = np.ones(len(ids), np.int64)
    repeats[is_visual] = counts
    out = np.repeat(trained & ~is_visual, repeats)
    return out


def next_token_targets(
    tokens: np.ndarray, trained: np.ndarray, visual_ids: Sequence[int], pad_id: int
) -> tuple[np.ndarray, np.ndarray]:
    """(targets int32[T], loss_mask float32[T]) from expanded tokens and label flags."""
    tokens = np.asarray(tokens, np.int32)
    targets = np.append(tokens[1:], np.int32(pad_id)).astype(np.int32)
    mask = np.append(np.asarray(trained[1:], bool), False)
    mask &= ~np.isin(targets, visual_ids)
    return targets, mask.astype(np.float32)


def word_count(turns: Sequence[tuple[str, str]]) -> int:
    """Orig `modality_lengths` text length: whitespace-split words over all turns."""
    return sum(len(t.split()) for _, t in turns)
