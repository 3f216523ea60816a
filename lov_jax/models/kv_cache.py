"""The KV cache every LLM family's one `__call__(..., cache=None)` reads and returns.

    k, v         dtype[L_layers, B, S, K, Dh]  post-RoPE keys / values, stacked like the
                                               params (the layer scan slices axis 0)
    segment_ids  int32[B, S]                   slot labels (0 = padding, never attended)
    index        int32[] | None                slot the next tokens are written at

`index=None` is an empty cache (static: part of the pytree structure, so jit and scan
keep it): the T new tokens go to slots 0..T-1 and attend each other only, with any
attention kernel (splash on TPU). That equals attending the whole cache, because every
later slot is causally masked. With an index, queries attend the whole cache causally
from their slot (the XLA kernel, which takes a traced offset).
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

# Logical names of a stacked cache tensor [L_layers, B, S, K, Dh].
CACHE_AXES = ("layers", "activation_batch", "activation_length", "activation_heads", "head_dim")


@flax.struct.dataclass
class KVCache:
    k: jax.Array
    v: jax.Array
    segment_ids: jax.Array
    index: jax.Array | None = None

    @classmethod
    def empty(
        cls, num_layers: int, segment_ids: jax.Array, kv_heads: int, head_dim: int, dtype
    ) -> KVCache:
        """Zeros for `segment_ids` int32[B, S] slots; nothing written yet (index None)."""
        b, s = segment_ids.shape
        zeros = jnp.zeros((num_layers, b, s, kv_heads, head_dim), dtype)
        return cls(zeros, zeros, segment_ids, None)

    @property
    def length(self) -> int:
        return self.k.shape[2]

    def written(self, k: jax.Array, v: jax.Array, count: int) -> KVCache:
        """The cache after a call that wrote `count` tokens at `index` (k, v: new stacks)."""
        start = jnp.int32(0) if self.index is None else self.index
        return self.replace(k=k, v=v, index=start + count)
