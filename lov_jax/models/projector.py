"""Projectors from vision features float[..., D] to LLM embeddings float[..., H].

`mlp2x_gelu` (OneVision, HF LlavaMultiModalProjector): Linear(D -> H) -> exact-erf GELU ->
Linear(H -> H). `linear` (LLaVA-1.0 `mm_projector_type`): one Linear(D -> H), named
`linear_1` like the first layer of the MLP. Both run per crop, before any unpad/resize.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from lov_jax.models.layers import dense


class _Projector(nn.Module):
    """The projector-family constructor: (hidden_size H, dtype, param_dtype)."""

    hidden_size: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32


class MultiModalProjector(_Projector):
    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = {"dtype": self.dtype, "param_dtype": self.param_dtype}
        x = dense(self.hidden_size, axes=("vision_embed", "mlp"), name="linear_1", **kw)(x)
        x = nn.gelu(x, approximate=False)  # HF projector_hidden_act="gelu" (erf)
        return dense(self.hidden_size, axes=("mlp", "embed"), name="linear_2", **kw)(x)


class LinearProjector(_Projector):
    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = {"dtype": self.dtype, "param_dtype": self.param_dtype}
        return dense(self.hidden_size, axes=("vision_embed", "mlp"), name="linear_1", **kw)(x)
