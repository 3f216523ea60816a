"""Next-token selection: greedy, or temperature -> top-k -> top-p sampling (HF's order).

All knobs but `greedy` are traced scalars, so changing them never recompiles.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_NEG_INF = -jnp.inf


def filter_logits(logits: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    """float32[B, V] -> the same with tokens outside top-k / top-p set to -inf.

    top_k <= 0 and top_p >= 1 disable the filters. top-p keeps the smallest set of the
    most likely tokens whose mass reaches top_p (at least one token), as HF's
    `TopPLogitsWarper` does; both thresholds come from one descending sort.
    """
    vocab = logits.shape[-1]
    desc = -jnp.sort(-logits, axis=-1)  # [B, V] descending
    k = jnp.clip(top_k, 1, vocab).astype(jnp.int32)
    kth = jnp.take_along_axis(desc, jnp.broadcast_to(k - 1, (logits.shape[0], 1)), axis=-1)
    use_k = top_k > 0
    logits = jnp.where(use_k & (logits < kth), _NEG_INF, logits)
    desc = jnp.where(use_k & (jnp.arange(vocab) >= k), _NEG_INF, desc)
    probs = jax.nn.softmax(desc, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass strictly above each sorted token
    keep = before < top_p
    keep = keep.at[:, 0].set(True)
    threshold = jnp.min(jnp.where(keep, desc, jnp.inf), axis=-1, keepdims=True)
    return jnp.where((top_p < 1.0) & (logits < threshold), _NEG_INF, logits)


def sample_logits(
    logits: jax.Array,
    rng: jax.Array,
    *,
    greedy: bool,
    temperature: jax.Array,
    top_k: jax.Array,
    top_p: jax.Array,
) -> jax.Array:
    """int32[B] next tokens from float32[B, V] logits; `greedy` is static (no sort, no rng)."""
    if greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / jnp.maximum(temperature, 1e-6)
    logits = filter_logits(logits, top_k, top_p)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)
