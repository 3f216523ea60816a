"""RoPE scaling (lov_jax/models/rope.py) vs HF (../shared/REFERENCE_VIDEO_POST.md 3):
cos/sin tables against `Qwen2RotaryEmbedding` / `LlamaRotaryEmbedding` at positions up to
128k for linear, dynamic (prefill, cached decode, reset), yarn and llama3 in both dict
spellings; tiny Qwen-2 and Llama LLMs with each type vs `*ForCausalLM` logits (dynamic also
through a KV cache); config.json both ways; bad rope dicts name their field."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from lov_jax import config
from lov_jax.models import families, rope
from lov_jax.models.decoder import Decoder
from lov_jax.models.kv_cache import KVCache

_HF = {
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", "qwen2.modeling_qwen2", "Qwen2RotaryEmbedding"),
    "llama": ("LlamaConfig", "LlamaForCausalLM", "llama.modeling_llama", "LlamaRotaryEmbedding"),
}


def _hf(kind: str, what: int):
    import importlib

    import transformers

    name = _HF[kind][what]
    if what < 2:
        return getattr(transformers, name)
    return getattr(importlib.import_module(f"transformers.models.{_HF[kind][2]}"), _HF[kind][3])


# (family, rope_theta, max_position_embeddings, the dict, its config.json key). Real shapes:
# head_dim 128; Vicuna 1e4 / 4096, Qwen-2 1e6 / 32768, Llama-3.1 5e5 / 131072.
TABLES = {
    "linear_qwen2": ("qwen2", 1e6, 32768, {"rope_type": "linear", "factor": 2.5}, "parameters"),
    "linear_llama_type": ("llama", 1e4, 4096, {"type": "linear", "factor": 2.0}, "scaling"),
    "dynamic_qwen2": ("qwen2", 1e6, 32768, {"rope_type": "dynamic", "factor": 4.0}, "parameters"),
    "dynamic_llama_type": ("llama", 1e4, 4096, {"type": "dynamic", "factor": 3.0}, "scaling"),
    "yarn_qwen2_type": ("qwen2", 1e6, 131072, {"type": "yarn", "factor": 4.0,
                        "original_max_position_embeddings": 32768}, "scaling"),
    "yarn_llama_mscale": ("llama", 1e4, 32768, {"rope_type": "yarn", "factor": 8.0,
                          "original_max_position_embeddings": 4096, "beta_fast": 16,
                          "beta_slow": 2, "mscale": 0.707, "mscale_all_dim": 1.0,
                          "truncate": False}, "parameters"),
    "yarn_qwen2_attention_factor": ("qwen2", 1e6, 65536, {"rope_type": "yarn", "factor": 2.0,
                                    "attention_factor": 1.25}, "parameters"),
    "llama3_llama": ("llama", 5e5, 131072, {"rope_type": "llama3", "factor": 8.0,
                     "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192}, "parameters"),
    "llama3_qwen2_type": ("qwen2", 1e6, 131072, {"type": "llama3", "factor": 4.0,
                          "low_freq_factor": 2.0, "high_freq_factor": 8.0,
                          "original_max_position_embeddings": 16384}, "scaling"),
}  # fmt: skip


def _raw_config(kind, theta, max_pos, d, key, **sizes) -> dict:
    """A config.json text config: the rope dict as `rope_scaling` (4.x) or `rope_parameters`."""
    sizes = {"hidden_size": 256, "num_attention_heads": 2, "num_key_value_heads": 1,
             "head_dim": 128, "intermediate_size": 64, "num_hidden_layers": 1,
             "vocab_size": 64, **sizes}  # fmt: skip
    raw = {"model_type": kind, **sizes, "max_position_embeddings": max_pos, "rope_theta": theta}
    if key == "scaling":
        return {**raw, "rope_scaling": dict(d)}
    return {**raw, "rope_parameters": {**d, "rope_theta": theta}}


def _hf_config(raw: dict):
    return _hf(raw["model_type"], 0)(**{k: v for k, v in raw.items() if k != "model_type"})


@functools.partial(jax.jit, static_argnums=0)
def _tables(cfg, positions):
    return (
        *rope.rope_cos_sin(positions, cfg, jnp.float32),
        rope.rope_frequencies(positions, cfg)[0],
    )


def _ours(cfg, positions):
    """(cos, sin, inv_freq) as the decoder computes them, jitted."""
    return [np.asarray(t) for t in _tables(cfg, jnp.asarray(positions, jnp.int32))]


def _hf_tables(module, positions):
    """(cos, sin, inv_freq) of HF's rotary module for one call (it may update inv_freq)."""
    x = torch.zeros(1, dtype=torch.float32)
    cos, sin = module(x, torch.from_numpy(np.asarray(positions, np.int64)))
    return cos.numpy(), sin.numpy(), module.inv_freq.numpy().copy()


# the 128k span: both ends of every pre-training length, and random positions between
_POS = np.array([[0, 1, 2, 7, 1000, 4095, 4096, 4097, 8191, 8192, 16383, 16384, 32767,
                  32768, 65535, 65536, 100000, 131071],
                 [*np.random.default_rng(0).integers(0, 131072, 17), 3]])  # fmt: skip


def _assert_tables(ours, ref, positions, what, maxulp=2):
    """inv_freq within `maxulp` of HF's and cos/sin within 1e-6 plus the angle that those
    ulps make at each position (|d cos| <= |d angle| <= p |d inv_freq| + ulp(angle)), so
    at 128k a wrong
    formula still shows. XLA's float32 pow and torch's (SLEEF for vectors, glibc powf for a
    0-d tensor) round a few exponents 1 ulp apart; yarn's ramp can double that, and dynamic's
    grown base (one scalar pow) can be 2 ulp off, which shifts every frequency a few ulp."""
    np.testing.assert_array_max_ulp(ours[2], ref[2], maxulp=maxulp)
    dinv = np.abs(ours[2] - ref[2]).astype(np.float64)
    p = np.asarray(positions, np.float32)[..., None]
    # p * inv_freq rounds to float32 once more: one ulp of the angle
    slack = p * np.concatenate([dinv, dinv]) + np.spacing(p * np.tile(ref[2], 2))
    slack *= float(np.max(np.abs(ref[0])))  # the attention factor scales both
    for o, r, name in zip(ours[:2], ref[:2], ("cos", "sin"), strict=True):
        excess = np.abs(o - r) - 1e-6 - slack
        assert excess.max() <= 0, f"{what} {name}: max-abs-diff {np.abs(o - r).max():.3g}"


@pytest.mark.parametrize("name", list(TABLES))
def test_tables_equal_hf_rotary_to_128k(name):
    kind, theta, max_pos, d, key = TABLES[name]
    raw = _raw_config(kind, theta, max_pos, d, key)
    hf_cfg = _hf_config(raw)
    cfg = families.llm(kind).from_hf(raw)
    # both spellings and both keys read alike: HF's own standardised dict gives the same
    assert cfg == families.llm(kind).from_hf(hf_cfg.to_dict())
    assert cfg.rope_scaling.rope_type == d.get("rope_type", d.get("type"))
    module = _hf(kind, 3)(hf_cfg)
    assert rope.rope_frequencies(jnp.zeros((1, 1), jnp.int32), cfg)[1] == module.attention_scaling
    ref = _hf_tables(module, _POS)
    _assert_tables(_ours(cfg, _POS), ref, _POS, name, maxulp=8 if "dynamic" in name else 2)
    # a scaled table is another table (the scaling is doing something)
    assert np.max(np.abs(_ours(_plain(cfg), _POS)[0] - ref[0])) > 0.1


def test_yarn_attention_factor_scales_cos_and_sin():
    """Qwen2-7B with yarn 4x (reference 3.4): cos at position 0 is 1 + 0.1 ln 4."""
    raw = _raw_config(*TABLES["yarn_qwen2_type"][:4], "scaling")
    cos, sin, _ = _ours(families.llm("qwen2").from_hf(raw), np.zeros((1, 1)))
    np.testing.assert_allclose(cos, 1 + 0.1 * np.log(4.0), rtol=1e-6)
    np.testing.assert_array_equal(sin, 0.0)


@pytest.mark.parametrize("name", ["dynamic_qwen2"])  # Llama's rotary code is the same
def test_dynamic_follows_hf_through_prefill_decode_and_reset(name):
    """HF's stateful module: a long prefill grows theta, each decode step grows it again,
    a short call resets it; our stateless tables equal it at every call (module doc)."""
    kind, theta, max_pos, d, key = TABLES[name]
    raw = _raw_config(kind, theta, max_pos, d, key)
    cfg = families.llm(kind).from_hf(raw)
    module = _hf(kind, 3)(_hf_config(raw))
    # a generate crossing max_position_embeddings step by step, a 128k prefill and its
    # decode steps, then a short call (HF resets). Not here: a call after a longer one that
    # stays above max_position_embeddings (HF keeps the longer table; see rope.py).
    short = np.arange(0, max_pos - 2, 997)[None]
    steps = [np.array([[t]]) for t in range(max_pos - 2, max_pos + 2)]
    calls = [short, *steps, _POS, np.array([[131072], [131072]]), np.array([[131073]]), short]
    for i, pos in enumerate(calls):
        _assert_tables(_ours(cfg, pos), _hf_tables(module, pos), pos, f"{name} {i}", 8)
    assert np.max(np.abs(_ours(cfg, _POS)[0] - _ours(_plain(cfg), _POS)[0])) > 0.1


# ---- tiny LLMs: logits 1e-4 ------------------------------------------------------------------

_SIZES = {"vocab_size": 97, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
          "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8,
          "rms_norm_eps": 1e-5, "tie_word_embeddings": False}  # fmt: skip
# lengths 16 (dynamic, linear) or originals 8 / 6, so 23-token sequences exceed them
LLMS = {
    "qwen2_linear": ("qwen2", 1e4, 16, {"rope_type": "linear", "factor": 3.0}),
    "llama_linear": ("llama", 1e4, 16, {"type": "linear", "factor": 2.0}),
    "qwen2_dynamic": ("qwen2", 1e4, 16, {"rope_type": "dynamic", "factor": 2.0}),
    "llama_dynamic": ("llama", 500.0, 16, {"type": "dynamic", "factor": 4.0}),
    "qwen2_yarn": ("qwen2", 1e4, 32, {"rope_type": "yarn", "factor": 4.0,
                                      "original_max_position_embeddings": 8}),
    "llama_yarn": ("llama", 1e4, 32, {"type": "yarn", "factor": 4.0, "beta_fast": 8,
                                      "original_max_position_embeddings": 8}),
    "qwen2_llama3": ("qwen2", 1e4, 32, {"rope_type": "llama3", "factor": 4.0,
                                        "low_freq_factor": 1.0, "high_freq_factor": 2.0,
                                        "original_max_position_embeddings": 6}),
    "llama_llama3": ("llama", 5e3, 32, {"rope_type": "llama3", "factor": 2.0,
                                        "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                        "original_max_position_embeddings": 8}),
}  # fmt: skip


def _params(cfg, hf) -> dict:
    """The LLM family's key table on the torch state dict -> our nested params."""
    import flax.linen as nn

    from lov_jax.convert.hf_keys import flatten, unflatten

    ids = jnp.zeros((1, 4), jnp.int32)
    init = jax.eval_shape(lambda: Decoder(cfg).init(jax.random.key(0), ids, ids, ids))
    shapes = {k: v.shape for k, v in flatten(nn.meta.unbox(init["params"])).items()}
    flat, state = {}, hf.state_dict()
    for hf_name, path, tf in families.llm(cfg.kind).keys:
        if path not in shapes:
            continue
        if "{layer}" in hf_name:
            layers = [state[hf_name.format(layer=i)].numpy() for i in range(cfg.num_layers)]
            flat[path] = np.stack([tf.to_ours(x, shapes[path][1:]) for x in layers])
        else:
            flat[path] = tf.to_ours(state[hf_name].numpy(), shapes[path])
    assert set(flat) == set(shapes)
    return unflatten({k: jnp.asarray(v) for k, v in flat.items()})


def _plain(cfg):
    return dataclasses.replace(cfg, rope_scaling=None)


@pytest.fixture(scope="module", params=list(LLMS))
def llm(request):
    kind, theta, max_pos, d = LLMS[request.param]
    raw = _raw_config(kind, theta, max_pos, d, "scaling" if "type" in d else "parameters",
                      **_SIZES)  # fmt: skip
    torch.manual_seed(len(request.param))
    hf = _hf(kind, 1)(_hf_config(raw)).eval()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for pname, p in hf.named_parameters():
            if "norm" in pname or pname.endswith("bias"):
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    cfg = families.llm(kind).from_hf(hf.config.to_dict())
    return request.param, hf, cfg, _params(cfg, hf)


def _hf_logits(hf, ids, **kw):
    with torch.no_grad():
        return hf(input_ids=torch.from_numpy(ids.astype(np.int64)), **kw)


def test_llm_logits_equal_hf(llm):
    name, hf, cfg, params = llm
    assert cfg.rope_scaling is not None
    ids = np.random.default_rng(1).integers(0, 97, (2, 23))
    pos = np.broadcast_to(np.arange(23), ids.shape)
    ref = _hf_logits(hf, ids).logits.numpy()
    out = np.asarray(jax.jit(Decoder(cfg).apply)({"params": params}, ids, pos, np.ones_like(ids)))
    diff = float(np.max(np.abs(out - ref)))
    assert diff <= 1e-4, f"{name}: max-abs-diff {diff:.3g}"
    # the scaling is doing something at these positions
    assert np.max(np.abs(_ours(cfg, pos)[0] - _ours(_plain(cfg), pos)[0])) > 1e-2


@pytest.mark.parametrize("llm", ["qwen2_dynamic"], indirect=True)  # one rotary code
def test_dynamic_cached_decode_equals_hf_generate_steps(llm):
    """Prefill 12 tokens (under max_position_embeddings 16), decode 7 more one at a time
    through the KV cache, crossing 16: every step equals HF with its DynamicCache."""
    from transformers import DynamicCache

    name, hf, cfg, params = llm
    ids = np.random.default_rng(5).integers(0, 97, (1, 19))
    past = DynamicCache(config=hf.config)
    ref = [_hf_logits(hf, ids[:, :12], past_key_values=past, use_cache=True).logits[0].numpy()]
    for t in range(12, 19):
        out = _hf_logits(hf, ids[:, t : t + 1], past_key_values=past, use_cache=True,
                         position_ids=torch.tensor([[t]]))  # fmt: skip
        ref.append(out.logits[0].numpy())
    seg = jnp.ones((1, 19), jnp.int32)
    cache = KVCache.empty(cfg.num_layers, seg, cfg.num_kv_heads, cfg.head_dim, jnp.float32)
    step = jax.jit(lambda i, q, s, c: Decoder(cfg).apply({"params": params}, i, q, s, c))
    logits, cache = step(ids[:, :12], jnp.arange(12)[None], seg[:, :12], cache)
    got = [np.asarray(logits)[0]]
    for t in range(12, 19):
        logits, cache = step(ids[:, t : t + 1], jnp.full((1, 1), t), seg[:, :1], cache)
        got.append(np.asarray(logits)[0])
    diff = float(np.max(np.abs(np.concatenate(got) - np.concatenate(ref))))
    assert diff <= 1e-4, f"{name}: max-abs-diff {diff:.3g}"


# ---- config.json both ways -----------------------------------------------------------------


@pytest.mark.parametrize("name", list(TABLES))
def test_llm_config_round_trip_and_hf_reads_ours(name):
    kind, theta, max_pos, d, key = TABLES[name]
    fam = families.llm(kind)
    cfg = fam.from_hf(_raw_config(kind, theta, max_pos, d, key))
    written = fam.to_hf(cfg)
    assert fam.from_hf(written) == cfg
    # transformers reads what we write into the same rotary tables
    module = _hf(kind, 3)(_hf_config(written))
    np.testing.assert_array_equal(
        module.inv_freq.numpy(), _hf(kind, 3)(_hf_config(_raw_config(kind, theta, max_pos, d,
                                                                      key))).inv_freq.numpy()
    )  # fmt: skip
    assert module.rope_type == cfg.rope_scaling.rope_type


def test_model_config_json_round_trip_keeps_scaling():
    """A whole ModelConfig (OneVision / Qwen-2 and LLaVA-NeXT / Llama) through config.json:
    ours -> dict -> ours, and transformers' own config class keeps the dict."""
    from transformers import AutoConfig

    yarn = rope.RopeScaling("yarn", 4.0, original_max_position_embeddings=8192, beta_fast=16)
    llama3 = rope.RopeScaling("llama3", 8.0, original_max_position_embeddings=8192,
                              low_freq_factor=1.0, high_freq_factor=4.0)  # fmt: skip
    from lov_jax.token_ids import TokenIds

    ids = TokenIds(pad=0, eos=(2,), image=5, video=6)  # inside every tiny vocabulary
    for preset, scaling in (("tiny_llava15", llama3), ("tiny", yarn)):
        base = config.preset(preset, token_ids=ids)
        cfg = base.replace(text=dataclasses.replace(base.text, rope_scaling=scaling))
        hf = cfg.to_hf_config()
        assert config.ModelConfig.from_hf_config(hf, token_ids=ids) == cfg
        loaded = AutoConfig.for_model(**hf).text_config.rope_parameters
        assert {k: loaded[k] for k in scaling.to_hf()} == scaling.to_hf()


# ---- bad rope dicts --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "d,key,match",
    [
        ({"rope_type": "longrope", "factor": 2.0}, "parameters", "rope_type 'longrope'"),
        ({"type": "ntk", "factor": 2.0}, "scaling", "rope_type 'ntk'"),
        ({"rope_type": "linear"}, "parameters", r"needs \['factor'\]"),
        ({"type": "dynamic"}, "scaling", r"needs \['factor'\]"),
        ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0}, "parameters",
         r"needs \['high_freq_factor'\]"),
        ({"rope_type": "linear", "factor": 2.0, "beta_fast": 4}, "parameters",
         r"\['beta_fast'\] are not fields of rope_type 'linear'"),
        ({"type": "linear", "rope_type": "dynamic", "factor": 2.0}, "scaling", "!= type"),
        ({"rope_type": "linear", "factor": 0.5}, "parameters", "factor 0.5"),
        ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0,
          "high_freq_factor": 1.0}, "parameters", "must exceed"),
        ({"rope_type": "yarn", "factor": 2.0, "partial_rotary_factor": 0.5}, "parameters",
         "partial_rotary_factor"),
    ],
)  # fmt: skip
def test_bad_rope_dicts_name_the_field(d, key, match):
    raw = _raw_config("llama", 1e4, 4096, d, key)
    field = "rope_scaling" if key == "scaling" else "rope_parameters"
    with pytest.raises(ValueError, match=f"text_config.{field}") as err:
        families.llm("llama").from_hf(raw)
    assert err.match(match)


def test_hf_defaults_are_read_as_hf_fills_them():
    """yarn / llama3 without original_max_position_embeddings take max_position_embeddings
    (or a top-level original_max_position_embeddings); yarn's factor null is their ratio;
    a stray top-level `type` / `factor` (LLaVA-NeXT-Video's conversion) is no rope dict."""
    read = families.llm("llama").from_hf
    raw = _raw_config("llama", 1e4, 4096, {"rope_type": "yarn", "factor": 2.0}, "parameters")
    assert read(raw).rope_scaling.original_max_position_embeddings == 4096
    top = {**raw, "original_max_position_embeddings": 1024}
    assert read(top).rope_scaling.original_max_position_embeddings == 1024
    null = _raw_config("llama", 1e4, 8192, {"rope_type": "yarn", "factor": None,
                       "original_max_position_embeddings": 2048}, "parameters")  # fmt: skip
    assert read(null).rope_scaling.factor == 4.0
    stray = {**_raw_config("llama", 1e4, 4096, {"type": "linear", "factor": 2.5}, "scaling"),
             "type": "linear", "factor": 2.0}  # fmt: skip
    assert read(stray).rope_scaling == rope.RopeScaling("linear", 2.5)
    for hf_cfg in (raw, top, null, stray):
        module = _hf("llama", 3)(_hf_config(hf_cfg))
        inv, scale = rope.inv_freq_and_scale(128, 1e4, read(hf_cfg).rope_scaling,
                                             hf_cfg["max_position_embeddings"])  # fmt: skip
        np.testing.assert_array_max_ulp(np.asarray(inv), module.inv_freq.numpy(), maxulp=1)
        assert scale == module.attention_scaling
