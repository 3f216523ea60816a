"""Chunked next-token cross-entropy that never materialises float[B, L, V] logits.

The sequence is cut into chunks of `chunk_size` tokens; each chunk's logits are
computed in fp32, reduced to (logsumexp - target logit), and recomputed in the
backward pass (`jax.checkpoint`), so peak memory is O(B * chunk * V). A single chunk is
not rematerialised: its backward runs right after its forward, so the peak is the same.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp


def chunked_cross_entropy(
    hidden: jax.Array,
    head_kernel: jax.Array,
    targets: jax.Array,
    loss_mask: jax.Array,
    *,
    chunk_size: int = 1024,
    z_loss: float = 0.0,
    shards: int = 1,
) -> tuple[jax.Array, jax.Array]:
    """Summed masked CE and the mask total.

    hidden: float[B, L, H] final-norm states; head_kernel: float[H, V];
    targets: int32[B, L] (already shifted); loss_mask: float32[B, L].
    Returns (sum of loss_mask * CE (+ z_loss * logsumexp^2), sum of loss_mask), fp32.

    shards > 1 (the context axis, lov_jax/models/ring.py; L a multiple of it): each of
    the `shards` contiguous blocks of L is chunked on its own and the blocks stay
    sharded (`activation_length`), so every device projects only its own tokens. Both
    sums are over tokens, so the token order (zigzag) does not change them.
    """
    b, length, h = hidden.shape
    if length % shards:
        raise ValueError(f"loss over {shards} sequence shards needs L % {shards} == 0; L={length}")
    block = length // shards
    chunk = min(chunk_size, block)
    pad = (-block) % chunk
    n = (block + pad) // chunk

    def chunks(x):  # [B, L, ...] -> [n, B, shards, chunk, ...]: scan over chunks
        x = x.reshape(b, shards, block, *x.shape[2:])
        x = jnp.pad(x, [(0, 0), (0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 3))
        x = jnp.moveaxis(x.reshape(b, shards, n, chunk, *x.shape[3:]), 2, 0)
        if shards > 1:
            names = (None, "activation_batch", "activation_length", None, "activation_embed")
            x = nn.with_logical_constraint(x, names[: x.ndim])
        return x

    hs, ts = chunks(hidden), chunks(targets)
    ms = chunks(loss_mask.astype(jnp.float32))
    kernel = head_kernel.astype(hidden.dtype)

    def chunk_loss(h_c, t_c, m_c):
        logits = jnp.einsum("BSTH,HV->BSTV", h_c, kernel, preferred_element_type=jnp.float32)
        lse = jax.nn.logsumexp(logits, axis=-1)
        target_logit = jnp.take_along_axis(logits, t_c[..., None], axis=-1)[..., 0]
        per_token = lse - target_logit
        if z_loss:
            per_token = per_token + z_loss * jnp.square(lse)
        return jnp.sum(per_token * m_c)

    if n == 1:  # one chunk: its backward follows at once, so remat would only recompute
        return chunk_loss(hs[0], ts[0], ms[0]), jnp.sum(ms)
    chunk_loss = jax.checkpoint(chunk_loss)

    def body(total, xs):
        return total + chunk_loss(*xs), None

    total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32), (hs, ts, ms))
    return total, jnp.sum(ms)


def gather_trained_positions(
    hidden: jax.Array, targets: jax.Array, loss_mask: jax.Array, k: int
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Keep the first `k` trained positions of every row (in order), for the loss only.

    In VLM fine-tuning most positions are visual or prompt tokens with mask 0; the
    vocab projection then only runs on [B, k] instead of [B, L]. Exact as long as no
    row has more than k trained tokens: the caller checks that on the host
    (`lov_jax.train.loop`), never truncating silently.
    """
    order = jnp.argsort(loss_mask <= 0, axis=-1, stable=True)[:, :k]  # trained first
    take = lambda x: jnp.take_along_axis(x, order.reshape(order.shape + (1,) * (x.ndim - 2)), 1)  # noqa: E731
    return take(hidden), take(targets), take(loss_mask)
