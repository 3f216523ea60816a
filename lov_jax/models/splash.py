"""Splash attention: the TPU Pallas flash-attention kernel behind our attention interface.

Wraps `jax.experimental.pallas.ops.tpu.splash_attention`. Layouts as in
`lov_jax.models.attention` (B batch, T query length, S key length, N query heads,
K kv heads with N = K * G, H head dim):

    q: float[B, T, N, H]   k, v: float[B, S, K, H]   ->   out: float[B, T, N, H]

The kernel works on one example in head-major layout (q float[N, T, H],
k/v float[K, S, H]); we transpose and vmap over B. Its "MHA" path already does
GQA: query head n reads kv head n // G, the same grouping as `xla_attention`'s
reshape to [K, G], so kv heads are never repeated.

Deviations from `xla_attention` (the reference):
  * splash does not scale logits; we multiply q by H**-0.5 before the kernel,
    in fp32 and cast back to q's dtype (one extra rounding for bf16 inputs).
  * no `q_offset`: causal means key index <= query index (decode stays on XLA).
  * T and S must be multiples of 128 (the TPU lane width the kernel tiles by).
Masking is otherwise identical: segment ids are compared inside the kernel
(0 = padding attends padding only) and "and-ed" with the static causal mask,
whose fully-masked blocks the kernel skips. Softmax statistics and the output
accumulator are fp32.

Under a mesh of more than one device (`jax.set_mesh`), the kernel runs inside
`jax.shard_map`: Mosaic kernels cannot be partitioned by XLA ("Please wrap the call
in a shard_map"). Each device attends its own rows and heads, placed by the rules
table: B over `activation_batch` (data x fsdp), N and K over `activation_heads`
(tensor; both head counts must divide by it). T and S stay whole on every device.

Off TPU the kernel runs in Pallas interpret mode (`interpret=True`), which is
correct but slow; it is meant for tests, not for CPU or GPU training. A program traced
on a CPU host but compiled for TPU (`lov_jax.plan`) picks the TPU kernel with
`with kernel_mode(interpret=False):`.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm
from jax.sharding import PartitionSpec as P

from lov_jax.models import kernel_mesh

# The kernel tiles q/kv blocks by the TPU lane width; every block size and
# sequence length must be a multiple of it.
_LANES = 128
_DEFAULT_BLOCK = 512
# interpret mode for calls that pass interpret=None; None: interpret off TPU.
_INTERPRET: contextvars.ContextVar[bool | None] = contextvars.ContextVar(
    "splash_interpret", default=None
)


@contextlib.contextmanager
def kernel_mode(*, interpret: bool | None):
    """Calls traced inside (with `interpret=None`) run the kernel in this mode."""
    token = _INTERPRET.set(interpret)
    try:
        yield
    finally:
        _INTERPRET.reset(token)


def _pick_block(length: int, target: int = _DEFAULT_BLOCK) -> int:
    """Largest multiple of 128 that is <= target and divides length (a multiple of 128)."""
    block = min(target, length) // _LANES * _LANES
    while length % block:
        block -= _LANES
    return block


def default_block_sizes(q_len: int, kv_len: int) -> sk.BlockSizes:
    """Forward and backward (dq, dkv) tiles: 512 where it divides, else 256 or 128."""
    bq, bkv = _pick_block(q_len), _pick_block(kv_len)
    return sk.BlockSizes(
        block_q=bq,
        block_kv=bkv,
        block_kv_compute=bkv,
        block_q_dkv=bq,
        block_kv_dkv=bkv,
        block_kv_dkv_compute=bkv,
        block_q_dq=bq,
        block_kv_dq=bkv,
    )


def splash_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    q_segment_ids: jax.Array | None = None,
    kv_segment_ids: jax.Array | None = None,
    causal: bool = True,
    interpret: bool | None = None,
    block_sizes: sk.BlockSizes | None = None,
) -> jax.Array:
    """Segment-masked (optionally causal) attention with the splash kernel.

    Args:
      q: float[B, T, N, H] queries (unscaled).
      k: float[B, S, K, H] keys, N % K == 0.
      v: float[B, S, K, H] values.
      q_segment_ids: int32[B, T] segment ids, 0 = padding; with kv_segment_ids or neither.
      kv_segment_ids: int32[B, S] segment ids.
      causal: mask keys after the query (key index <= query index, no offset).
      interpret: run the Pallas kernel in interpret mode; default: `kernel_mode`'s, else
        off TPU only.
      block_sizes: kernel tiles; default `default_block_sizes(T, S)`.

    Under a mesh of more than one device the kernel runs in `jax.shard_map` (module
    docstring); a ValueError says so when the head counts do not divide the split.

    Returns:
      float[B, T, N, H] in q's dtype.
    """
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(
            f"expected q [B,T,N,H], k/v [B,S,K,H]; got {q.shape}, {k.shape}, {v.shape}"
        )
    b, t, n, h = q.shape
    s, kv_heads = k.shape[1], k.shape[2]
    if k.shape != v.shape or k.shape[0] != b or k.shape[3] != h:
        raise ValueError(f"k {k.shape} and v {v.shape} must both be [B={b}, S, K, H={h}]")
    if n % kv_heads:
        raise ValueError(f"query heads ({n}) must be a multiple of kv heads ({kv_heads})")
    if t % _LANES or s % _LANES:
        raise ValueError(
            f"splash attention needs query and key lengths that are multiples of {_LANES}; "
            f"got T={t}, S={s} (pad the sequence or use impl='xla')"
        )
    if (q_segment_ids is None) != (kv_segment_ids is None):
        raise ValueError("pass both q_segment_ids and kv_segment_ids, or neither")
    if interpret is None:
        interpret = _INTERPRET.get()
    if interpret is None:
        interpret = jax.default_backend() != "tpu"
    if block_sizes is None:
        block_sizes = default_block_sizes(t, s)

    args = (q, k, v)
    if q_segment_ids is not None:
        as_int = lambda x: x.astype(jnp.int32)  # noqa: E731
        args += (sk.SegmentIds(q=as_int(q_segment_ids), kv=as_int(kv_segment_ids)),)
    local = functools.partial(
        _splash_local, causal=causal, interpret=interpret, block_sizes=block_sizes
    )
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return local(*args)
    rows, heads = kernel_mesh.mesh_split(mesh, b, n, kv_heads, "splash attention")
    specs = (P(rows, None, heads, None),) * 3 + (sk.SegmentIds(q=P(rows), kv=P(rows)),)
    # check_vma=False: the Pallas kernel's outputs carry no varying-axes annotation.
    return jax.shard_map(
        local, mesh=mesh, in_specs=specs[: len(args)], out_specs=specs[0], check_vma=False
    )(*args)


def _splash_local(q, k, v, segment_ids=None, *, causal, interpret, block_sizes) -> jax.Array:
    """The kernel on one device's q float[B, T, N, H], k/v float[B, S, K, H]."""
    t, n, h = q.shape[1:]
    s = k.shape[1]
    # Static mask, one per query head; the mask processing is numpy at trace time
    # and cached by the library.
    head_mask = sm.CausalMask((t, s)) if causal else sm.FullMask((t, s))
    kernel = sk.make_splash_mha(
        sm.MultiHeadMask([head_mask] * n),
        block_sizes=block_sizes,
        head_shards=1,
        q_seq_shards=1,
        interpret=interpret,
    )

    scale = h**-0.5
    q = (q.astype(jnp.float32) * scale).astype(q.dtype)
    q_nth = jnp.transpose(q, (0, 2, 1, 3))  # [B, N, T, H]
    k_ksh = jnp.transpose(k, (0, 2, 1, 3))  # [B, K, S, H]
    v_ksh = jnp.transpose(v, (0, 2, 1, 3))  # [B, K, S, H]
    if segment_ids is None:
        out = jax.vmap(kernel)(q_nth, k_ksh, v_ksh)
    else:
        out = jax.vmap(kernel)(q_nth, k_ksh, v_ksh, segment_ids)
    return jnp.transpose(out, (0, 2, 1, 3))  # [B, N, T, H] -> [B, T, N, H]
