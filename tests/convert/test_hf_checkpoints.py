"""The shared tiny-HF-checkpoint builder (lov_jax/testing/hf_checkpoints.py): every keyword
lands in the saved checkpoint, ids come from the tokenizer or the arguments."""

from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors.numpy import load_file

from lov_jax.testing import tokenizers as test_tokenizers
from lov_jax.testing.hf_checkpoints import chat_frame, make_tiny_hf, text_sample


def _read(d):
    config = json.loads((d / "config.json").read_text())
    generation = json.loads((d / "generation_config.json").read_text())
    return config, generation, load_file(str(d / "model.safetensors"))


def _key(weights, suffix):
    (k,) = [k for k in weights if k.endswith(suffix)]
    return weights[k]


@pytest.fixture(scope="module")
def qwen_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    small = {"hidden_size": 32, "intermediate_size": 64, "num_layers": 1, "num_heads": 4,
             "num_kv_heads": 1, "vision": {"num_layers": 1, "hidden_size": 16, "num_heads": 2,
                                           "intermediate_size": 32}}  # fmt: skip
    return {
        "default": make_tiny_hf(root / "default"),
        "small": make_tiny_hf(root / "small", tie_word_embeddings=False, seed=5, **small),
        "small_again": make_tiny_hf(root / "again", tie_word_embeddings=False, seed=5, **small),
        "small_seed6": make_tiny_hf(root / "seed6", tie_word_embeddings=False, seed=6, **small),
    }


def test_defaults_are_llava_hf_onevision_ids_from_the_qwen_tokenizer(qwen_dirs):
    config, generation, weights = _read(qwen_dirs["default"])
    ids = test_tokenizers.qwen2_token_ids()
    assert (config["image_token_index"], config["video_token_index"]) == (ids.image, ids.video)
    assert generation["eos_token_id"] == list(ids.eos)
    assert generation["pad_token_id"] == ids.pad
    text = config["text_config"]
    assert (text["hidden_size"], text["num_hidden_layers"]) == (48, 2)
    assert (text["num_attention_heads"], text["num_key_value_heads"]) == (6, 2)
    assert config["tie_word_embeddings"] and not any("lm_head" in k for k in weights)
    for name in ("tokenizer.json", "tokenizer_config.json", "preprocessor_config.json",
                 "processor_config.json"):  # fmt: skip
        assert (qwen_dirs["default"] / name).is_file(), name


def test_size_tie_gqa_and_seed_keywords(qwen_dirs):
    config, _, weights = _read(qwen_dirs["small"])
    text, vision = config["text_config"], config["vision_config"]
    assert (text["hidden_size"], text["intermediate_size"], text["num_hidden_layers"]) == (
        32, 64, 1,
    )  # fmt: skip
    assert (text["num_attention_heads"], text["num_key_value_heads"]) == (4, 1)
    assert (vision["hidden_size"], vision["num_hidden_layers"], vision["num_attention_heads"]) == (
        16, 1, 2,
    )  # fmt: skip
    assert _key(weights, "model.layers.0.self_attn.k_proj.weight").shape == (
        8,
        32,
    )  # 1 kv head x 8
    assert _key(weights, "lm_head.weight").shape == (text["vocab_size"], 32)  # untied
    again = _read(qwen_dirs["small_again"])[2]
    other = _read(qwen_dirs["small_seed6"])[2]
    for k, v in weights.items():
        np.testing.assert_array_equal(v, again[k])
    assert any(not np.array_equal(v, other[k]) for k, v in weights.items())


def test_placeholder_ids_and_vocab_from_arguments(tmp_path):
    d = make_tiny_hf(tmp_path, num_layers=1, vocab_size=160000, image_token_id=159000,
                     video_token_id=159001)  # fmt: skip
    config, _, weights = _read(d)
    assert (config["image_token_index"], config["video_token_index"]) == (159000, 159001)
    assert config["text_config"]["vocab_size"] == 160000
    assert _key(weights, "embed_tokens.weight").shape == (160000, 48)


def test_a_non_qwen_tokenizer_sets_the_vocab_and_every_special_id(tmp_path):
    spec = test_tokenizers.small_bpe(600, specials={"<image>": 3, "</s>": 599}, style="vicuna")
    d = make_tiny_hf(tmp_path, tokenizer=spec, num_layers=1)
    config, generation, weights = _read(d)
    ids = spec.token_ids
    assert (ids.image, ids.eos) == (3, (599,))
    assert config["image_token_index"] == 3 and config["text_config"]["vocab_size"] == 600
    assert generation["eos_token_id"] == [599] and generation["pad_token_id"] == ids.pad
    assert _key(weights, "embed_tokens.weight").shape[0] == 600


def test_chat_frame_is_the_qwen_chatml_user_turn():
    from data_pipelines.tokenizer import build_qwen2_tokenizer

    tok = build_qwen2_tokenizer()
    head, tail = chat_frame()
    assert tok.decode(list(head), skip_special_tokens=False) == "<|im_start|>user\n"
    assert tok.decode(list(tail), skip_special_tokens=False).endswith(
        "<|im_end|>\n<|im_start|>assistant\n"
    )
    tokens = text_sample().tokens.tolist()
    assert tokens[: len(head)] == list(head) and tokens[-len(tail) :] == list(tail)


def test_a_small_vocab_gets_a_tokenizer_whose_ids_fit(tmp_path):
    """Round-trip tests use vocab 1024: Qwen-2's ids would lie outside the table."""
    from lov_jax.convert.safetensors_io import load_hf_checkpoint

    d = make_tiny_hf(tmp_path, vocab_size=1024, num_layers=1)
    config, generation, _ = _read(d)
    assert config["text_config"]["vocab_size"] == 1024
    ids = [config["image_token_index"], config["video_token_index"], generation["pad_token_id"]]
    assert max(ids + generation["eos_token_id"]) < 1024
    cfg, _ = load_hf_checkpoint(d)
    assert cfg.ids.image == config["image_token_index"] and cfg.text.vocab_size == 1024
