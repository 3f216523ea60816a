"""Conversation templates by name, tokenisation and loss masks (docs/reference.md 7).

Training renders LLaVA-NeXT's conversation formats (llava/conversation.py `conv_templates`,
masked as llava/train/train.py `preprocess_*` does) by name; inference renders the
checkpoint's own jinja when it has one (data_pipelines/chat_template.py).

  name              orig preprocess   one turn pair, `[...]` = trained in mode `assistant`
  qwen_1_5          preprocess_qwen   <|im_start|>user\\n{q}<|im_end|>\\n<|im_start|>assistant\\n
                                      [{a}<|im_end|>]\\n
  chatml_direct     preprocess_mpt    <|im_start|>user\\n{q}<|im_end|><|im_start|>assistant\\n
                                      [{a}<|im_end|>]            (no "\\n" between turns)
  vicuna_v1         preprocess_v1     <s>{system} USER: {q} ASSISTANT:[ {a}</s>]
                                      (the system prompt before the first round only)
  llava_llama_3     preprocess_llama3 <|begin_of_text|><|start_header_id|>user<|end_header_id|>
                                      \\n\\n{q}<|eot_id|><|start_header_id|>assistant
                                      <|end_header_id|>\\n\\n[{a}<|eot_id|>]   (q, a stripped)
  mistral_instruct  preprocess_llama_2 <s>[INST] {q} [/INST][ {a} </s>]
  plain             preprocess_plain  <image>[{caption}\\n]   (the user turn is dropped; <s>
                                      first when the tokenizer adds one)

Two steps, kept apart so that placeholder expansion can sit between them:

1. `tokenize_conversation(turns, tokenizer, options)` -> (ids int32[T], trained bool[T]).
   The rendered text is tokenised once (per placeholder-free chunk for CHUNKED_STYLES,
   as orig); a token is a label when its characters overlap a
   trained piece (so a content starting with "\\n" that merges with a header's "\\n" is
   trained). `trained` is *label aligned*, in the HF/orig sense: trained[j] says whether
   token j is a label (orig: labels[j] != -100), i.e. whether it is trained to be
   predicted from position j - 1. Placeholders are single ids here.
2. `next_token_targets(tokens, trained, visual_ids, pad_id)` after expansion ->
   targets[t] = tokens[t + 1], loss_mask[t] = trained[t + 1], last position (pad, 0).

Loss-mask modes:

* `assistant` (HF convention, TRL `assistant_only_loss`): the assistant content and the
  token closing its turn; never headers, separators after the stop token, system or user
  tokens. For vicuna_v1 / mistral_instruct / chatml_direct / plain this is exactly orig's
  mask (orig masks the instruction of each round and trains the rest).
* `llava_next` (orig, exactly): as `assistant`, except qwen_1_5 and llava_llama_3, whose
  orig trains whole assistant pieces (header and trailing "\\n" included) and then every
  occurrence of its `unmask` tokens anywhere (system and user turns included).

Every id comes from the tokenizer: the template's special texts (`<|im_start|>`, `</s>`,
...) must each be one token of it, or the template does not fit the tokenizer (ValueError).

Equal to orig, ids and labels (tests/data/test_llava_masks.py runs a line-by-line port of
preprocess_v1 / _llama_2 / _plain / _llama3 on multi-round conversations): the templates
orig tokenises with `tokenizer_image_token` (CHUNKED_STYLES) are tokenised chunk by chunk
between placeholders as it does (the same ids as one call, except for SentencePiece
vocabularies with a non-legacy prefix scheme, where every chunk starts a fresh "▁"); a
leading bos is the id the tokenizer's post-processor adds (plain: only if it adds one),
never the text "<s>"; the space after "ASSISTANT:" / "[/INST]" belongs to the answer
(orig's `instruction_len - 2` trains the token holding it, even a lone "▁").
One deliberate deviation: orig's per-round length bookkeeping masks the whole
conversation when its guess fails ("tokenization mismatch": e.g. the `not
tokenizer.legacy` -1 on a vocabulary it does not fit, or chatml_direct with a tokenizer
without bos); the character overlap above keeps the intended mask instead.

Visual tokens are never labels (orig: the spliced feature block gets -100). After the
shift that means: no target is a visual token, and a visual position is trained only
when the token after the run is a label - in practice the "\\n" after `<image>` in
qwen_1_5 `llava_next` mode (orig trains it, predicted from the last visual token).
"""

from __future__ import annotations

import dataclasses
import enum
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from data_pipelines.sample import BadSample, Reason

IMAGE_PLACEHOLDER = "<image>"
VIDEO_PLACEHOLDER = "<video>"
MASK_MODES = ("assistant", "llava_next")

# orig `preprocess_*` roles; "user"/"assistant"/"system" pass through.
ROLE_ALIASES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
}

# Piece kinds of a rendered conversation: which characters become labels. BOS: the
# leading begin-of-sequence that orig's `tokenizer(prompt)` adds (tokenize_conversation).
PROMPT, HEADER, ANSWER, TAIL, BOS = "prompt", "header", "answer", "tail", "bos"
# Styles whose orig preprocess tokenises with `tokenizer_image_token`: chunk by chunk
# between placeholders (llava/mm_utils.py), each chunk a fresh `tokenizer(chunk)` call.
CHUNKED_STYLES = ("two", "llama_2", "plain", "mpt")


@dataclasses.dataclass(frozen=True)
class ConvTemplate:
    """One LLaVA-NeXT conversation format.

    style: the renderer (conversation.py `SeparatorStyle`: chatml, mpt, two, llama_2,
    llama_3, plain); system: its default system prompt; specials: texts that must be one
    token each; unmask: `llava_next` labels wherever they occur (orig `unmask_tokens`);
    whole_turn: `llava_next` also trains the assistant header and tail.
    """

    name: str
    style: str
    system: str
    specials: tuple[str, ...]
    unmask: tuple[str, ...] = ()
    whole_turn: bool = False


TEMPLATES: dict[str, ConvTemplate] = {
    t.name: t
    for t in (
        ConvTemplate("qwen_1_5", "chatml", "You are a helpful assistant.",
                     ("<|im_start|>", "<|im_end|>"),
                     unmask=("\n", "<|im_start|>", "<|im_end|>"), whole_turn=True),
        ConvTemplate("chatml_direct", "mpt", "Answer the questions.",
                     ("<|im_start|>", "<|im_end|>")),
        ConvTemplate("vicuna_v1", "two",
                     "A chat between a curious user and an artificial intelligence assistant. "
                     "The assistant gives helpful, detailed, and polite answers to the user's "
                     "questions.",
                     ("<s>", "</s>")),
        # orig also lists "\n\n" in unmask, but looks it up with convert_tokens_to_ids, which
        # finds no such token in Llama-3's byte-level vocabulary ("ĊĊ"): never unmasked.
        ConvTemplate("llava_llama_3", "llama_3",
                     "You are a helpful language and vision assistant. You are able to "
                     "understand the visual content that the user provides, and assist the "
                     "user with a variety of tasks using natural language.",
                     ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                      "<|eot_id|>"),
                     unmask=("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                             "<|eot_id|>"), whole_turn=True),
        ConvTemplate("mistral_instruct", "llama_2", "", ("<s>", "</s>")),
        ConvTemplate("plain", "plain", "", ()),
    )
}  # fmt: skip
# Other names of the same formats (conversation.py `conv_templates`; `qwen` is ours).
ALIASES = {"qwen": "qwen_1_5", "qwen_2": "qwen_1_5", "v1": "vicuna_v1",
           "llava_mistral_instruct": "mistral_instruct"}  # fmt: skip


def get_template(name: str) -> ConvTemplate:
    t = TEMPLATES.get(ALIASES.get(name, name))
    if t is None:
        raise ValueError(f"conversation template {name!r} not in {sorted(TEMPLATES)}")
    return t


class _Default(enum.Enum):
    SYSTEM = "the template's system prompt"


TEMPLATE_SYSTEM = _Default.SYSTEM
# The same choice spelled as a config string (`data.system_prompt`, configs/common.py).
TEMPLATE_DEFAULT = "template_default"


@dataclasses.dataclass(frozen=True)
class ChatOptions:
    """template: a `TEMPLATES` name (or alias; stored as the canonical name);
    loss_mask: "assistant" | "llava_next"; system_prompt: the system turn, by default the
    template's own (`TEMPLATE_SYSTEM`, or the string `TEMPLATE_DEFAULT`; None or "": no
    system turn); move_image_to_front: orig `preprocess_multimodal` quirk (media records
    only)."""

    template: str = "qwen_1_5"
    loss_mask: str = "assistant"
    system_prompt: str | None | _Default = TEMPLATE_SYSTEM
    move_image_to_front: bool = True

    def __post_init__(self):
        t = get_template(self.template)
        object.__setattr__(self, "template", t.name)
        if self.loss_mask not in MASK_MODES:
            raise ValueError(f"loss_mask {self.loss_mask!r} not in {MASK_MODES}")
        default = self.system_prompt is TEMPLATE_SYSTEM or self.system_prompt == TEMPLATE_DEFAULT
        system = t.system if default else self.system_prompt
        object.__setattr__(self, "system_prompt", system or None)


# ---- conversations ---------------------------------------------------------------------


def normalize_turns(conversations: Any) -> list[tuple[str, str]]:
    """LLaVA `conversations` -> [(role, text)] with roles user/assistant/system.

    Accepts {from, value} and {role, content}. A leading turn that is not the user's is
    dropped (orig). Raises BadSample(MALFORMED_RECORD) for anything else.
    """
    if not isinstance(conversations, (list, tuple)) or not conversations:
        raise BadSample(Reason.MALFORMED_RECORD, "`conversations` must be a non-empty list")
    turns = []
    for k, turn in enumerate(conversations):
        if not isinstance(turn, dict):
            raise BadSample(Reason.MALFORMED_RECORD, f"turn {k} is a {type(turn).__name__}")
        role = turn.get("role", turn.get("from"))
        text = turn.get("content", turn.get("value"))
        if role not in ROLE_ALIASES:
            raise BadSample(Reason.MALFORMED_RECORD, f"turn {k} has unknown role {role!r}")
        if not isinstance(text, str):
            raise BadSample(
                Reason.MALFORMED_RECORD, f"turn {k} text is a {type(text).__name__}, not str"
            )
        turns.append((ROLE_ALIASES[role], text))
    if turns[0][0] != "user":
        turns = turns[1:]
    if not turns:
        raise BadSample(Reason.MALFORMED_RECORD, "no turns left after dropping the leading one")
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


def message_turns(messages: Sequence[Mapping[str, Any]]) -> list[tuple[str, str]]:
    """HF chat messages -> [(role, text)]: content items in order, an image as
    `<image>\\n`, a video as `<video>\\n` (LLaVA's placement), text as written."""
    turns = []
    for k, m in enumerate(messages):
        role, content = m.get("role"), m.get("content")
        if role not in ("system", "user", "assistant"):
            raise ValueError(f"message {k}: role {role!r} not system/user/assistant")
        if content is None or isinstance(content, str):
            turns.append((role, content or ""))
            continue
        parts = []
        for item in content:
            kind = item.get("type") if isinstance(item, Mapping) else None
            if kind == "text":
                parts.append(str(item.get("text", "")))
            elif kind in ("image", "video"):
                parts.append((IMAGE_PLACEHOLDER if kind == "image" else VIDEO_PLACEHOLDER) + "\n")
            else:
                raise ValueError(f"message {k}: content item {item!r} is not text/image/video")
        turns.append((role, "".join(parts)))
    return turns


# ---- rendering -------------------------------------------------------------------------

Pieces = list[tuple[str, str]]  # (text, kind): the rendered conversation in order


def _alternating(turns: Sequence[tuple[str, str]], t: ConvTemplate) -> None:
    for k, (role, _) in enumerate(turns):
        if role != ("user", "assistant")[k % 2]:
            raise BadSample(Reason.MALFORMED_RECORD,
                            f"template {t.name} needs user/assistant turns in turn, "
                            f"turn {k} is {role!r}")  # fmt: skip


def _render_chatml(turns, t: ConvTemplate, system: str | None, generation: bool) -> Pieces:
    # chatml: "\n" after every <|im_end|>; mpt (chatml_direct): turns back to back.
    nl = "\n" if t.style == "chatml" else ""
    if t.style == "mpt":
        _alternating(turns, t)
    out = [(f"<|im_start|>system\n{system}<|im_end|>{nl}", PROMPT)] if system else []
    for role, text in turns:
        if role == "assistant":
            out += [("<|im_start|>assistant\n", HEADER), (f"{text}<|im_end|>", ANSWER)]
            out += [(nl, TAIL)] if nl else []
        else:
            out.append((f"<|im_start|>{role}\n{text}<|im_end|>{nl}", PROMPT))
    if generation:
        out.append(("<|im_start|>assistant\n", PROMPT))
    return out


def _render_llama_3(turns, t: ConvTemplate, system: str | None, generation: bool) -> Pieces:
    # Llama-3-Instruct's own template (orig applies it per turn): content `| trim`med.
    def header(role):
        return f"<|start_header_id|>{role}<|end_header_id|>\n\n"

    out = [("<|begin_of_text|>", PROMPT)]
    if system:
        out.append((f"{header('system')}{system.strip()}<|eot_id|>", PROMPT))
    for role, text in turns:
        if role == "assistant":
            out += [(header(role), HEADER), (f"{text.strip()}<|eot_id|>", ANSWER)]
        else:
            out.append((f"{header(role)}{text.strip()}<|eot_id|>", PROMPT))
    if generation:
        out.append((header("assistant"), PROMPT))
    return out


def _render_two(turns, t: ConvTemplate, system: str | None, generation: bool) -> Pieces:
    # conversation.py SeparatorStyle.TWO, sep " ", sep2 "</s>"; <s> is the tokenizer's bos.
    _alternating(turns, t)
    out = [("<s>", BOS)] + ([(f"{system} ", PROMPT)] if system else [])
    for role, text in turns:
        if role == "user":
            out.append((f"USER: {text} ", PROMPT))
        else:  # the space after the cue is the answer's (orig's `instruction_len - 2`)
            out += [("ASSISTANT:", HEADER), (f" {text}</s>", ANSWER)]
    if generation:
        out.append(("ASSISTANT:", PROMPT))
    return out


def _render_llama_2(turns, t: ConvTemplate, system: str | None, generation: bool) -> Pieces:
    # conversation.py SeparatorStyle.LLAMA_2 with sep "" (mistral_instruct), sep2 "</s>".
    _alternating(turns, t)
    out = [("<s>", BOS)]
    for k, (role, text) in enumerate(turns):
        if role == "user":
            if k == 0 and system:
                text = f"<<SYS>>\n{system}\n<</SYS>>\n\n{text}"
            out.append((f"[INST] {text} [/INST]", PROMPT))
        else:  # as _render_two: the space after "[/INST]" is the answer's
            out.append((f" {text} </s>", ANSWER))
    return out  # the generation prompt ends with "[/INST]"


def _render_plain(turns, t: ConvTemplate, system: str | None, generation: bool) -> Pieces:
    # orig preprocess_plain: the user turn is replaced by its placeholder; sep "\n".
    if generation:
        if len(turns) != 1 or turns[0][0] != "user":
            raise ValueError("plain template: a generation prompt is one user turn")
        return [("", BOS), (turns[0][1] + "\n", PROMPT)]  # conversation.py get_prompt
    if len(turns) != 2 or turns[0][0] != "user" or turns[1][0] != "assistant":
        raise BadSample(Reason.MALFORMED_RECORD,
                        "plain template needs one user + one assistant turn")  # fmt: skip
    first = turns[0][1]
    if IMAGE_PLACEHOLDER not in first and VIDEO_PLACEHOLDER not in first:
        raise BadSample(Reason.PLACEHOLDER_MISMATCH, "plain template: user turn has no <image>")
    placeholder = VIDEO_PLACEHOLDER if VIDEO_PLACEHOLDER in first else IMAGE_PLACEHOLDER
    return [("", BOS), (placeholder, PROMPT), (turns[1][1] + "\n", ANSWER)]


_RENDER = {"chatml": _render_chatml, "mpt": _render_chatml, "two": _render_two,
           "llama_2": _render_llama_2, "llama_3": _render_llama_3,
           "plain": _render_plain}  # fmt: skip


def render_pieces(
    turns: Sequence[tuple[str, str]], template: str, system: str | None, *, generation: bool
) -> Pieces:
    """The conversation as (text, kind) pieces; `generation` appends the assistant cue."""
    t = get_template(template)
    return _RENDER[t.style](list(turns), t, system, generation)


def render_generation_prompt(turns: Sequence[tuple[str, str]], template: str) -> str:
    """The prompt text of `turns` (a leading system turn replaces the template's system
    prompt; the last turn is the user's) followed by the assistant cue."""
    turns = list(turns)
    system = get_template(template).system
    if turns and turns[0][0] == "system":
        system, turns = turns[0][1], turns[1:]
    if not turns or turns[-1][0] != "user":
        raise ValueError("a generation prompt needs a conversation ending with a user turn")
    try:
        pieces = render_pieces(turns, template, system, generation=True)
    except BadSample as err:  # a caller's conversation, not a training record
        raise ValueError(str(err)) from err
    return "".join(text for text, _ in pieces)


# ---- tokenisation ----------------------------------------------------------------------


def encode(tokenizer, text: str) -> list[int]:
    """Ids of `text`, special tokens in the text parsed, nothing added (orig/HF)."""
    return list(tokenizer.encode(text, add_special_tokens=False).ids)


def added_prefix(tokenizer) -> list[int]:
    """The ids `tokenizer(text)` puts before the text (its post-processor's, e.g. a
    Llama-style `<s>`; none for Qwen-2): what orig's `tokenizer_image_token` keeps."""
    ids = encode(tokenizer, "a")
    full = list(tokenizer.encode("a", add_special_tokens=True).ids)
    k = next((k for k in range(len(full) - len(ids) + 1) if full[k : k + len(ids)] == ids), 0)
    return full[:k]


def single_token_id(tokenizer, text: str, template: str = "") -> int:
    """The id `text` encodes to; ValueError unless it is exactly one token."""
    ids = encode(tokenizer, text)
    if len(ids) != 1:
        where = f"template {template}: " if template else ""
        raise ValueError(f"{where}{text!r} is not one token of this tokenizer (got {ids})")
    return ids[0]


def tokenize_conversation(
    turns: Sequence[tuple[str, str]], tokenizer, options: ChatOptions = ChatOptions()
) -> tuple[np.ndarray, np.ndarray]:
    """Render + tokenise. Returns (ids int32[T], trained bool[T], label aligned)."""
    t = get_template(options.template)
    for text in t.specials:
        single_token_id(tokenizer, text, t.name)
    pieces = render_pieces(turns, t.name, options.system_prompt, generation=False)
    # A leading BOS piece is ids, never text (a Llama-style tokenizer with a "first"
    # prefix scheme tokenises the text after a literal "<s>" differently): the ones the
    # tokenizer's post-processor adds, as orig; else the piece's own token ("" = none).
    prefix = []
    if pieces and pieces[0][1] == BOS:
        bos = pieces.pop(0)[0]
        prefix = added_prefix(tokenizer)
        if not prefix and bos:
            prefix = [single_token_id(tokenizer, bos, t.name)]
    whole = options.loss_mask == "llava_next" and t.whole_turn
    labelled = (ANSWER, HEADER, TAIL) if whole else (ANSWER,)
    # chars[c] = 1 where character c belongs to a trained piece; a token is a label when
    # its characters overlap one (counted with a prefix sum over its offsets).
    chars = np.repeat([kind in labelled for _, kind in pieces], [len(x) for x, _ in pieces])
    ids, offsets = _encode_with_offsets(
        tokenizer, "".join(text for text, _ in pieces), t.style in CHUNKED_STYLES
    )
    cum = np.concatenate([[0], np.cumsum(chars, dtype=np.int64)])
    trained = cum[offsets[:, 1]] > cum[offsets[:, 0]]
    if options.loss_mask == "llava_next" and t.unmask:
        trained |= np.isin(ids, [single_token_id(tokenizer, u, t.name) for u in t.unmask])
    ids = np.concatenate([np.asarray(prefix, np.int32), ids])
    return ids, np.concatenate([np.zeros(len(prefix), bool), trained])


_PLACEHOLDERS = re.compile(f"({re.escape(IMAGE_PLACEHOLDER)}|{re.escape(VIDEO_PLACEHOLDER)})")


def _encode_with_offsets(tokenizer, text: str, chunked: bool) -> tuple[np.ndarray, np.ndarray]:
    """(ids int32[T], character offsets int64[T, 2]) of `text`; `chunked`: one encode call
    per stretch between placeholders, each placeholder its own id (orig
    `tokenizer_image_token`; the same ids as one call unless the tokenizer prefixes a
    space per call)."""
    spans = [text]
    if chunked:
        spans = [x for x in _PLACEHOLDERS.split(text) if x]
    ids, offsets, start = [], [], 0
    for span in spans:
        if chunked and _PLACEHOLDERS.fullmatch(span):
            ids.append(single_token_id(tokenizer, span))
            offsets.append((start, start + len(span)))
        else:
            enc = tokenizer.encode(span, add_special_tokens=False)
            ids += enc.ids
            offsets += [(start + a, start + b) for a, b in enc.offsets]
        start += len(span)
    return np.asarray(ids, np.int32), np.asarray(offsets, np.int64).reshape(-1, 2)


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
