"""The model-family registry: kinds from config, unknown kinds, HF config round trip,
the `linear` projector, and the LLM's one call with and without a KV cache."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lov_jax import config
from lov_jax.convert.hf_keys import flatten, hf_entries
from lov_jax.convert.key_tables import Transform
from lov_jax.models import families
from lov_jax.models.decoder import Decoder
from lov_jax.models.kv_cache import KVCache
from lov_jax.models.llava_onevision import abstract_params


def test_unknown_kinds_name_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown vision tower kind 'eva'; known: \['clip', 'sig"):
        families.vision("eva")
    with pytest.raises(ValueError, match=r"known: \['linear', 'mlp2x_gelu'\]"):
        families.projector("mlp3x_gelu")
    with pytest.raises(ValueError, match=r"unknown LLM kind 'gemma'"):
        families.llm("gemma")
    bad = config.tiny().replace(vision=dataclasses.replace(config.tiny().vision, kind="eva"))
    with pytest.raises(ValueError, match="unknown vision tower kind 'eva'"):
        abstract_params(bad)
    hf = _hf_dict(config.tiny())
    with pytest.raises(ValueError, match="unknown LLM model_type 'gemma'"):
        families.config_parts_from_hf(
            {**hf, "text_config": {**hf["text_config"], "model_type": "gemma"}}
        )


def _hf_dict(cfg: config.ModelConfig) -> dict:
    return families.config_parts_to_hf(cfg.vision, cfg.text, cfg.projector)


@pytest.mark.parametrize("name", ["tiny", "ov_7b"])
def test_registry_config_round_trip(name):
    cfg = config.preset(name)
    hf = _hf_dict(cfg)
    assert hf["vision_config"]["model_type"] == "siglip_vision_model"
    assert hf["text_config"]["model_type"] == "qwen2"
    assert families.config_parts_from_hf(hf) == (cfg.vision, cfg.text, cfg.projector)
    lmms = {**hf, "mm_projector_type": "linear"}  # LLaVA-NeXT's config key picks the kind
    assert families.config_parts_from_hf(lmms)[2] == "linear"
    with pytest.raises(ValueError, match="no single-Linear projector"):
        families.config_parts_to_hf(cfg.vision, cfg.text, "linear")


def test_linear_projector_equals_torch_linear():
    import torch

    cfg = config.tiny(projector="linear")
    d, h = cfg.vision.hidden_size, cfg.text.hidden_size
    params = flatten(abstract_params(cfg, boxed=False))
    assert params["multi_modal_projector/linear_1/kernel"].shape == (d, h)
    assert not any(p.startswith("multi_modal_projector/linear_2") for p in params)
    names = {n for n, p, _, _ in hf_entries(cfg) if p.startswith("multi_modal_projector")}
    assert names == {"multi_modal_projector.linear_1.weight", "multi_modal_projector.linear_1.bias"}

    torch.manual_seed(0)
    ref = torch.nn.Linear(d, h)
    x = np.random.default_rng(0).normal(size=(2, 5, d)).astype(np.float32)
    with torch.no_grad():
        want = ref(torch.from_numpy(x)).numpy()
    rows = dict((a, (b, tf)) for a, b, tf in families.projector("linear").keys)
    w = ref.weight.detach().numpy()
    kernel_path, tf = rows["linear_1.weight"]
    assert tf is Transform.LINEAR
    variables = {
        "linear_1": {
            "kernel": tf.to_ours(w, (d, h)),
            "bias": ref.bias.detach().numpy(),
        }
    }
    module = families.projector("linear").module(h)
    got = module.apply({"params": variables}, jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-5)


def test_llm_one_call_with_cache_equals_without():
    """Prefill into an empty cache, then decode token by token: same logits as one
    training-style call over the whole (left-padded, segment-masked) sequence."""
    cfg = dataclasses.replace(config.tiny().text, vocab_size=128, tie_word_embeddings=False)
    lm = Decoder(cfg)
    b, prompt, new, slots = 2, 6, 4, 12
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, 128, (b, prompt + new)), jnp.int32)
    mask = np.ones((b, prompt + new), np.int32)
    mask[1, :2] = 0  # row 1 left-padded by two
    positions = jnp.asarray(np.maximum(np.cumsum(mask, 1) - 1, 0), jnp.int32)
    mask = jnp.asarray(mask)
    params = lm.init(jax.random.key(0), tokens, positions, mask)
    apply = jax.jit(lm.apply, static_argnames="output")
    assert "lm_head" in params["params"]
    full = apply(params, tokens, positions, mask)  # [B, T, V]
    hidden = apply(params, tokens, positions, mask, output="hidden")
    assert hidden.shape == (b, prompt + new, cfg.hidden_size)

    kv_seg = jnp.pad(mask[:, :prompt], ((0, 0), (0, slots - prompt)), constant_values=1)
    cache = KVCache.empty(cfg.num_layers, kv_seg, cfg.num_kv_heads, cfg.head_dim, jnp.float32)
    last, cache = apply(
        params, tokens[:, :prompt], positions[:, :prompt], mask[:, :prompt], cache,
        output="last_logits",
    )  # fmt: skip
    assert int(cache.index) == prompt and cache.k.shape == (cfg.num_layers, b, slots, 2, 8)
    np.testing.assert_allclose(last[:, 0], full[:, prompt - 1], atol=1e-5)
    ones = jnp.ones((b, 1), jnp.int32)
    for i in range(prompt, prompt + new):
        step, cache = apply(params, tokens[:, i : i + 1], positions[:, i : i + 1], ones, cache)
        np.testing.assert_allclose(step[:, 0], full[:, i], atol=1e-5)
    assert int(cache.index) == prompt + new
    with pytest.raises(ValueError, match="output 'probs' not in"):
        lm.apply(params, tokens, positions, mask, output="probs")
