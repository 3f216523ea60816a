"""The pre-LN ViT pieces SigLIP and CLIP share (lov_jax/models/{siglip,clip}.py).

HF's param nesting (`embeddings.patch_embedding`, `encoder.layers.N.{layer_norm1, self_attn,
layer_norm2, mlp}`), so the key tables are close to identity. The towers differ only in
their embeddings (CLIP: class token, pre-LN, no conv bias), the MLP activation
(`VisionConfig.hidden_act`) and the pixel statistics (`image_mean` / `image_std`).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from lov_jax.config import VisionConfig
from lov_jax.models.attention import dot_product_attention
from lov_jax.models.layers import LayerNorm, dense, scanned

# Crops (B * N) over data x fsdp x context: the context axis shares the tower's work too.
ACT = ("activation_crops", "activation_patches", "activation_embed")

_ACTIVATIONS = {
    "gelu_pytorch_tanh": lambda x: nn.gelu(x, approximate=True),
    "gelu": lambda x: nn.gelu(x, approximate=False),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),  # HF QuickGELUActivation
}


def normalize_pixels(pixels: jax.Array, cfg: VisionConfig, dtype: jnp.dtype) -> jax.Array:
    """uint8[..., C] -> (x/255 - mean)/std in fp32 like HF's rescale + normalize; floats
    (already normalised) pass through."""
    if pixels.dtype == jnp.uint8:
        x = pixels.astype(jnp.float32) * jnp.float32(1 / 255)
        mean = jnp.asarray(cfg.image_mean, jnp.float32)
        std = jnp.asarray(cfg.image_std, jnp.float32)
        pixels = (x - mean) / std
    return pixels.astype(dtype)


class PatchEmbedding(nn.Module):
    """A p x p stride-p "VALID" conv, computed as patchify + one matmul.

    Same parameters as `nn.Conv` (kernel [p, p, C, D], bias [D] when `use_bias`, same init)
    and the same result up to fp32 summation order; XLA:CPU ran the conv's weight gradient
    as one slow convolution (~30% of the demo's train step). Pixels past the last whole
    patch are unseen (SigLIP-384: 27*14 = 378).
    """

    cfg: VisionConfig
    dtype: jnp.dtype
    param_dtype: jnp.dtype
    use_bias: bool = True

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg, p = self.cfg, self.cfg.patch_size
        init = nn.with_logical_partitioning
        channels = x.shape[-1]
        kernel_axes = ("conv_height", "conv_width", "channels", "vision_embed")
        kernel = self.param(
            "kernel",
            init(nn.initializers.lecun_normal(), kernel_axes),
            (p, p, channels, cfg.hidden_size),
            self.param_dtype,
        )
        b, n = x.shape[0], x.shape[1] // p
        x = x[:, : n * p, : n * p].astype(self.dtype)
        # [B, n, p, n, p, C] -> [B, n (y), n (x), p (py), p (px), C]: one patch per row, its
        # pixels in the kernel's (py, px, c) order
        x = x.reshape(b, n, p, n, p, channels).transpose(0, 1, 3, 2, 4, 5)
        x = x.reshape(b, n * n, p * p * channels)
        w = jnp.asarray(kernel, self.dtype).reshape(p * p * channels, cfg.hidden_size)
        x = x @ w  # [B, n*n, D], row-major y*n+x
        if self.use_bias:
            bias = self.param(
                "bias", init(nn.initializers.zeros_init(), ("vision_embed",)), (cfg.hidden_size,),
                self.param_dtype,
            )  # fmt: skip
            x = x + jnp.asarray(bias, self.dtype)
        return x


class Encoder(nn.Module):
    """`cfg.num_layers` scanned `EncoderLayer`s (stacked params under `layers`)."""

    cfg: VisionConfig
    dtype: jnp.dtype
    param_dtype: jnp.dtype
    remat: str

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        layers = scanned(
            EncoderLayer,
            remat=self.remat,
            length=self.cfg.num_layers,
            name="layers",
            cfg=self.cfg,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
        )
        x, _ = layers(x, None)
        return x


class EncoderLayer(nn.Module):
    """Pre-LN block: x + attn(ln1(x)), then + mlp(ln2(x)); bidirectional within a crop."""

    cfg: VisionConfig
    dtype: jnp.dtype
    param_dtype: jnp.dtype

    @nn.compact
    def __call__(self, x: jax.Array, _=None) -> tuple[jax.Array, None]:
        cfg, kw = self.cfg, {"dtype": self.dtype, "param_dtype": self.param_dtype}
        h = LayerNorm(cfg.layer_norm_eps, self.param_dtype, name="layer_norm1")(x)
        x = nn.with_logical_constraint(x + _SelfAttention(cfg, **kw, name="self_attn")(h), ACT)
        h = LayerNorm(cfg.layer_norm_eps, self.param_dtype, name="layer_norm2")(x)
        return nn.with_logical_constraint(x + _MLP(cfg, **kw, name="mlp")(h), ACT), None


class _SelfAttention(nn.Module):
    cfg: VisionConfig
    dtype: jnp.dtype
    param_dtype: jnp.dtype

    @nn.compact
    def __call__(self, h: jax.Array) -> jax.Array:
        cfg, kw = self.cfg, {"dtype": self.dtype, "param_dtype": self.param_dtype}
        shape, axes = (cfg.num_heads, cfg.head_dim), ("vision_embed", "vision_heads", "head_dim")
        q = dense(shape, axes=axes, name="q_proj", **kw)(h)  # [B, T, N, H]
        k = dense(shape, axes=axes, name="k_proj", **kw)(h)
        v = dense(shape, axes=axes, name="v_proj", **kw)(h)
        out = dot_product_attention(q, k, v)  # no mask: every position of one crop
        return dense(
            cfg.hidden_size, axes=("vision_heads", "head_dim", "vision_embed"), in_axes=(-2, -1),
            name="out_proj", **kw,
        )(out)  # fmt: skip


class _MLP(nn.Module):
    cfg: VisionConfig
    dtype: jnp.dtype
    param_dtype: jnp.dtype

    @nn.compact
    def __call__(self, h: jax.Array) -> jax.Array:
        kw = {"dtype": self.dtype, "param_dtype": self.param_dtype}
        h = dense(
            self.cfg.intermediate_size, axes=("vision_embed", "vision_mlp"), name="fc1", **kw
        )(h)
        h = _ACTIVATIONS[self.cfg.hidden_act](h)
        return dense(self.cfg.hidden_size, axes=("vision_mlp", "vision_embed"), name="fc2", **kw)(h)
