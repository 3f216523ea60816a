"""One HF key table per family (docs/style.md 6, 16): HF names <-> our param paths.

A row is (HF name, our path, Transform), both relative to the family's module: a vision
tower's names as in HF's `XVisionTransformer` (no `vision_model.` prefix), a projector's
as in `LlavaMultiModalProjector`, an LLM's as in `XForCausalLM` (`model.*`, `lm_head.*`).
`{layer}` marks a leaf stacked on axis 0 for `nn.scan`. `lov_jax/models/families.py`
pairs each table with its module; `lov_jax/convert/hf_keys.py` composes them.
"""

from __future__ import annotations

import enum
import math

import numpy as np


class Transform(enum.Enum):
    """HF tensor -> one layer of our leaf. `t` below is our per-layer shape."""

    IDENTITY = "identity"
    LINEAR = "linear"  # [out, in] -> [in, out]
    HEADS_QKV = "heads_qkv"  # [n*h, D] -> [D, n, h]
    HEADS_BIAS = "heads_bias"  # [n*h] -> [n, h]
    HEADS_O = "heads_o"  # [D, n*h] -> [n, h, D]
    CONV = "conv"  # OIHW [O, I, kh, kw] -> HWIO [kh, kw, I, O]

    def hf_shape(self, t: tuple[int, ...]) -> tuple[int, ...]:
        if self is Transform.LINEAR:
            return t[::-1]
        if self is Transform.HEADS_QKV:
            return (math.prod(t[1:]), t[0])
        if self is Transform.HEADS_BIAS:
            return (math.prod(t),)
        if self is Transform.HEADS_O:
            return (t[-1], math.prod(t[:-1]))
        if self is Transform.CONV:
            return (t[3], t[2], t[0], t[1])
        return t

    def to_ours(self, x: np.ndarray, t: tuple[int, ...]) -> np.ndarray:
        if self is Transform.CONV:
            return x.transpose(2, 3, 1, 0)
        if self in (Transform.LINEAR, Transform.HEADS_QKV, Transform.HEADS_O):
            x = x.T
        return x.reshape(t)

    def to_hf(self, y: np.ndarray) -> np.ndarray:
        if self is Transform.CONV:
            y = y.transpose(3, 2, 0, 1)
        elif self is Transform.LINEAR:
            y = y.T
        elif self is Transform.HEADS_QKV:
            y = y.reshape(y.shape[0], -1).T
        elif self is Transform.HEADS_O:
            y = y.reshape(-1, y.shape[-1]).T
        elif self is Transform.HEADS_BIAS:
            y = y.reshape(-1)
        return np.ascontiguousarray(y)


T = Transform
Row = tuple[str, str, Transform]
_QKV = ("q_proj", "k_proj", "v_proj")


def _linear(hf: str, ours: str, bias: bool = True) -> tuple[Row, ...]:
    rows = ((f"{hf}.weight", f"{ours}/kernel", T.LINEAR),)
    return rows + (((f"{hf}.bias", f"{ours}/bias", T.IDENTITY),) if bias else ())


def _norm(hf: str, ours: str, bias: bool) -> tuple[Row, ...]:
    rows = ((f"{hf}.weight", f"{ours}/scale", T.IDENTITY),)
    return rows + (((f"{hf}.bias", f"{ours}/bias", T.IDENTITY),) if bias else ())


def _layers(hf: str, ours: str, rows: tuple[Row, ...]) -> tuple[Row, ...]:
    return tuple((f"{hf}.{{layer}}.{a}", f"{ours}/{b}", tf) for a, b, tf in rows)


# The pre-LN ViT layer SigLIP and CLIP share (lov_jax/models/vit.py).
_VIT_LAYER = (
    *_norm("layer_norm1", "layer_norm1", bias=True),
    *_norm("layer_norm2", "layer_norm2", bias=True),
    *((f"self_attn.{n}.weight", f"self_attn/{n}/kernel", T.HEADS_QKV) for n in _QKV),
    *((f"self_attn.{n}.bias", f"self_attn/{n}/bias", T.HEADS_BIAS) for n in _QKV),
    ("self_attn.out_proj.weight", "self_attn/out_proj/kernel", T.HEADS_O),
    ("self_attn.out_proj.bias", "self_attn/out_proj/bias", T.IDENTITY),
    *_linear("mlp.fc1", "mlp/fc1"),
    *_linear("mlp.fc2", "mlp/fc2"),
)
SIGLIP: tuple[Row, ...] = (
    ("embeddings.patch_embedding.weight", "embeddings/patch_embedding/kernel", T.CONV),
    ("embeddings.patch_embedding.bias", "embeddings/patch_embedding/bias", T.IDENTITY),
    ("embeddings.position_embedding.weight", "embeddings/position_embedding/embedding", T.IDENTITY),
    *_layers("encoder.layers", "encoder/layers", _VIT_LAYER),
    *_norm("post_layernorm", "post_layernorm", bias=True),
)
# CLIPVisionTransformer: no conv bias, a class vector, pre_layrnorm (HF's spelling). Its
# post_layernorm (pooler only) and the layers past the feature layer are not ours to
# store: CLIP_UNUSED names them (an importer skips them, an exporter may fill them).
CLIP: tuple[Row, ...] = (
    ("embeddings.class_embedding", "embeddings/class_embedding", T.IDENTITY),
    ("embeddings.patch_embedding.weight", "embeddings/patch_embedding/kernel", T.CONV),
    ("embeddings.position_embedding.weight", "embeddings/position_embedding/embedding", T.IDENTITY),
    *_norm("pre_layrnorm", "pre_layrnorm", bias=True),
    *_layers("encoder.layers", "encoder/layers", _VIT_LAYER),
)
CLIP_UNUSED: tuple[str, ...] = ("post_layernorm.weight", "post_layernorm.bias")

# One decoder (lov_jax/models/decoder.py) for Qwen-2, Llama and Mistral: the q/k/v bias
# rows fill leaves only a config with attention_bias=True has (Qwen-2), so a Llama /
# Mistral model neither reads nor writes them.
_DECODER_LAYER = (
    *_norm("input_layernorm", "input_layernorm", bias=False),
    *_norm("post_attention_layernorm", "post_attention_layernorm", bias=False),
    *((f"self_attn.{n}.weight", f"self_attn/{n}/kernel", T.HEADS_QKV) for n in _QKV),
    *((f"self_attn.{n}.bias", f"self_attn/{n}/bias", T.HEADS_BIAS) for n in _QKV),
    ("self_attn.o_proj.weight", "self_attn/o_proj/kernel", T.HEADS_O),
    *(
        r
        for n in ("gate_proj", "up_proj", "down_proj")
        for r in _linear(f"mlp.{n}", f"mlp/{n}", False)
    ),
)
DECODER: tuple[Row, ...] = (
    ("model.embed_tokens.weight", "embed_tokens/embedding", T.IDENTITY),
    *_layers("model.layers", "layers", _DECODER_LAYER),
    *_norm("model.norm", "norm", bias=False),
    ("lm_head.weight", "lm_head/kernel", T.LINEAR),  # only an untied model has this leaf
)

MLP2X_GELU: tuple[Row, ...] = (*_linear("linear_1", "linear_1"), *_linear("linear_2", "linear_2"))
LINEAR: tuple[Row, ...] = _linear("linear_1", "linear_1")

# LLaVA-Mini's parts (lov_jax/models/llava_mini.py), as the released checkpoint names them
# under `model.`: the compressor (an nn.MultiheadAttention whose in_proj stacks q; k; v,
# head-split here as [D, 3, heads, d]) and the pre-fusion decoder layers.
MINI: tuple[Row, ...] = (
    ("compressor.query", "compressor/query", T.IDENTITY),
    ("compressor.pos_embed", "compressor/pos_embed", T.IDENTITY),
    ("compressor.attn.in_proj_weight", "compressor/in_proj_kernel", T.HEADS_QKV),
    ("compressor.attn.in_proj_bias", "compressor/in_proj_bias", T.HEADS_BIAS),
    ("compressor.attn.out_proj.weight", "compressor/out_proj/kernel", T.HEADS_O),
    ("compressor.attn.out_proj.bias", "compressor/out_proj/bias", T.IDENTITY),
    *_norm("compressor.ln_q", "compressor/ln_q", bias=True),
    *_norm("compressor.ln_kv", "compressor/ln_kv", bias=True),
    *_layers("prefusion_layers", "prefusion_layers", _DECODER_LAYER),
)
