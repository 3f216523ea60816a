"""The model-family registry: one interface for vision towers, projectors and LLMs.

A config field picks each part (`VisionConfig.kind`, `ModelConfig.projector`,
`TextConfig.kind`); conversion, training, generation and planning build parts and read
their key tables only through `vision(kind)`, `projector(kind)` and `llm(kind)`. Adding a
family is its model file, its key table (lov_jax/convert/key_tables.py), a preset and one
entry here; nothing else branches on a family.

Module interfaces (constructor arguments are positional):
    vision     Module(cfg: VisionConfig, dtype, param_dtype, remat)
               pixels [B, S, S, 3] -> features float[B, P, D]
    projector  Module(hidden_size, dtype, param_dtype): float[..., D] -> float[..., H]
    llm        Module(cfg: TextConfig, dtype, param_dtype, remat, attention_impl) with
               `embed_tokens`, `__call__(inputs, positions, segment_ids, cache=None, *,
               output)` and `head_kernel()` (lov_jax/models/decoder.py documents them)

Registered: towers "siglip" (OneVision) and "clip" (LLaVA-1.5 / NeXT); projectors
"mlp2x_gelu" and "linear"; LLMs "qwen2", "llama" (Vicuna, Llama-3) and "mistral", the
three through one decoder (lov_jax/models/decoder.py) and one key table.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.linen as nn

from lov_jax.config import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    VISION_ACTS,
    TextConfig,
    VisionConfig,
)
from lov_jax.convert import key_tables
from lov_jax.models import rope
from lov_jax.models.clip import ClipVisionTower
from lov_jax.models.decoder import Decoder
from lov_jax.models.projector import LinearProjector, MultiModalProjector
from lov_jax.models.siglip import SiglipVisionTower


@dataclasses.dataclass(frozen=True)
class Family:
    """One registered part.

    keys: its HF key table (key_tables.Row). from_hf / to_hf: its part of config.json (a
    vision_config / text_config dict; for a projector, the top-level keys). hf_model_type:
    the `model_type` that names it in config.json (None: projectors have none).
    tied: (head path, embedding path) of an LLM whose head may be tied to its embedding.
    unused: HF names (relative, like `keys`) a checkpoint may hold that the module never
    uses and does not store (CLIP's post_layernorm): an importer skips them.
    """

    kind: str
    module: type[nn.Module]
    keys: tuple[key_tables.Row, ...]
    from_hf: Callable[[dict], Any]
    to_hf: Callable[[Any], dict]
    hf_model_type: str | None = None
    tied: tuple[str, str] | None = None
    unused: tuple[str, ...] = ()


# ---- config.json readers / writers ----------------------------------------------------


def _siglip_from_hf(v: dict) -> VisionConfig:
    return VisionConfig(
        kind="siglip",
        hidden_size=v.get("hidden_size", 768),
        intermediate_size=v.get("intermediate_size", 3072),
        num_layers=v.get("num_hidden_layers", 12),
        num_heads=v.get("num_attention_heads", 12),
        patch_size=v.get("patch_size", 16),
        image_size=v.get("image_size", 224),
        num_channels=v.get("num_channels", 3),
        layer_norm_eps=v.get("layer_norm_eps", 1e-6),
    )


def _siglip_to_hf(v: VisionConfig) -> dict:
    return {
        "model_type": "siglip_vision_model",
        "hidden_size": v.hidden_size,
        "intermediate_size": v.intermediate_size,
        "num_hidden_layers": v.num_layers,
        "num_attention_heads": v.num_heads,
        "patch_size": v.patch_size,
        "image_size": v.image_size,
        "num_channels": v.num_channels,
        "layer_norm_eps": v.layer_norm_eps,
        "hidden_act": "gelu_pytorch_tanh",
        "attention_dropout": 0.0,
        "vision_use_head": False,
    }


def _clip_from_hf(v: dict) -> VisionConfig:
    """A `clip_vision_model` vision_config (CLIPVisionConfig defaults). `num_layers` is the
    file's; the architecture level keeps only the feature layer's depth
    (lov_jax/architectures.py) and sets `feature_select`."""
    act = v.get("hidden_act", "quick_gelu")
    if act not in VISION_ACTS:
        raise ValueError(f"vision_config.hidden_act {act!r} not in {VISION_ACTS}")
    return VisionConfig(
        kind="clip",
        hidden_size=v.get("hidden_size", 768),
        intermediate_size=v.get("intermediate_size", 3072),
        num_layers=v.get("num_hidden_layers", 12),
        num_heads=v.get("num_attention_heads", 12),
        patch_size=v.get("patch_size", 32),
        image_size=v.get("image_size", 224),
        num_channels=v.get("num_channels", 3),
        layer_norm_eps=v.get("layer_norm_eps", 1e-5),
        hidden_act=act,
        feature_select="default",  # every CLIP LLaVA checkpoint drops CLS
        image_mean=OPENAI_CLIP_MEAN,
        image_std=OPENAI_CLIP_STD,
    )


def _clip_to_hf(v: VisionConfig) -> dict:
    """`num_hidden_layers` = the layers we keep (export with vision_feature_layer -1)."""
    return {
        "model_type": "clip_vision_model",
        "hidden_size": v.hidden_size,
        "intermediate_size": v.intermediate_size,
        "num_hidden_layers": v.num_layers,
        "num_attention_heads": v.num_heads,
        "patch_size": v.patch_size,
        "image_size": v.image_size,
        "num_channels": v.num_channels,
        "layer_norm_eps": v.layer_norm_eps,
        "hidden_act": v.hidden_act,
        "attention_dropout": 0.0,
    }


# ---- LLMs: one decoder, three config.json dialects --------------------------------------


def _check(t: dict, field: str, ok, want: str) -> None:
    if field in t and not ok(t[field]):
        raise ValueError(f"text_config.{field} = {t[field]!r}: {want}")


def _decoder_from_hf(t: dict, kind: str, defaults: dict) -> dict:
    """The TextConfig fields every family reads alike; `defaults`: its HF config's."""
    _check(t, "hidden_act", lambda a: a == "silu", "the decoder's MLP is SwiGLU (silu)")
    _check(t, "mlp_bias", lambda b: not b, "MLP biases are not supported")
    _check(t, "pretraining_tp", lambda n: n in (None, 1), "only pretraining_tp 1")
    _check(t, "layer_types", lambda ts: len(set(ts or ())) <= 1, "one attention type for all")
    d = {**defaults, **{k: v for k, v in t.items() if v is not None}}
    hidden, heads = d["hidden_size"], d["num_attention_heads"]
    theta, scaling = rope.rope_from_hf(t, d["max_position_embeddings"])
    return {
        "kind": kind,
        "vocab_size": d["vocab_size"],
        "hidden_size": hidden,
        "intermediate_size": d["intermediate_size"],
        "num_layers": d["num_hidden_layers"],
        "num_heads": heads,
        "num_kv_heads": d.get("num_key_value_heads") or heads,
        "head_dim": d.get("head_dim") or hidden // heads,
        "rope_theta": theta,
        "rope_scaling": scaling,
        "rms_norm_eps": d["rms_norm_eps"],
        "max_position_embeddings": d["max_position_embeddings"],
        "tie_word_embeddings": bool(d.get("tie_word_embeddings", False)),
    }


def _decoder_to_hf(t: TextConfig, model_type: str) -> dict:
    return {
        "model_type": model_type,
        "vocab_size": t.vocab_size,
        "hidden_size": t.hidden_size,
        "intermediate_size": t.intermediate_size,
        "num_hidden_layers": t.num_layers,
        "num_attention_heads": t.num_heads,
        "num_key_value_heads": t.num_kv_heads,
        "head_dim": t.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": t.rms_norm_eps,
        "max_position_embeddings": t.max_position_embeddings,
        "rope_theta": t.rope_theta,
        "rope_parameters": rope.rope_to_hf(t.rope_theta, t.rope_scaling),
        "tie_word_embeddings": t.tie_word_embeddings,
        "attention_dropout": 0.0,
    }


# transformers' config-class defaults for the fields a config.json may omit
_QWEN2_DEFAULTS = {
    "vocab_size": 151936, "hidden_size": 4096, "intermediate_size": 22016,
    "num_hidden_layers": 32, "num_attention_heads": 32, "rms_norm_eps": 1e-6,
    "max_position_embeddings": 32768,
}  # fmt: skip
_LLAMA_DEFAULTS = {**_QWEN2_DEFAULTS, "vocab_size": 32000, "intermediate_size": 11008,
                   "max_position_embeddings": 2048}  # fmt: skip
_MISTRAL_DEFAULTS = {**_LLAMA_DEFAULTS, "intermediate_size": 14336, "num_key_value_heads": 8,
                     "max_position_embeddings": 4096 * 32}  # fmt: skip


def _qwen2_from_hf(t: dict) -> TextConfig:
    # Qwen-2 always has q/k/v biases; its window applies only with use_sliding_window
    _check(t, "use_sliding_window", lambda u: not u, "not supported (OV never uses it)")
    return TextConfig(**_decoder_from_hf(t, "qwen2", _QWEN2_DEFAULTS), attention_bias=True)


def _qwen2_to_hf(t: TextConfig) -> dict:
    if not t.attention_bias or t.sliding_window is not None:
        raise ValueError("a qwen2 text config has q/k/v biases and no sliding window")
    return {**_decoder_to_hf(t, "qwen2"), "use_sliding_window": False, "sliding_window": None}


def _llama_from_hf(t: dict) -> TextConfig:
    _check(t, "sliding_window", lambda w: w is None, "Llama has no sliding window")
    # LlamaAttention's attention_bias biases o_proj as well as q/k/v (unlike Qwen-2's);
    # no LLaVA checkpoint sets it
    _check(t, "attention_bias", lambda b: not b, "q/k/v/o biases are not supported")
    return TextConfig(**_decoder_from_hf(t, "llama", _LLAMA_DEFAULTS), attention_bias=False)


def _llama_to_hf(t: TextConfig) -> dict:
    if t.sliding_window is not None or t.attention_bias:
        raise ValueError("a llama text config has no biases or sliding window")
    return {**_decoder_to_hf(t, "llama"), "attention_bias": False, "mlp_bias": False}


def _mistral_from_hf(t: dict) -> TextConfig:
    # MistralConfig's default window is 4096; an explicit null is full causal attention
    # (MistralModel picks create_causal_mask then), e.g. Mistral-7B-Instruct-v0.2.
    window = t["sliding_window"] if "sliding_window" in t else 4096
    _check(t, "sliding_window", lambda w: w is None or (isinstance(w, int) and w >= 1),
           "an int >= 1 or null")  # fmt: skip
    _check(t, "attention_bias", lambda b: not b, "Mistral has no attention biases")
    return TextConfig(
        **_decoder_from_hf(t, "mistral", _MISTRAL_DEFAULTS),
        attention_bias=False,
        sliding_window=window,
    )


def _mistral_to_hf(t: TextConfig) -> dict:
    if t.attention_bias:
        raise ValueError("a mistral text config has no attention biases: use kind 'llama'")
    return {**_decoder_to_hf(t, "mistral"), "sliding_window": t.sliding_window}


def _mlp2x_gelu_from_hf(hf: dict) -> str:
    if hf.get("projector_hidden_act", "gelu") != "gelu":
        raise ValueError(f"projector_hidden_act {hf['projector_hidden_act']!r}: mlp2x_gelu is gelu")
    if not hf.get("multimodal_projector_bias", True):
        raise ValueError("multimodal_projector_bias=false: mlp2x_gelu has biases")
    return "mlp2x_gelu"


def _mlp2x_gelu_to_hf(_: str) -> dict:
    return {"projector_hidden_act": "gelu", "multimodal_projector_bias": True}


def _linear_to_hf(_: str) -> dict:
    raise ValueError(
        "transformers' Llava configs have no single-Linear projector: a 'linear' projector "
        "cannot be written as config.json"
    )


# ---- the registry --------------------------------------------------------------------

VISION: dict[str, Family] = {
    "siglip": Family(
        "siglip", SiglipVisionTower, key_tables.SIGLIP, _siglip_from_hf, _siglip_to_hf,
        hf_model_type="siglip_vision_model",
    ),
    "clip": Family(
        "clip", ClipVisionTower, key_tables.CLIP, _clip_from_hf, _clip_to_hf,
        hf_model_type="clip_vision_model", unused=key_tables.CLIP_UNUSED,
    ),
}  # fmt: skip
PROJECTORS: dict[str, Family] = {
    "mlp2x_gelu": Family(
        "mlp2x_gelu", MultiModalProjector, key_tables.MLP2X_GELU, _mlp2x_gelu_from_hf,
        _mlp2x_gelu_to_hf,
    ),
    "linear": Family(
        "linear", LinearProjector, key_tables.LINEAR, lambda _: "linear", _linear_to_hf
    ),
}  # fmt: skip
_TIED = ("lm_head/kernel", "embed_tokens/embedding")
LLMS: dict[str, Family] = {
    kind: Family(kind, Decoder, key_tables.DECODER, read, write, hf_model_type=kind, tied=_TIED)
    for kind, read, write in (
        ("qwen2", _qwen2_from_hf, _qwen2_to_hf),
        ("llama", _llama_from_hf, _llama_to_hf),
        ("mistral", _mistral_from_hf, _mistral_to_hf),
    )
}


def _get(table: dict[str, Family], role: str, kind: str) -> Family:
    if kind not in table:
        raise ValueError(f"unknown {role} kind {kind!r}; known: {sorted(table)}")
    return table[kind]


def vision(kind: str) -> Family:
    return _get(VISION, "vision tower", kind)


def projector(kind: str) -> Family:
    return _get(PROJECTORS, "projector", kind)


def llm(kind: str) -> Family:
    return _get(LLMS, "LLM", kind)


def by_hf_model_type(table: dict[str, Family], role: str, model_type: str | None) -> Family:
    """The family config.json's `model_type` names (None: the table's only entry)."""
    hits = [f for f in table.values() if f.hf_model_type == model_type]
    if model_type is None and len(table) == 1:
        hits = list(table.values())
    if not hits:
        known = sorted(f.hf_model_type for f in table.values())
        raise ValueError(f"unknown {role} model_type {model_type!r}; known: {known}")
    return hits[0]


def config_parts_from_hf(hf: dict) -> tuple[VisionConfig, TextConfig, str]:
    """(vision, text, projector kind) of a Llava-style config.json dict.

    The projector kind is LLaVA-NeXT's `mm_projector_type` when present (lmms-lab
    configs), else `mlp2x_gelu` (transformers' LlavaMultiModalProjector)."""
    v, t = hf.get("vision_config", {}), hf.get("text_config", {})
    vis = by_hf_model_type(VISION, "vision tower", v.get("model_type")).from_hf(v)
    text = by_hf_model_type(LLMS, "LLM", t.get("model_type")).from_hf(t)
    proj = projector(hf.get("mm_projector_type", "mlp2x_gelu")).from_hf(hf)
    return vis, text, proj


def config_parts_to_hf(vis: VisionConfig, text: TextConfig, proj: str) -> dict:
    """{"vision_config", "text_config", projector keys} for config.json."""
    return {
        **projector(proj).to_hf(proj),
        "vision_config": vision(vis.kind).to_hf(vis),
        "text_config": llm(text.kind).to_hf(text),
    }
