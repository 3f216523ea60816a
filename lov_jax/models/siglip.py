"""SigLIP vision tower as OneVision uses it (docs/reference.md 1.1).

Features are the output of the last (26th) encoder layer BEFORE
`post_layernorm`; `post_layernorm` params are kept only so checkpoints round-trip
exactly (TGI once applied them by mistake: docs/reference.md 11.5).
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
        patches = _PatchEmbedding(cfg, self.dtype, self.param_dtype, name="patch_embedding")(x)
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


class _PatchEmbedding(nn.Module):
    """SigLIP's 14x14 stride-14 "VALID" conv, computed as patchify + one matmul.

    Same parameters as `nn.Conv` (kernel [p, p, C, D], bias [D], same init) and the same
    result up to fp32 summation order; XLA:CPU ran the conv's weight gradient as one slow
    convolution (~30% of the demo's train step).
    """

    cfg: VisionConfig
    dtype: jnp.dtype
    param_dtype: jnp.dtype

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg, p = self.cfg, self.cfg.patch_size
        init = nn.with_logical_partitioning
        channels = x.shape[-1]
        kernel_axes = ("conv_height", "conv_width", "channels", "embed")
        kernel = self.param(
            "kernel",
            init(nn.initializers.lecun_normal(), kernel_axes),
            (p, p, channels, cfg.hidden_size),
            self.param_dtype,
        )
        bias = self.param(
            "bias", init(nn.initializers.zeros_init(), ("embed",)), (cfg.hidden_size,),
            self.param_dtype,
        )  # fmt: skip
        b, n = x.shape[0], x.shape[1] // p  # 27*14 = 378: the last 6 pixel rows/cols unseen
        x = x[:, : n * p, : n * p].astype(self.dtype)
        # [B, n, p, n, p, C] -> [B, n (y), n (x), p (py), p (px), C]: one patch per row, its
        # pixels in the kernel's (py, px, c) order
        x = x.reshape(b, n, p, n, p, channels).transpose(0, 1, 3, 2, 4, 5)
        x = x.reshape(b, n * n, p * p * channels)
        w = jnp.asarray(kernel, self.dtype).reshape(p * p * channels, cfg.hidden_size)
        return x @ w + jnp.asarray(bias, self.dtype)  # [B, n*n, D], row-major y*n+x


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
