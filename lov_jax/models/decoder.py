"""The decoder-only LLM of every family: Qwen-2 (docs/reference.md 1.3), Llama (Vicuna,
Llama-3) and Mistral (docs/reference_family.md A.4), with segment-aware causal attention.

One module, two config switches: `TextConfig.attention_bias` (q/k/v biases: Qwen-2 yes,
Llama / Mistral no; o_proj and the MLP never have one) and `TextConfig.sliding_window`
(Mistral: a query sees its W most recent keys, HF's `create_sliding_window_causal_mask`,
in training, prefill and cached decode alike; None = full causal). Everything else (pre
RMSNorm, SwiGLU, rotate_half RoPE, GQA, untied or tied head) is shared.

Differences from HF's layout: projection kernels are stored head-split
(`q_proj.kernel: [H, N, Dh]`, `o_proj.kernel: [N, Dh, H]`) and layers are
stacked on a leading axis; the converter reshapes/stacks.

One call for training, prefill and decode (docs/style.md 17): `cache=None` is the training
path; with a `KVCache` (lov_jax/models/kv_cache.py) the same params write the new
tokens' keys/values into it and return `(out, new_cache)`.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from lov_jax.config import TextConfig
from lov_jax.models import ring
from lov_jax.models.attention import dot_product_attention
from lov_jax.models.kv_cache import CACHE_AXES, KVCache
from lov_jax.models.layers import RMSNorm, dense, scanned
from lov_jax.models.rope import rope_cos_sin

_ACT = ("activation_batch", "activation_length", "activation_embed")
# What an LLM call returns: final-norm hidden states float[B, T, H], logits float32[B, T, V],
# or the logits of the last position only float32[B, 1, V] (left-padded prompts).
OUTPUTS = ("hidden", "logits", "last_logits")


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Non-interleaved rotate_half RoPE: x [B, T, N, Dh], cos/sin [B, T, Dh]."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[:, :, None, :] + rotated * sin[:, :, None, :]


class Attention(nn.Module):
    cfg: TextConfig
    dtype: jnp.dtype
    param_dtype: jnp.dtype
    attention_impl: str = "xla"

    @nn.compact
    def __call__(self, x, cos, sin, segment_ids, kv=None, kv_segment_ids=None, index=None):
        """x [B, T, H] -> ([B, T, H], this layer's updated (k, v) or None).

        kv: None (training) or this layer's cache (k, v) dtype[B, S, K, Dh] with slot labels
        `kv_segment_ids` int32[B, S] and write slot `index` (None: empty, see KVCache).
        """
        cfg, kw = self.cfg, {"dtype": self.dtype, "param_dtype": self.param_dtype}
        nh, kvh, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        qkv = {**kw, "use_bias": cfg.attention_bias}
        q = dense((nh, hd), axes=("embed", "q_heads", "head_dim"), name="q_proj", **qkv)(x)
        k = dense((kvh, hd), axes=("embed", "kv_heads", "head_dim"), name="k_proj", **qkv)(x)
        v = dense((kvh, hd), axes=("embed", "kv_heads", "head_dim"), name="v_proj", **qkv)(x)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)  # [B, T, N|K, Dh]
        new_kv = None
        if kv is not None:
            update = jax.lax.dynamic_update_slice_in_dim
            start = 0 if index is None else index
            new_kv = tuple(
                update(c, t.astype(c.dtype), start, axis=1) for c, t in zip(kv, (k, v), strict=True)
            )
        if (kv is None or index is None) and ring.context_size() > 1:  # T over `context`
            out = ring.context_attention(
                q, k, v, segment_ids=segment_ids, causal=True, sliding_window=cfg.sliding_window,
                impl=self.attention_impl,
            )  # fmt: skip
        elif kv is None or index is None:
            out = dot_product_attention(
                q, k, v, q_segment_ids=segment_ids, kv_segment_ids=segment_ids, causal=True,
                sliding_window=cfg.sliding_window, impl=self.attention_impl,
            )  # fmt: skip
        else:
            k, v = (t.astype(q.dtype) for t in new_kv)
            out = dot_product_attention(
                q, k, v, q_segment_ids=segment_ids, kv_segment_ids=kv_segment_ids, causal=True,
                q_offset=index, sliding_window=cfg.sliding_window, impl="xla",
            )  # fmt: skip
        out = nn.with_logical_constraint(
            out, ("activation_batch", "activation_length", "activation_heads", None)
        )
        out = dense(
            cfg.hidden_size, axes=("q_heads", "head_dim", "embed"), in_axes=(-2, -1),
            use_bias=False, name="o_proj", **kw,
        )(out)  # fmt: skip
        return out, new_kv


class MLP(nn.Module):
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


class DecoderLayer(nn.Module):
    cfg: TextConfig
    dtype: jnp.dtype
    param_dtype: jnp.dtype
    attention_impl: str = "xla"

    @nn.compact
    def __call__(self, x, cos, sin, segment_ids, kv=None, kv_segment_ids=None, index=None):
        """(x, this layer's updated (k, v) or None): the scan's carry and per-layer output."""
        cfg, kw = self.cfg, {"dtype": self.dtype, "param_dtype": self.param_dtype}
        h = RMSNorm(cfg.rms_norm_eps, self.param_dtype, name="input_layernorm")(x)
        attn = Attention(cfg, **kw, attention_impl=self.attention_impl, name="self_attn")
        h, kv = attn(h, cos, sin, segment_ids, kv, kv_segment_ids, index)
        x = nn.with_logical_constraint(x + h, _ACT)
        h = RMSNorm(cfg.rms_norm_eps, self.param_dtype, name="post_attention_layernorm")(x)
        h = MLP(cfg, **kw, name="mlp")(h)
        return nn.with_logical_constraint(x + h, _ACT), kv


class Decoder(nn.Module):
    """Embeddings, stacked decoder layers, final norm and (untied) lm_head.

    The LLM-family interface (lov_jax/models/families.py): `embed_tokens` (nn.Embed),
    one `__call__` and `head_kernel()` for the chunked loss.
    """

    cfg: TextConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    remat: str = "none"
    attention_impl: str = "xla"

    def setup(self):
        cfg = self.cfg
        init = nn.with_logical_partitioning
        self.embed_tokens = nn.Embed(
            cfg.vocab_size,
            cfg.hidden_size,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            embedding_init=init(nn.initializers.normal(0.02), ("vocab", "embed")),
        )
        # (cos, sin, segment_ids) broadcast; the cache's (k, v) scanned on the layer axis;
        # its slot labels and write index broadcast.
        bcast = nn.broadcast
        self.layers = scanned(
            DecoderLayer,
            remat=self.remat,
            length=cfg.num_layers,
            name="layers",
            in_axes=(bcast, bcast, bcast, 0, bcast, bcast),
            cfg=cfg,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            attention_impl=self.attention_impl,
        )
        self.norm = RMSNorm(cfg.rms_norm_eps, self.param_dtype)
        if not cfg.tie_word_embeddings:
            self.lm_head = _HeadKernel(cfg.hidden_size, cfg.vocab_size, self.param_dtype)

    def __call__(
        self,
        inputs: jax.Array,
        positions: jax.Array,
        segment_ids: jax.Array,
        cache: KVCache | None = None,
        *,
        output: str = "logits",
    ):
        """inputs: int32[B, T] token ids or float[B, T, H] input embeddings.

        positions, segment_ids: int32[B, T] (RoPE positions; 1..S per packed sample, 0 =
        padding). Returns the `output` (one of OUTPUTS) and, when a cache is given, the
        cache holding the T new tokens at slots index..index+T-1 as well.
        """
        if output not in OUTPUTS:
            raise ValueError(f"output {output!r} not in {OUTPUTS}")
        x = inputs
        if jnp.issubdtype(x.dtype, jnp.integer):
            x = self.embed_tokens(x)
        cos, sin = rope_cos_sin(positions, self.cfg, self.dtype)  # cfg.rope_scaling applied
        x = nn.with_logical_constraint(x.astype(self.dtype), _ACT)
        kv, kv_seg, index = (None, None, None) if cache is None else (
            (cache.k, cache.v), cache.segment_ids, cache.index
        )  # fmt: skip
        x, new_kv = self.layers(x, cos, sin, segment_ids, kv, kv_seg, index)
        x = self.norm(x)
        if self.is_initializing():
            self.head_kernel()  # create the untied lm_head whatever the output
        if output != "hidden":
            x = self._logits(x[:, -1:] if output == "last_logits" else x)
        if cache is None:
            return x
        k, v = (nn.with_logical_constraint(t, CACHE_AXES) for t in new_kv)
        return x, cache.written(k, v, inputs.shape[1])

    def head_kernel(self) -> jax.Array:
        """The output projection as float[H, V] (tied: embed_tokens transposed)."""
        if self.cfg.tie_word_embeddings:
            return self.embed_tokens.embedding.T
        return self.lm_head()

    def _logits(self, hidden: jax.Array) -> jax.Array:
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
