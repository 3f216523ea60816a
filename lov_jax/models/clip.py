"""CLIP ViT vision tower as LLaVA-1.5 / LLaVA-NeXT use it (docs/reference_family.md A.2).

    pixels uint8[B, S, S, 3] -> normalise (OpenAI CLIP mean/std, fp32)
      -> conv patch embedding (no bias) -> [CLS, p_0 .. p_{P-1}] + position rows [P+1, D]
      -> pre_layrnorm (HF's spelling) -> `cfg.num_layers` pre-LN layers (quick_gelu)
      -> feature_select "default": drop CLS -> float[B, P, D]; "full": float[B, P+1, D]

The output is HF's `hidden_states[vision_feature_layer]`: the raw output of the last layer
RUN. Only the layers used are run and stored: LLaVA's `vision_feature_layer=-2` on CLIP-L's
24 layers is `num_layers=23` here (the converter drops layer 24; an export writes 23 layers
with `vision_feature_layer=-1`, which gives HF identical features).
`post_layernorm` is not stored: CLIP applies it to the pooled CLS only (`pooler_output`),
never to `hidden_states`, so LLaVA never uses it.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from lov_jax.config import VisionConfig
from lov_jax.models.layers import LayerNorm
from lov_jax.models.vit import ACT, Encoder, PatchEmbedding, normalize_pixels


class ClipVisionTower(nn.Module):
    """pixels [B, S, S, 3] (uint8 or normalised float) -> features [B, cfg.num_features, D]."""

    cfg: VisionConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    remat: str = "none"

    @nn.compact
    def __call__(self, pixels: jax.Array) -> jax.Array:
        cfg = self.cfg
        if tuple(pixels.shape[1:3]) != (cfg.image_size, cfg.image_size):
            # HF's CLIP refuses other sizes too (interpolate_pos_encoding=False)
            raise ValueError(
                f"CLIP tower takes {cfg.image_size}x{cfg.image_size} crops, got "
                f"{tuple(pixels.shape[1:3])}"
            )
        x = normalize_pixels(pixels, cfg, self.dtype)
        x = _Embeddings(cfg, self.dtype, self.param_dtype, name="embeddings")(x)
        x = LayerNorm(cfg.layer_norm_eps, self.param_dtype, name="pre_layrnorm")(x)
        x = nn.with_logical_constraint(x, ACT)
        x = Encoder(cfg, self.dtype, self.param_dtype, self.remat, name="encoder")(x)
        return x[:, 1:] if cfg.feature_select == "default" else x  # CLS is position 0


class _Embeddings(nn.Module):
    """[CLS, patches] + position rows: float[B, P + 1, D]."""

    cfg: VisionConfig
    dtype: jnp.dtype
    param_dtype: jnp.dtype

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.cfg
        init = nn.with_logical_partitioning
        std = nn.initializers.normal(cfg.hidden_size**-0.5)  # HF CLIPPreTrainedModel init
        patch = PatchEmbedding(
            cfg, self.dtype, self.param_dtype, use_bias=False, name="patch_embedding"
        )(x)  # [B, P, D]
        # a vector f[D] as HF stores it (not [1, 1, D])
        cls = self.param("class_embedding", init(std, ("vision_embed",)), (cfg.hidden_size,),
                         self.param_dtype)  # fmt: skip
        pos = nn.Embed(
            cfg.num_patches + 1,  # row 0: the CLS position
            cfg.hidden_size,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            embedding_init=init(std, ("patches", "vision_embed")),
            name="position_embedding",
        )
        b = patch.shape[0]
        cls = jnp.broadcast_to(jnp.asarray(cls, self.dtype), (b, 1, cfg.hidden_size))
        return jnp.concatenate([cls, patch], axis=1) + pos.embedding.astype(self.dtype)[None]
