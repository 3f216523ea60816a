"""One attention interface, several kernels.

Layouts (letters as in the einsums): B batch, T query length, S key length,
N query heads, K kv heads (GQA: N = K * G), H head dim.

    q: float[B, T, N, H]   k, v: float[B, S, K, H]   ->   out: float[B, T, N, H]

Masking for packed rows: a query attends a key iff both carry the same
segment id and (if causal) the key's row index is <= the query's row index
plus `q_offset` (the cache slot of the first query during decode) and, with a
`sliding_window` W (Mistral), the key is one of the W most recent: query index (plus
`q_offset`) minus key index < W, as HF's `sliding_window_overlay`. Segment 0
is padding; padding attends padding only, so no row is fully masked and no
softmax produces NaN (its outputs are never used).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Finite mask value: exp(-0.7 * f32max - max) underflows to exactly 0 while
# fully-masked rows stay finite.
_MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def attention_mask(
    q_segment_ids: jax.Array | None,
    kv_segment_ids: jax.Array | None,
    *,
    q_len: int,
    kv_len: int,
    causal: bool,
    q_offset: jax.Array | int = 0,
    sliding_window: int | None = None,
) -> jax.Array | None:
    """bool[B or 1, T, S] mask (True = attend), or None when nothing is masked."""
    if sliding_window is not None and (not causal or sliding_window < 1):
        raise ValueError(f"sliding_window={sliding_window} needs causal=True and W >= 1")
    mask = None
    if q_segment_ids is not None:
        mask = q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]
    if causal:
        q_idx = jnp.arange(q_len)[None, :, None] + jnp.reshape(jnp.asarray(q_offset), (-1, 1, 1))
        kv_idx = jnp.arange(kv_len)[None, None, :]
        causal_mask = kv_idx <= q_idx
        if sliding_window is not None:
            causal_mask = causal_mask & (kv_idx > q_idx - sliding_window)
        mask = causal_mask if mask is None else mask & causal_mask
    return mask


def xla_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: jax.Array | None,
) -> jax.Array:
    """Reference kernel: fp32 logits and softmax, GQA by grouping query heads."""
    b, t, n, h = q.shape
    kv_heads = k.shape[2]
    q = q.reshape(b, t, kv_heads, n // kv_heads, h)  # [B, T, K, G, H]
    logits = jnp.einsum("BTKGH,BSKH->BKGTS", q, k, preferred_element_type=jnp.float32)
    logits = logits * (h**-0.5)
    if mask is not None:
        logits = jnp.where(mask[:, None, None, :, :], logits, _MASK_VALUE)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum("BKGTS,BSKH->BTKGH", probs, v)
    return out.reshape(b, t, n, h)


def dot_product_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    q_segment_ids: jax.Array | None = None,
    kv_segment_ids: jax.Array | None = None,
    causal: bool = False,
    q_offset: jax.Array | int = 0,
    sliding_window: int | None = None,
    impl: str = "xla",
) -> jax.Array:
    """Segment-masked (optionally causal, optionally windowed) attention; see the module
    docstring. `sliding_window=None` is full causal attention."""
    if (q_segment_ids is None) != (kv_segment_ids is None):
        raise ValueError("pass both q_segment_ids and kv_segment_ids, or neither")
    if impl == "splash":
        from lov_jax.models import splash

        if not isinstance(q_offset, int) or q_offset:
            raise ValueError("impl='splash' has no q_offset (cached decode): use impl='xla'")
        if sliding_window is not None:
            raise ValueError("impl='splash' has no sliding_window here yet: use impl='xla'")

        return splash.splash_attention(
            q, k, v, q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids, causal=causal
        )
    if impl != "xla":
        raise ValueError(f"unknown attention impl {impl!r}")
    mask = attention_mask(
        q_segment_ids,
        kv_segment_ids,
        q_len=q.shape[1],
        kv_len=k.shape[1],
        causal=causal,
        q_offset=q_offset,
        sliding_window=sliding_window,
    )
    return xla_attention(q, k, v, mask)
