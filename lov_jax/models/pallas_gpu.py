"""Pallas' Triton flash attention (`jax.experimental.pallas.ops.gpu.attention.mha`) behind
our attention interface: the portable GPU kernel (any CUDA GPU Triton supports).

Layouts as in `lov_jax.models.attention` (B batch, T query length, S key length, N query
heads, K kv heads with N = K * G, H head dim):

    q: float[B, T, N, H]   k, v: float[B, S, K, H]   ->   out: float[B, T, N, H]

What the wrapper adds to the kernel (docs/reference.md, kernels 1b):
  * GQA: the kernel reads kv head n for query head n, so K/V heads are repeated G times
    (`jnp.repeat` on the head axis: query head n reads kv head n // G, the grouping of
    `xla_attention`); dK/dV sum back over the copies through the repeat.
  * T is padded to a multiple of the block (the kernel refuses other lengths); padded
    rows get segment id -1, so they attend each other only and no real row sees them.
  * Self-attention only: the kernel takes ONE segment_ids array for queries and keys, so
    T == S and the caller's q and kv segment ids must be the same array.
  * Scale H**-0.5 (`sm_scale`); fp32 softmax statistics and accumulators in the kernel.
  * No q_offset (decode) and no sliding window: `attention.unsupported` says so.
Masking is otherwise the reference's: segment equality (0 = padding attends padding) and
causal key index <= query index. Forward and backward are the library's Triton kernels
(`backward_pass_impl="triton"`).

Off GPU the kernel runs in Pallas interpret mode (`interpret=True`): correct and slow, for
tests. Under a multi-device mesh it runs in shard_map (lov_jax/models/kernel_mesh.py).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.gpu import attention as triton_attention

from lov_jax.models.kernel_mesh import run_sharded

# Forward tile (the library's default) and the fused backward's dq / dkv tiles; the
# backward needs the same number of query and key blocks, hence one size for both.
BLOCK = 128
BACKWARD_BLOCK = 64
_MIN_BLOCK = 16  # Triton's smallest dot tile
_PAD_SEGMENT = -1


def unsupported(call) -> str | None:
    """Why the kernel cannot run an `attention.Call` (None: it can)."""
    if call.sliding_window is not None:
        return "impl='pallas_gpu' has no sliding_window (its mask is segment & causal only)"
    if not call.self_attention:
        return (f"impl='pallas_gpu' is self-attention only (T == S, one segment-id array); "
                f"got T={call.q_len}, S={call.kv_len}")  # fmt: skip
    if call.head_dim > 256:
        return f"impl='pallas_gpu' supports head_dim <= 256, got {call.head_dim}"
    return None


def block_sizes(length: int) -> triton_attention.BlockSizes:
    """Tiles for a padded length (a multiple of 16; of BLOCK when above it)."""
    fwd = min(BLOCK, length)
    bwd = next(b for b in (BACKWARD_BLOCK, 32, _MIN_BLOCK) if length % b == 0)
    return triton_attention.BlockSizes(
        block_q=fwd, block_k=fwd, block_q_dkv=bwd, block_kv_dkv=bwd, block_q_dq=bwd,
        block_kv_dq=bwd,
    )  # fmt: skip


def padded_length(length: int) -> int:
    """Multiple of 16 up to BLOCK, of BLOCK above it."""
    step = _MIN_BLOCK if length <= BLOCK else BLOCK
    return -(-length // step) * step


def pallas_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    q_segment_ids: jax.Array | None = None,
    kv_segment_ids: jax.Array | None = None,
    causal: bool = True,
    interpret: bool | None = None,
) -> jax.Array:
    """Segment-masked (optionally causal) self-attention with the Triton kernel.

    q: float[B, T, N, H]; k, v: float[B, T, K, H] with N % K == 0; segment ids
    int32[B, T] (0 = padding), the same array for q and kv, or neither. interpret:
    default off GPU only. Returns float[B, T, N, H] in q's dtype.
    """
    b, t, n, h = q.shape
    if k.shape != v.shape or k.shape[:2] != (b, t) or k.shape[3] != h or n % k.shape[2]:
        raise ValueError(f"impl='pallas_gpu' needs q [B,T,N,H] and k = v [B,T,K,H] with "
                         f"N % K == 0; got {q.shape}, {k.shape}, {v.shape}")  # fmt: skip
    if q_segment_ids is not kv_segment_ids:
        raise ValueError(
            "impl='pallas_gpu' takes one segment-id array for queries and keys: pass the "
            "same array as q_segment_ids and kv_segment_ids (or use impl='chunked')"
        )
    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    tp = padded_length(t)
    seg = q_segment_ids
    if seg is None and tp != t:
        seg = jnp.ones((b, t), jnp.int32)
    if tp != t:
        pad = [(0, 0), (0, tp - t), (0, 0), (0, 0)]
        q, k, v = (jnp.pad(x, pad) for x in (q, k, v))
        seg = jnp.pad(seg.astype(jnp.int32), [(0, 0), (0, tp - t)], constant_values=_PAD_SEGMENT)
    local = functools.partial(_local, causal=causal, interpret=interpret)
    args = () if seg is None else (seg.astype(jnp.int32),)
    out = run_sharded(local, q, k, v, *args, kernel="impl='pallas_gpu'")
    return out[:, :t]


def _local(q, k, v, segment_ids=None, *, causal: bool, interpret: bool) -> jax.Array:
    """The kernel on one device's q float[B, Tp, N, H], k/v float[B, Tp, K, H]."""
    groups = q.shape[2] // k.shape[2]
    if groups > 1:
        k, v = jnp.repeat(k, groups, axis=2), jnp.repeat(v, groups, axis=2)
    out = triton_attention.mha(
        q, k, v, segment_ids, sm_scale=q.shape[-1] ** -0.5, causal=causal,
        block_sizes=block_sizes(q.shape[1]), interpret=interpret,
    )  # fmt: skip
    return out.astype(q.dtype)
