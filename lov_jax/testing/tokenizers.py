"""Tokenizers for tiny test checkpoints: the real Qwen-2 one and small ones unlike it.

A checkpoint's special ids and template are its own (lov_jax/token_ids.py), so tests
must run on vocabularies other than Qwen's: `small_bpe` trains a byte-level BPE of any
size on a fixed corpus and registers its special tokens at the ids asked for (pad,
eos, bos and the placeholders anywhere in the table, not after the BPE ranks), with
a Llama/Vicuna-like `<s>` / `</s>` / `<unk>` or a ChatML set. `save_tokenizer` writes
the files `transformers.AutoTokenizer` loads offline.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping
from pathlib import Path

import tokenizers
from tokenizers import AddedToken, decoders, models, pre_tokenizers, trainers

from lov_jax.token_ids import IMAGE_TEXT, VIDEO_TEXT, TokenIds, token_ids_from_tokenizer


@dataclasses.dataclass(frozen=True)
class TokenizerSpec:
    """A tokenizer plus the texts of its special tokens, its chat template and the
    embedding-table size a model for it gets (>= the largest id + 1)."""

    tokenizer: tokenizers.Tokenizer
    vocab_size: int
    eos: tuple[str, ...]
    pad: str
    bos: str | None
    chat_template: str | None
    # writes the tokenizer files itself (Qwen-2: llava-hf's Qwen2TokenizerFast config)
    writer: Callable[[Path], list[Path]] | None = None

    @property
    def token_ids(self) -> TokenIds:
        return token_ids_from_tokenizer(self.tokenizer, pad=self.pad, eos=self.eos, bos=self.bos)


def qwen2() -> TokenizerSpec:
    """The offline Qwen-2 tokenizer with llava-hf OneVision's specials and template."""
    from data_pipelines import tokenizer as qwen
    from lov_jax.config import tiny

    tok = qwen.build_qwen2_tokenizer()
    return TokenizerSpec(
        tok, tiny().text.vocab_size, (qwen.IM_END,), qwen.ENDOFTEXT, None, qwen.CHAT_TEMPLATE,
        writer=lambda out: qwen.save_hf_tokenizer_files(out, tok),
    )  # fmt: skip


def qwen2_token_ids() -> TokenIds:
    from data_pipelines.tokenizer import build_qwen2_tokenizer, qwen2_token_ids

    return qwen2_token_ids(build_qwen2_tokenizer())


_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "What is shown in this image? Describe the colours and the shapes.",
    "A red circle sits left of a blue square; two green triangles are below.",
    "Compare the first picture with the second one and answer yes or no.",
    "USER: ASSISTANT: system user assistant Answer the question briefly.",
    "0123456789 +-*/=()[]{}<>.,;:!? \n\t",
]

# A Vicuna-style template (llava-hf llava-1.5 / llava-v1.6-vicuna `chat_template`).
VICUNA_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}"
    "{{ message['role'].upper() + ': '}}{% endif %}"
    "{# Render all images first #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}"
    "{# Render all text next #}"
    "{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' '}}{% endfor %}"
    "{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

# Mistral-instruct style (llava-hf llava-v1.6-mistral-7b `chat_template` layout):
# "[INST] <image>\n{q} [/INST]", assistant turns " {a}</s>".
MISTRAL_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}{{ '[INST] ' }}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] }}{% endfor %}{{ ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ ' ' + content['text'] + '</s>' }}{% endgeneration %}{% endfor %}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}"
    "{% endif %}{% endfor %}"
)

# Llama-3 style (llava-hf llama3-llava-next-8b `chat_template` layout): header tokens,
# images first in a turn, each turn ended by <|eot_id|>.
LLAMA3_TEMPLATE = (
    "{% for message in messages %}{% if loop.index0 == 0 %}{{ '<|begin_of_text|>' }}{% endif %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% if message['role'] == 'assistant' %}{% generation %}"
    "{{ content['text'] | trim + '<|eot_id|>' }}{% endgeneration %}"
    "{% else %}{{ content['text'] | trim + '<|eot_id|>' }}{% endif %}{% endfor %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}"
)


def small_bpe(
    vocab_size: int = 700,
    *,
    specials: Mapping[str, int] | None = None,
    style: str = "vicuna",
) -> TokenizerSpec:
    """A byte-level BPE of about `vocab_size` entries with specials at chosen ids.

    style "vicuna": `<unk>` pad, `<s>` bos, `</s>` eos, Vicuna template.
    style "mistral": the same specials, the Mistral-instruct `[INST]` template.
    style "llama3": `<pad>` pad, `<|begin_of_text|>` bos, `<|eot_id|>` and
    `<|end_of_text|>` eos, header tokens, the Llama-3 template.
    style "chatml": `<|pad|>` pad, `<|im_end|>` and `<|endoftext|>` eos, no bos, the
    llava-hf OneVision ChatML template (so a OneVision model runs on it).
    `specials` maps token text -> id; ids not given go to the end of the table.
    """
    llama = {"pad": "<unk>", "bos": "<s>", "eos": ("</s>",), "extra": ()}
    if style in ("vicuna", "mistral"):
        names = llama
        template = VICUNA_TEMPLATE if style == "vicuna" else MISTRAL_TEMPLATE
    elif style == "llama3":
        names = {"pad": "<pad>", "bos": "<|begin_of_text|>",
                 "eos": ("<|eot_id|>", "<|end_of_text|>"),
                 "extra": ("<|start_header_id|>", "<|end_header_id|>")}  # fmt: skip
        template = LLAMA3_TEMPLATE
    elif style == "chatml":
        from data_pipelines.tokenizer import CHAT_TEMPLATE

        names = {"pad": "<|pad|>", "bos": None, "eos": ("<|im_end|>", "<|endoftext|>"),
                 "extra": ("<|im_start|>",)}  # fmt: skip
        template = CHAT_TEMPLATE
    else:
        raise ValueError(f"style {style!r} not in ('vicuna', 'mistral', 'llama3', 'chatml')")
    texts = [names["pad"], *names["eos"], IMAGE_TEXT, VIDEO_TEXT]
    texts += [names["bos"]] if names["bos"] else []
    texts += list(names["extra"])
    wanted = dict(specials or {})
    unknown = set(wanted) - set(texts)
    if unknown:
        raise ValueError(f"specials {sorted(unknown)} are not tokens of style {style!r}")
    num_plain = vocab_size - len(texts)
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=num_plain, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )  # fmt: skip
    tok.train_from_iterator(_CORPUS * 4, trainer)
    # Re-home the BPE so the specials can sit at the ids asked for: a vocab with gaps.
    vocab = tok.get_vocab()
    merges = json.loads(tok.to_str())["model"]["merges"]
    free = [i for i in range(vocab_size) if i not in set(wanted.values())]
    plain = sorted(vocab, key=vocab.get)
    placed = {t: free[k] for k, t in enumerate(plain)}
    rest = iter(free[len(plain) :])
    for t in (t for t in texts if t not in wanted):
        wanted[t] = next(rest, None)
        if wanted[t] is None:
            raise ValueError(f"vocab_size {vocab_size} leaves no id for {t!r}")
    full = {**placed, **wanted}
    if len(set(full.values())) != len(full) or max(full.values()) >= vocab_size:
        raise ValueError(f"cannot place {len(full)} tokens in a vocab of {vocab_size}")
    data = json.loads(tok.to_str())
    data["model"]["vocab"] = full
    data["model"]["merges"] = merges
    data["added_tokens"] = [
        {"id": wanted[t], "content": t, "single_word": False, "lstrip": False,
         "rstrip": False, "normalized": False, "special": True}
        for t in texts
    ]  # fmt: skip
    out = tokenizers.Tokenizer.from_str(json.dumps(data))
    for t in texts:
        out.add_special_tokens([AddedToken(t, special=True, normalized=False)])
        if out.token_to_id(t) != wanted[t]:
            raise AssertionError(f"{t} landed on {out.token_to_id(t)}, want {wanted[t]}")
    return TokenizerSpec(out, vocab_size, names["eos"], names["pad"], names["bos"], template)


def save_tokenizer(spec: TokenizerSpec, out_dir: str | Path) -> list[Path]:
    """tokenizer.json, tokenizer_config.json and chat_template.jinja for AutoTokenizer."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if spec.writer is not None:
        return spec.writer(out)
    spec.tokenizer.save(str(out / "tokenizer.json"))
    specials = [t for t, _ in sorted(_added(spec.tokenizer).items(), key=lambda kv: kv[1])]
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "added_tokens_decoder": {
            str(i): {
                "content": t,
                "lstrip": False,
                "normalized": False,
                "rstrip": False,
                "single_word": False,
                "special": True,
            }
            for t, i in _added(spec.tokenizer).items()
        },  # fmt: skip
        "eos_token": spec.eos[0],
        "pad_token": spec.pad,
        "bos_token": spec.bos,
        "additional_special_tokens": [t for t in specials if t not in (spec.pad, spec.bos)],
        "extra_special_tokens": {"image_token": IMAGE_TEXT, "video_token": VIDEO_TEXT},
        "clean_up_tokenization_spaces": False,
        "model_max_length": 32768,
        "add_bos_token": False,
    }
    paths = [out / "tokenizer.json", out / "tokenizer_config.json"]
    paths[1].write_text(json.dumps(config, indent=2) + "\n")
    if spec.chat_template is not None:
        (out / "chat_template.jinja").write_text(spec.chat_template)
        paths.append(out / "chat_template.jinja")
    return paths


def _added(tok: tokenizers.Tokenizer) -> dict[str, int]:
    return {t.content: i for i, t in tok.get_added_tokens_decoder().items()}
