"""Qwen-2 decoder (REFERENCE.md 1.3) with segment-aware causal attention.

Differences from HF's layout: projection kernels are stored head-split
(`q_proj.kernel: [H, N, Dh]`, `o_proj.kernel: [N, Dh, H]`) and layers are
stacked on a leading axis; the converter reshapes/stacks.

KV cache (generation, `lov_jax.inference`): the same modules and params with
`kv_cache="prefill"` return every layer's post-RoPE keys/values, stacked like
the params, and with `kv_cache="decode"` read/update a stacked cache
`(k, v): dtype[L_layers, B, S_max, K, Dh]` that the layer scan slices per layer.
The default `kv_cache="none"` is the training path, unchanged.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from lov_jax.config import TextConfig
from lov_jax.models.attention import dot_product_attention
from lov_jax.models.layers import RMSNorm, dense, scanned

_ACT = ("activation_batch", "activation_length", "activation_embed")
KV_CACHE_MODES = ("none", "prefill", "decode")
# Logical names of a stacked cache tensor [L_layers, B, S_max, K, Dh].
CACHE_AXES = ("layers", "activation_batch", "activation_length", "activation_heads", "head_dim")


def rope_cos_sin(
    positions: jax.Array, head_dim: int, theta: float, dtype: jnp.dtype
) -> tuple[jax.Array, jax.Array]:
    """int32[B, T] -> cos, sin: dtype[B, T, head_dim], computed in fp32 like HF."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, Dh/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Non-interleaved rotate_half RoPE: x [B, T, N, Dh], cos/sin [B, T, Dh]."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[:, :, None, :] + rotated * sin[:, :, None, :]


class Qwen2Attention(nn.Module):
    cfg: TextConfig
    dtype: jnp.dtype
    param_dtype: jnp.dtype
    attention_impl: str = "xla"
    kv_cache: str = "none"  # one of KV_CACHE_MODES (module docstring)

    @nn.compact
    def __call__(self, x, cos, sin, segment_ids, cache=None, kv_segment_ids=None, cache_index=None):
        """x [B, T, H] -> [B, T, H]; with a kv_cache mode, (out, (k, v)) as the mode says.

        decode: cache = (k, v) dtype[B, S_max, K, Dh]; the T new keys/values are written at
        slot `cache_index` and queries (segment ids `segment_ids`) attend the whole cache
        under `kv_segment_ids` int32[B, S_max] and causality from that slot.
        """
        cfg, kw = self.cfg, {"dtype": self.dtype, "param_dtype": self.param_dtype}
        nh, kv, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        q = dense((nh, hd), axes=("embed", "q_heads", "head_dim"), name="q_proj", **kw)(x)
        k = dense((kv, hd), axes=("embed", "kv_heads", "head_dim"), name="k_proj", **kw)(x)
        v = dense((kv, hd), axes=("embed", "kv_heads", "head_dim"), name="v_proj", **kw)(x)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)  # [B, T, N|K, Dh]
        if self.kv_cache == "decode":
            k_cache, v_cache = cache  # [B, S_max, K, Dh]
            update = jax.lax.dynamic_update_slice_in_dim
            k = update(k_cache, k.astype(k_cache.dtype), cache_index, axis=1)
            v = update(v_cache, v.astype(v_cache.dtype), cache_index, axis=1)
            out = dot_product_attention(
                q, k.astype(q.dtype), v.astype(q.dtype), q_segment_ids=segment_ids,
                kv_segment_ids=kv_segment_ids, causal=True, q_offset=cache_index, impl="xla",
            )  # fmt: skip
        else:
            out = dot_product_attention(
                q, k, v, q_segment_ids=segment_ids, kv_segment_ids=segment_ids, causal=True,
                impl=self.attention_impl,
            )  # fmt: skip
        out = nn.with_logical_constraint(
            out, ("activation_batch", "activation_length", "activation_heads", None)
        )
        out = dense(
            cfg.hidden_size, axes=("q_heads", "head_dim", "embed"), in_axes=(-2, -1),
            use_bias=False, name="o_proj", **kw,
        )(out)  # fmt: skip
        return out if self.kv_cache == "none" else (out, (k, v))


class Qwen2MLP(nn.Module):
    cfg: TextConfig
    dtype: jnp.dtype
    param_dtype: jnp.dtype

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = {"dtype": self.dtype, "param_dtype": self.param_dtype, "use_bias": False}
        inter = self.cfg.intermediate_size
        gate = dense(inter, axes=("embed", "mlp"), name="gate_proj", **kw)(x)
        up = dense(inter, axes=("embed", "mlp"), name="up_proj", **kw)(x)
        h = nn.with_logical_constraint(
            nn.silu(gate) * up, ("activation_batch", "activation_length", "activation_mlp")
        )
        return dense(self.cfg.hidden_size, axes=("mlp", "embed"), name="down_proj", **kw)(h)


class Qwen2DecoderLayer(nn.Module):
    cfg: TextConfig
    dtype: jnp.dtype
    param_dtype: jnp.dtype
    attention_impl: str = "xla"
    kv_cache: str = "none"

    @nn.compact
    def __call__(self, x, cos, sin, segment_ids, cache=None, kv_segment_ids=None, cache_index=None):
        """(x, None) on the training path; (x, (k, v)) with a kv_cache mode (scan outputs)."""
        cfg, kw = self.cfg, {"dtype": self.dtype, "param_dtype": self.param_dtype}
        h = RMSNorm(cfg.rms_norm_eps, self.param_dtype, name="input_layernorm")(x)
        attn = Qwen2Attention(
            cfg, **kw, attention_impl=self.attention_impl, kv_cache=self.kv_cache, name="self_attn"
        )
        kv = None
        if self.kv_cache == "none":
            h = attn(h, cos, sin, segment_ids)
        else:
            h, kv = attn(h, cos, sin, segment_ids, cache, kv_segment_ids, cache_index)
        x = nn.with_logical_constraint(x + h, _ACT)
        h = RMSNorm(cfg.rms_norm_eps, self.param_dtype, name="post_attention_layernorm")(x)
        h = Qwen2MLP(cfg, **kw, name="mlp")(h)
        return nn.with_logical_constraint(x + h, _ACT), kv


class Qwen2Model(nn.Module):
    """Embeddings, stacked decoder layers, final norm and (untied) lm_head.

    Call `embed(tokens)` for input embeddings, `__call__(embeds, positions,
    segment_ids)` for final hidden states float[B, T, H], `logits(hidden)` for
    float32[B, T, V].
    """

    cfg: TextConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    remat: str = "none"
    attention_impl: str = "xla"
    kv_cache: str = "none"  # "prefill" / "decode": use `forward_with_cache` (same params)

    def setup(self):
        cfg = self.cfg
        if self.kv_cache not in KV_CACHE_MODES:
            raise ValueError(f"kv_cache {self.kv_cache!r} not in {KV_CACHE_MODES}")
        init = nn.with_logical_partitioning
        self.embed_tokens = nn.Embed(
            cfg.vocab_size,
            cfg.hidden_size,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            embedding_init=init(nn.initializers.normal(0.02), ("vocab", "embed")),
        )
        layer_kw = {"cfg": cfg, "dtype": self.dtype, "param_dtype": self.param_dtype}
        if self.kv_cache == "decode":
            # The stacked cache is scanned with the params (axis 0 = layer); the rest is shared.
            self.layers = nn.scan(
                Qwen2DecoderLayer,
                variable_axes={"params": 0},
                split_rngs={"params": True},
                in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, 0, nn.broadcast, nn.broadcast),
                length=cfg.num_layers,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )(name="layers", kv_cache="decode", **layer_kw)
        else:
            self.layers = scanned(
                Qwen2DecoderLayer,
                remat=self.remat,
                length=cfg.num_layers,
                name="layers",
                attention_impl=self.attention_impl,
                kv_cache=self.kv_cache,
                **layer_kw,
            )
        self.norm = RMSNorm(cfg.rms_norm_eps, self.param_dtype)
        if not cfg.tie_word_embeddings:
            self.lm_head = _HeadKernel(cfg.hidden_size, cfg.vocab_size, self.param_dtype)

    def embed(self, tokens: jax.Array) -> jax.Array:
        return self.embed_tokens(tokens)

    def __call__(self, embeds: jax.Array, positions: jax.Array, segment_ids: jax.Array):
        cos, sin = rope_cos_sin(positions, self.cfg.head_dim, self.cfg.rope_theta, self.dtype)
        x = nn.with_logical_constraint(embeds.astype(self.dtype), _ACT)
        x, _ = self.layers(x, cos, sin, segment_ids)
        return self.norm(x)

    def forward_with_cache(
        self, embeds, positions, segment_ids, cache=None, kv_segment_ids=None, cache_index=None
    ):
        """Hidden states float[B, T, H] and the stacked keys/values, per `kv_cache` mode.

        prefill: returns (hidden, (k, v)) with k, v dtype[L_layers, B, T, K, Dh]; segment_ids
            int32[B, T] masks padding (0) as in `__call__`.
        decode: cache (k, v) dtype[L_layers, B, S_max, K, Dh]; the T new tokens go to slots
            cache_index..cache_index+T-1; kv_segment_ids int32[B, S_max] labels the slots
            (0 = padding); returns (hidden, updated cache).
        """
        if self.kv_cache == "none":
            raise ValueError("forward_with_cache needs kv_cache='prefill' or 'decode'")
        cos, sin = rope_cos_sin(positions, self.cfg.head_dim, self.cfg.rope_theta, self.dtype)
        x = nn.with_logical_constraint(embeds.astype(self.dtype), _ACT)
        if self.kv_cache == "prefill":
            x, kv = self.layers(x, cos, sin, segment_ids)
        else:
            x, kv = self.layers(x, cos, sin, segment_ids, cache, kv_segment_ids, cache_index)
        kv = tuple(nn.with_logical_constraint(t, CACHE_AXES) for t in kv)
        return self.norm(x), kv

    def head_kernel(self) -> jax.Array:
        """The output projection as float[H, V] (tied: embed_tokens transposed)."""
        if self.cfg.tie_word_embeddings:
            return self.embed_tokens.embedding.T
        return self.lm_head()

    def logits(self, hidden: jax.Array) -> jax.Array:
        kernel = self.head_kernel().astype(self.dtype)
        out = jnp.einsum("BTH,HV->BTV", hidden, kernel, preferred_element_type=jnp.float32)
        return nn.with_logical_constraint(
            out, ("activation_batch", "activation_length", "activation_vocab")
        )


class _HeadKernel(nn.Module):
    """Holds the untied `lm_head/kernel` float[H, V] (HF lm_head.weight transposed)."""

    hidden_size: int
    vocab_size: int
    param_dtype: jnp.dtype

    @nn.compact
    def __call__(self) -> jax.Array:
        init = nn.with_logical_partitioning(nn.initializers.normal(0.02), ("embed", "vocab"))
        return self.param("kernel", init, (self.hidden_size, self.vocab_size), self.param_dtype)
