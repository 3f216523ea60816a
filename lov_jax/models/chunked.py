"""Blockwise (online-softmax) attention in plain XLA: memory linear in the sequence length.

Layouts as in `lov_jax.models.attention` (B batch, T query length, S key length, N query
heads, K kv heads with N = K * G, H head dim):

    q: float[B, T, N, H]   k, v: float[B, S, K, H]   ->   out: float[B, T, N, H]

The rows are cut into query blocks of `block_q` and key blocks of `block_k` (the last
block of each is padded; padded keys match no query). For every query block a scan over
the key blocks keeps, per query row and head, fp32 running statistics (FlashAttention's
online softmax; docs/reference.md "online softmax merge"):

    max  m = max_s logit_s          sum  l = sum_s exp(logit_s - m)
    out  o = sum_s exp(logit_s - m) v_s    (unnormalised)

and two partial results merge exactly (`merge`). So no more than one
float32[B, block_q, N, block_k] logits tile is live at a time. The backward
(`jax.custom_vjp`, FlashAttention-2) recomputes each tile from the saved
logsumexp instead of storing probabilities: residuals are q, k, v, out and lse only.

Tiles that no query of the block can attend (above the causal diagonal, left of the
sliding window, or whose segment-id ranges do not overlap in any row) are skipped with
`lax.cond`, forward and backward. The mask inside a tile is `attention.attention_mask`
with the tile's offset, so masking is the reference's exactly; rows with no key at all
(only ever our own padded query rows) give 0.

The per-tile pieces (`attend_block`, `merge`, `finish`, `block_grads`) are public so
that context parallelism (ring attention over a `context` mesh axis) can run one tile
per ring step and merge the results with the same code.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from lov_jax.models.attention import MASK_VALUE, attention_mask, check_window

DEFAULT_BLOCK = 512
# Segment ids given to padded query rows / key columns: they match no real id (>= 0).
_PAD_Q, _PAD_KV = -1, -2


class Partial(NamedTuple):
    """Attention of query rows over part of the keys (fp32 online-softmax statistics)."""

    out: jax.Array  # float32[B, T, N, H]: sum_s exp(logit_s - max) v_s, unnormalised
    max: jax.Array  # float32[B, T, N]: largest unmasked logit (MASK_VALUE if none)
    sum: jax.Array  # float32[B, T, N]: sum_s exp(logit_s - max); 0 if nothing attended


def empty_partial(batch: int, q_len: int, heads: int, head_dim: int) -> Partial:
    """The partial over no keys: merging it changes nothing."""
    stats = jnp.full((batch, q_len, heads), MASK_VALUE, jnp.float32)
    return Partial(jnp.zeros((batch, q_len, heads, head_dim), jnp.float32), stats, stats * 0)


def _logits(q: jax.Array, k: jax.Array, mask: jax.Array | None) -> jax.Array:
    """Scaled fp32 logits float32[B, T, K, G, S], MASK_VALUE where masked."""
    b, t, n, h = q.shape
    kv_heads = k.shape[2]
    q = q.reshape(b, t, kv_heads, n // kv_heads, h)
    s = jnp.einsum("BTKGH,BSKH->BTKGS", q, k, preferred_element_type=jnp.float32)
    s = s * (h**-0.5)
    if mask is not None:
        s = jnp.where(mask[:, :, None, None, :], s, MASK_VALUE)
    return s


def attend_block(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None) -> Partial:
    """One tile: q float[B, T, N, H] over k, v float[B, S, K, H]; mask bool[B|1, T, S]."""
    b, t, n, h = q.shape
    s = _logits(q, k, mask)
    m = jnp.max(s, axis=-1)  # [B, T, K, G]
    p = jnp.exp(s - m[..., None])
    if mask is not None:
        p = jnp.where(mask[:, :, None, None, :], p, 0.0)
    o = jnp.einsum("BTKGS,BSKH->BTKGH", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return Partial(o.reshape(b, t, n, h), m.reshape(b, t, n), p.sum(-1).reshape(b, t, n))


def merge(a: Partial, b: Partial) -> Partial:
    """The partial over the union of two disjoint key sets (same query rows)."""
    m = jnp.maximum(a.max, b.max)
    ca, cb = jnp.exp(a.max - m), jnp.exp(b.max - m)
    return Partial(
        ca[..., None] * a.out + cb[..., None] * b.out, m, ca * a.sum + cb * b.sum
    )  # fmt: skip


def finish(p: Partial) -> tuple[jax.Array, jax.Array]:
    """(out float32[B, T, N, H], logsumexp float32[B, T, N]); 0 for rows that attended
    nothing."""
    seen = p.sum > 0
    out = p.out / jnp.where(seen, p.sum, 1.0)[..., None]
    return out, jnp.where(seen, p.max + jnp.log(jnp.where(seen, p.sum, 1.0)), 0.0)


def block_grads(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: jax.Array | None,
    dout: jax.Array,
    lse: jax.Array,
    delta: jax.Array,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """FlashAttention-2 backward of one tile: fp32 (dq [B, T, N, H], dk, dv [B, S, K, H]).

    lse: the rows' logsumexp over ALL keys (from `finish`); delta = sum_h dout * out
    float32[B, T, N]. Summing the tiles' dq over key blocks and dk, dv over query
    blocks gives the full gradients.
    """
    b, t, n, h = q.shape
    kv_heads = k.shape[2]
    g = n // kv_heads
    s = _logits(q, k, mask)
    p = jnp.exp(s - lse.reshape(b, t, kv_heads, g)[..., None])
    if mask is not None:
        p = jnp.where(mask[:, :, None, None, :], p, 0.0)
    do = dout.reshape(b, t, kv_heads, g, h)
    f32 = jnp.float32
    dv = jnp.einsum("BTKGS,BTKGH->BSKH", p.astype(do.dtype), do, preferred_element_type=f32)
    dp = jnp.einsum("BTKGH,BSKH->BTKGS", do, v, preferred_element_type=f32)
    ds = (p * (dp - delta.reshape(b, t, kv_heads, g)[..., None]) * (h**-0.5)).astype(q.dtype)
    dq = jnp.einsum("BTKGS,BSKH->BTKGH", ds, k, preferred_element_type=f32)
    dk = jnp.einsum("BTKGS,BTKGH->BSKH", ds, q.reshape(do.shape), preferred_element_type=f32)
    return dq.reshape(b, t, n, h), dk, dv


@dataclasses.dataclass(frozen=True)
class _Spec:
    """The static part of a call (custom_vjp's non-differentiable argument)."""

    causal: bool
    sliding_window: int | None
    block_q: int
    block_k: int
    q_len: int
    kv_len: int

    @property
    def blocks(self) -> tuple[int, int]:
        return -(-self.q_len // self.block_q), -(-self.kv_len // self.block_k)


def chunked_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    q_segment_ids: jax.Array | None = None,
    kv_segment_ids: jax.Array | None = None,
    causal: bool = False,
    q_offset: jax.Array | int = 0,
    sliding_window: int | None = None,
    block_q: int = DEFAULT_BLOCK,
    block_k: int = DEFAULT_BLOCK,
) -> jax.Array:
    """Segment-masked attention (the contract of `attention.dot_product_attention`),
    blockwise. Returns float[B, T, N, H] in q's dtype.

    block_q, block_k: tile sizes, clipped to T and S; T and S need not be multiples.
    q_offset: int or int32 scalar / [B] (cache slot of the first query, decode).
    """
    b, t, n, h = q.shape
    s = k.shape[1]
    if k.shape != v.shape or k.shape[0] != b or k.shape[3] != h or n % k.shape[2]:
        raise ValueError(f"expected q [B,T,N,H], k = v [B,S,K,H] with N % K == 0; got "
                         f"{q.shape}, {k.shape}, {v.shape}")  # fmt: skip
    if block_q < 1 or block_k < 1:
        raise ValueError(f"block sizes must be >= 1, got block_q={block_q}, block_k={block_k}")
    if (q_segment_ids is None) != (kv_segment_ids is None):
        raise ValueError("pass both q_segment_ids and kv_segment_ids, or neither")
    check_window(causal, sliding_window)
    spec = _Spec(causal, sliding_window, min(block_q, t), min(block_k, s), t, s)
    nq, nk = spec.blocks
    if q_segment_ids is None and (nq * spec.block_q != t or nk * spec.block_k != s):
        # Padded tails need ids to stay apart from the real rows.
        q_segment_ids, kv_segment_ids = jnp.zeros((b, t), jnp.int32), jnp.zeros((b, s), jnp.int32)
    offset = jnp.asarray(q_offset, jnp.int32)
    return _attention(q, k, v, q_segment_ids, kv_segment_ids, offset, spec)


def _blocks(x: jax.Array | None, block: int, count: int, fill) -> jax.Array | None:
    """[B, L, ...] -> [count, B, block, ...], the tail padded with `fill`."""
    if x is None:
        return None
    pad = count * block - x.shape[1]
    x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2), constant_values=fill)
    x = x.reshape(x.shape[0], count, block, *x.shape[2:])
    return jnp.moveaxis(x, 1, 0)


def _unblock(x: jax.Array, length: int) -> jax.Array:
    """[count, B, block, ...] -> [B, length, ...]."""
    x = jnp.moveaxis(x, 0, 1)
    return x.reshape(x.shape[0], -1, *x.shape[3:])[:, :length]


class _Tiles(NamedTuple):
    """Segment ids by block, and each block's id range per row (to skip tiles)."""

    q_seg: jax.Array | None  # int32[nq, B, block_q]
    kv_seg: jax.Array | None  # int32[nk, B, block_k]
    ranges: tuple[jax.Array, ...] | None  # q max, q min, kv max, kv min: int32[n, B]

    @classmethod
    def make(cls, q_seg, kv_seg, spec: _Spec) -> _Tiles:
        nq, nk = spec.blocks
        q_seg = _blocks(q_seg, spec.block_q, nq, _PAD_Q)
        kv_seg = _blocks(kv_seg, spec.block_k, nk, _PAD_KV)
        if q_seg is None:
            return cls(None, None, None)
        # Ranges over real ids only (pads are negative and match nothing).
        lo = lambda x: jnp.min(jnp.where(x < 0, jnp.iinfo(jnp.int32).max, x), -1)  # noqa: E731
        return cls(q_seg, kv_seg, (q_seg.max(-1), lo(q_seg), kv_seg.max(-1), lo(kv_seg)))


def _tile_mask(spec: _Spec, tiles: _Tiles, offset, i, j, q_seg, kv_seg):
    """bool mask of tile (i, j) and whether any of it is attended (a traced bool).

    The skip tests are conservative: a tile holding one attended pair is never skipped
    (equal ids lie in both blocks' id ranges)."""
    mask = attention_mask(
        q_seg, kv_seg, q_len=spec.block_q, kv_len=spec.block_k, causal=spec.causal,
        q_offset=offset + i * spec.block_q - j * spec.block_k,
        sliding_window=spec.sliding_window,
    )  # fmt: skip
    active = jnp.bool_(True)
    q0, k0 = i * spec.block_q, j * spec.block_k
    if spec.causal:
        active &= k0 <= q0 + spec.block_q - 1 + jnp.max(offset)
    if spec.sliding_window is not None:
        active &= k0 + spec.block_k - 1 > q0 + jnp.min(offset) - spec.sliding_window
    if tiles.ranges is not None:
        q_hi, q_lo, kv_hi, kv_lo = tiles.ranges
        active &= jnp.any((q_hi[i] >= kv_lo[j]) & (kv_hi[j] >= q_lo[i]))
    return mask, active


def _forward(q, k, v, q_seg, kv_seg, offset, spec: _Spec):
    b, t, n, h = q.shape
    nq, nk = spec.blocks
    tiles = _Tiles.make(q_seg, kv_seg, spec)
    qb = _blocks(q, spec.block_q, nq, 0)
    kb, vb = _blocks(k, spec.block_k, nk, 0), _blocks(v, spec.block_k, nk, 0)

    def q_block(i):
        q_i = qb[i]
        q_seg_i = None if tiles.q_seg is None else tiles.q_seg[i]

        def kv_step(acc, xs):
            j, k_j, v_j, kv_seg_j = xs
            mask, active = _tile_mask(spec, tiles, offset, i, j, q_seg_i, kv_seg_j)
            acc = jax.lax.cond(
                active, lambda: merge(acc, attend_block(q_i, k_j, v_j, mask)), lambda: acc
            )
            return acc, None

        init = empty_partial(b, spec.block_q, n, h)
        acc, _ = jax.lax.scan(kv_step, init, (jnp.arange(nk), kb, vb, tiles.kv_seg))
        return finish(acc)

    out, lse = jax.lax.map(q_block, jnp.arange(nq))
    return _unblock(out, t).astype(q.dtype), _unblock(lse, t)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _attention(q, k, v, q_seg, kv_seg, offset, spec: _Spec):
    return _forward(q, k, v, q_seg, kv_seg, offset, spec)[0]


def _attention_fwd(q, k, v, q_seg, kv_seg, offset, spec: _Spec):
    out, lse = _forward(q, k, v, q_seg, kv_seg, offset, spec)
    return out, (q, k, v, q_seg, kv_seg, offset, out, lse)


def _attention_bwd(spec: _Spec, res, dout):
    q, k, v, q_seg, kv_seg, offset, out, lse = res
    t, s = spec.q_len, spec.kv_len
    nq, nk = spec.blocks
    delta = jnp.sum(dout.astype(jnp.float32) * out.astype(jnp.float32), -1)  # [B, T, N]
    tiles = _Tiles.make(q_seg, kv_seg, spec)
    qb, dob = _blocks(q, spec.block_q, nq, 0), _blocks(dout, spec.block_q, nq, 0)
    lseb, deltab = _blocks(lse, spec.block_q, nq, 0), _blocks(delta, spec.block_q, nq, 0)
    kb, vb = _blocks(k, spec.block_k, nk, 0), _blocks(v, spec.block_k, nk, 0)
    q_segs = tiles.q_seg if tiles.q_seg is not None else jnp.zeros((nq,), jnp.int32)

    # Outer loop over key blocks, inner over query blocks: block j's dk, dv are the inner
    # loop's carry; each inner step's dq contribution is stacked and added after it.
    def kv_block(dq, xs):
        j, k_j, v_j, kv_seg_j = xs
        zero_kv = jnp.zeros(k_j.shape, jnp.float32)

        def q_step(dkv, ys):
            i, q_i, do_i, lse_i, delta_i, q_seg_i = ys
            q_seg_i = None if tiles.q_seg is None else q_seg_i
            mask, active = _tile_mask(spec, tiles, offset, i, j, q_seg_i, kv_seg_j)

            def grads():
                dq_i, dk_j, dv_j = block_grads(q_i, k_j, v_j, mask, do_i, lse_i, delta_i)
                return dq_i, (dkv[0] + dk_j, dkv[1] + dv_j)

            skip = lambda: (jnp.zeros(q_i.shape, jnp.float32), dkv)  # noqa: E731
            dq_i, dkv = jax.lax.cond(active, grads, skip)
            return dkv, dq_i

        (dk_j, dv_j), dq_j = jax.lax.scan(
            q_step, (zero_kv, zero_kv), (jnp.arange(nq), qb, dob, lseb, deltab, q_segs)
        )
        return dq + dq_j, (dk_j, dv_j)

    dq0 = jnp.zeros(qb.shape, jnp.float32)
    dq, (dk, dv) = jax.lax.scan(kv_block, dq0, (jnp.arange(nk), kb, vb, tiles.kv_seg))
    grads = (_unblock(dq, t), _unblock(dk, s), _unblock(dv, s))
    dq, dk, dv = (g.astype(x.dtype) for g, x in zip(grads, (q, k, v), strict=True))
    return dq, dk, dv, None, None, None


_attention.defvjp(_attention_fwd, _attention_bwd)
