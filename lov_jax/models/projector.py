"""`mlp2x_gelu` projector: Linear(D -> H) -> exact-erf GELU -> Linear(H -> H)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from lov_jax.models.layers import dense


class MultiModalProjector(nn.Module):
    hidden_size: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """float[..., D] -> float[..., H], applied per crop before any unpad/resize."""
        kw = {"dtype": self.dtype, "param_dtype": self.param_dtype}
        x = dense(self.hidden_size, axes=("embed", "mlp"), name="linear_1", **kw)(x)
        x = nn.gelu(x, approximate=False)  # HF projector_hidden_act="gelu" (erf)
        return dense(self.hidden_size, axes=("mlp", "embed"), name="linear_2", **kw)(x)
