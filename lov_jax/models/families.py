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
               output)` and `head_kernel()` (lov_jax/models/qwen2.py documents them)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.linen as nn

from lov_jax.config import TextConfig, VisionConfig
from lov_jax.convert import key_tables
from lov_jax.models.projector import LinearProjector, MultiModalProjector
from lov_jax.models.qwen2 import Qwen2Model
from lov_jax.models.siglip import SiglipVisionTower


@dataclasses.dataclass(frozen=True)
class Family:
    """One registered part.

    keys: its HF key table (key_tables.Row). from_hf / to_hf: its part of config.json (a
    vision_config / text_config dict; for a projector, the top-level keys). hf_model_type:
    the `model_type` that names it in config.json (None: projectors have none).
    tied: (head path, embedding path) of an LLM whose head may be tied to its embedding.
    """

    kind: str
    module: type[nn.Module]
    keys: tuple[key_tables.Row, ...]
    from_hf: Callable[[dict], Any]
    to_hf: Callable[[Any], dict]
    hf_model_type: str | None = None
    tied: tuple[str, str] | None = None


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


def _qwen2_from_hf(t: dict) -> TextConfig:
    if t.get("use_sliding_window"):
        raise ValueError("use_sliding_window=true is not supported (OV never uses it)")
    rope = t.get("rope_parameters") or {}
    hidden = t.get("hidden_size", 4096)
    heads = t.get("num_attention_heads", 32)
    return TextConfig(
        kind="qwen2",
        vocab_size=t.get("vocab_size", 151936),
        hidden_size=hidden,
        intermediate_size=t.get("intermediate_size", 22016),
        num_layers=t.get("num_hidden_layers", 32),
        num_heads=heads,
        num_kv_heads=t.get("num_key_value_heads") or heads,
        head_dim=t.get("head_dim") or hidden // heads,
        rope_theta=float(rope.get("rope_theta", t.get("rope_theta", 10000.0))),
        rms_norm_eps=t.get("rms_norm_eps", 1e-6),
        max_position_embeddings=t.get("max_position_embeddings", 32768),
        tie_word_embeddings=bool(t.get("tie_word_embeddings", False)),
    )


def _qwen2_to_hf(t: TextConfig) -> dict:
    return {
        "model_type": "qwen2",
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
        "rope_parameters": {"rope_theta": t.rope_theta, "rope_type": "default"},
        "tie_word_embeddings": t.tie_word_embeddings,
        "use_sliding_window": False,
        "sliding_window": None,
        "attention_dropout": 0.0,
    }


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
LLMS: dict[str, Family] = {
    "qwen2": Family(
        "qwen2", Qwen2Model, key_tables.QWEN2, _qwen2_from_hf, _qwen2_to_hf, hf_model_type="qwen2",
        tied=("lm_head/kernel", "embed_tokens/embedding"),
    ),
}  # fmt: skip


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
