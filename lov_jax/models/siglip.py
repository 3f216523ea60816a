"""SigLIP vision tower as OneVision uses it (docs/reference.md 1.1).

Features are the output of the last (26th) encoder layer BEFORE
`post_layernorm`; `post_layernorm` params are kept only so checkpoints round-trip
exactly (TGI once applied them by mistake: docs/reference.md 11.5). The encoder is
the shared pre-LN ViT (lov_jax/models/vit.py) with tanh GELU.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from lov_jax.config import VisionConfig
from lov_jax.models.layers import LayerNorm
from lov_jax.models.vit import ACT, Encoder, PatchEmbedding, normalize_pixels


class SiglipVisionTower(nn.Module):
    """pixels [B, 384, 384, 3] (uint8 or normalised float) -> features [B, 729, D]."""

    cfg: VisionConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    remat: str = "none"

    @nn.compact
    def __call__(self, pixels: jax.Array) -> jax.Array:
        cfg = self.cfg
        x = normalize_pixels(pixels, cfg, self.dtype)
        embeddings = _Embeddings(cfg, self.dtype, self.param_dtype, name="embeddings")
        x = nn.with_logical_constraint(embeddings(x), ACT)
        x = Encoder(cfg, self.dtype, self.param_dtype, self.remat, name="encoder")(x)
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
        patches = PatchEmbedding(cfg, self.dtype, self.param_dtype, name="patch_embedding")(x)
        pos = nn.Embed(
            cfg.num_patches,
            cfg.hidden_size,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            # std 1/sqrt(width) as HF's SiglipPreTrainedModel._init_weights (from scratch,
            # position is then a visible part of every patch, not 2% of it)
            embedding_init=init(
                nn.initializers.normal(cfg.hidden_size**-0.5), ("patches", "vision_embed")
            ),
            name="position_embedding",
        )
        return patches + pos.embedding.astype(self.dtype)[None]
