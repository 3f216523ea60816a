"""SigLIP vision tower as OneVision uses it (REFERENCE.md 1.1).

Features are the output of the last (26th) encoder layer BEFORE
`post_layernorm`; `post_layernorm` params are kept only so checkpoints round-trip
exactly (TGI once applied them by mistake: REFERENCE.md 11.5).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from lov_jax.config import VisionConfig
from lov_jax.models.attention import dot_product_attention
from lov_jax.models.layers import LayerNorm, dense, scanned

_ACT = ("activation_batch", "activation_length", "activation_embed")


def normalize_pixels(pixels: jax.Array, dtype: jnp.dtype) -> jax.Array:
    """uint8[..., 3] -> (x/255 - 0.5)/0.5 in fp32 like HF's rescale+normalize; floats pass."""
    if pixels.dtype == jnp.uint8:
        x = pixels.astype(jnp.float32) * jnp.float32(1 / 255)
        pixels = (x - 0.5) / 0.5
    return pixels.astype(dtype)


class SiglipVisionTower(nn.Module):
    """pixels [B, 384, 384, 3] (uint8 or normalised float) -> features [B, 729, D]."""

    cfg: VisionConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    remat: str = "none"

    @nn.compact
    def __call__(self, pixels: jax.Array) -> jax.Array:
        cfg = self.cfg
        x = normalize_pixels(pixels, self.dtype)
        embeddings = _Embeddings(cfg, self.dtype, self.param_dtype, name="embeddings")
        x = nn.with_logical_constraint(embeddings(x), _ACT)
        encoder = _Encoder(cfg, self.dtype, self.param_dtype, self.remat, name="encoder")
        x = encoder(x)
        # post_layernorm exists only for exact checkpoint round trips: OneVision's features
        # are taken before it. Its output is discarded here (and dead-code-eliminated).
        LayerNorm(cfg.layer_norm_eps, self.param_dtype, name="post_layernorm")(x)
        return x


class _Embeddings(nn.Module):
    cfg: VisionConfig
    dtype: jnp.dtype
    param_dtype: jnp.dtype

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.cfg
        init = nn.with_logical_partitioning
        patches = nn.Conv(
            cfg.hidden_size,
            kernel_size=(cfg.patch_size, cfg.patch_size),
            strides=(cfg.patch_size, cfg.patch_size),
            padding="VALID",  # 27*14 = 378: the last 6 pixel rows/cols are never seen
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=init(
                nn.initializers.lecun_normal(), ("conv_height", "conv_width", "channels", "embed")
            ),
            bias_init=init(nn.initializers.zeros_init(), ("embed",)),
            name="patch_embedding",
        )(x)  # [B, 27, 27, D]
        b = patches.shape[0]
        patches = patches.reshape(b, cfg.num_patches, cfg.hidden_size)  # row-major y*27+x
        pos = nn.Embed(
            cfg.num_patches,
            cfg.hidden_size,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            # std 1/sqrt(width) as HF's SiglipPreTrainedModel._init_weights (from scratch,
            # position is then a visible part of every patch, not 2% of it)
            embedding_init=init(
                nn.initializers.normal(cfg.hidden_size**-0.5), ("patches", "embed")
            ),
            name="position_embedding",
        )
        return patches + pos.embedding.astype(self.dtype)[None]


class _Encoder(nn.Module):
    cfg: VisionConfig
    dtype: jnp.dtype
    param_dtype: jnp.dtype
    remat: str

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        layers = scanned(
            SiglipEncoderLayer,
            remat=self.remat,
            length=self.cfg.num_layers,
            name="layers",
            cfg=self.cfg,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
        )
        x, _ = layers(x, None)
        return x


class SiglipEncoderLayer(nn.Module):
    """Pre-LN block with HF's param nesting (layer_norm1, self_attn.*, layer_norm2, mlp.*)."""

    cfg: VisionConfig
    dtype: jnp.dtype
    param_dtype: jnp.dtype

    @nn.compact
    def __call__(self, x: jax.Array, _=None) -> tuple[jax.Array, None]:
        cfg, kw = self.cfg, {"dtype": self.dtype, "param_dtype": self.param_dtype}
        h = LayerNorm(cfg.layer_norm_eps, self.param_dtype, name="layer_norm1")(x)
        x = nn.with_logical_constraint(x + _SelfAttention(cfg, **kw, name="self_attn")(h), _ACT)
        h = LayerNorm(cfg.layer_norm_eps, self.param_dtype, name="layer_norm2")(x)
        return nn.with_logical_constraint(x + _MLP(cfg, **kw, name="mlp")(h), _ACT), None


class _SelfAttention(nn.Module):
    cfg: VisionConfig
    dtype: jnp.dtype
    param_dtype: jnp.dtype

    @nn.compact
    def __call__(self, h: jax.Array) -> jax.Array:
        cfg, kw = self.cfg, {"dtype": self.dtype, "param_dtype": self.param_dtype}
        shape, axes = (cfg.num_heads, cfg.head_dim), ("embed", "heads", "head_dim")
        q = dense(shape, axes=axes, name="q_proj", **kw)(h)  # [B, T, N, H]
        k = dense(shape, axes=axes, name="k_proj", **kw)(h)
        v = dense(shape, axes=axes, name="v_proj", **kw)(h)
        out = dot_product_attention(q, k, v)  # bidirectional within one crop
        return dense(
            cfg.hidden_size, axes=("heads", "head_dim", "embed"), in_axes=(-2, -1),
            name="out_proj", **kw,
        )(out)  # fmt: skip


class _MLP(nn.Module):
    cfg: VisionConfig
    dtype: jnp.dtype
    param_dtype: jnp.dtype

    @nn.compact
    def __call__(self, h: jax.Array) -> jax.Array:
        kw = {"dtype": self.dtype, "param_dtype": self.param_dtype}
        h = dense(self.cfg.intermediate_size, axes=("embed", "mlp"), name="fc1", **kw)(h)
        h = nn.gelu(h, approximate=True)  # gelu_pytorch_tanh
        return dense(self.cfg.hidden_size, axes=("mlp", "embed"), name="fc2", **kw)(h)
