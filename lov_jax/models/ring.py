"""Context parallelism: the LLM's sequence sharded over the `context` mesh axis.

Layouts as in `lov_jax.models.attention` (B batch, T tokens, N query heads, K kv heads,
H head dim); under a mesh whose `context` axis has n > 1 devices every [B, T, ...]
activation of the LLM is split into n blocks of T / n tokens (the rules table maps
`activation_length` to `context`), and self-attention runs in `jax.shard_map`:

  ring        (default) each device keeps its query block and passes its key / value
              block (with the block's segment ids) to the next device n - 1 times
              (`lax.ppermute`); the per-block partial results merge exactly with their
              logsumexp statistics (`chunked.merge`). Forward and backward are a
              `jax.custom_vjp` (FlashAttention-2 backward, `chunked.block_grads`): dK, dV
              travel with their block and arrive home after n steps. Memory: the own
              block plus one block in flight, O(T / n) per device; logits come in
              tiles of float32[B, block_q, N, T/n] (block_q = 512 query rows).
              Communication per device and layer, b bytes per element:
                forward   (n - 1) blocks of 2 * B * (T/n) * K * H * b
                          ~ 2 * B * T * K * H * b * (n - 1) / n, overlappable with compute
                backward  n steps of K, V (b) and dK, dV (fp32): ~ 2 * B * T * K * H *
                          (b + 4) per device
  all_gather  the key / value blocks (and their segment ids) are all-gathered once and
              each device attends its queries over the whole row with the ordinary
              kernels (`attention.dot_product_attention` with the queries' `q_offset`:
              xla / chunked; a kernel without q_offset falls back as in decode).
              Communication: forward the same 2 * B * T * K * H * b * (n - 1) / n
              (one all-gather, not overlapped), backward a reduce-scatter of fp32 dK, dV,
              2 * B * T * K * H * 4 * (n - 1) / n. Memory O(T) keys per device. Cheaper
              where rows are short or kv heads few (GQA: K << N): one collective, no
              per-step latency, and chunked's tiling inside.

Masking uses every token's position in the row (its index before reordering), so any
layout is exact: a query attends a key iff their segment ids are equal and (causal) the
key's index <= the query's (with a sliding window W also > query's - W). Segment ids
travel with their key blocks, so packed rows stay exact across shard boundaries.

Causal load balance (`reorder="zigzag"`, MaxText's dual-chunk swap): the row is cut into
2n chunks and device r holds chunks r and 2n - 1 - r, so each device has the same number
of (query, key) pairs under the diagonal. `shard_sequence` applies it to a batch's token
axis (every [B, L] key of `lov_jax.batch`, after padding L to a multiple of 2n with
segment 0); per-token inputs travel with their token (RoPE positions included, so
positions per segment are unchanged) and the loss is a sum over tokens (its count too),
so nothing needs undoing for the loss; `restore` undoes it for per-token outputs.

Inside each shard the per-step block is the einsum tile of `chunked.attend_block` (the
xla kernel's arithmetic) on every backend; splash / cuDNN / Pallas per-step kernels
(which would need to return their logsumexp) are not wired in and untested here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from lov_jax.models import chunked

AXIS = "context"
STRATEGIES = ("ring", "all_gather")
REORDERS = ("zigzag", "none")


@dataclasses.dataclass(frozen=True)
class ContextParallel:
    """How attention runs over the context axis and how the batch's tokens are laid out.

    strategy: one of STRATEGIES; reorder: "zigzag" (causal load balance, applied by
    `shard_sequence`) or "none" (contiguous blocks: generation, prefill).
    """

    strategy: str = "ring"
    reorder: str = "none"

    def __post_init__(self):
        if self.strategy not in STRATEGIES:
            raise ValueError(f"context_strategy {self.strategy!r} not in {STRATEGIES}")
        if self.reorder not in REORDERS:
            raise ValueError(f"context_reorder {self.reorder!r} not in {REORDERS}")


_ACTIVE: list[ContextParallel] = [ContextParallel()]


@contextlib.contextmanager
def layout(cp: ContextParallel) -> Iterator[None]:
    """Under this, context attention and `shard_sequence` use `cp` (the Trainer's)."""
    _ACTIVE.append(cp)
    try:
        yield
    finally:
        _ACTIVE.pop()


def current() -> ContextParallel:
    return _ACTIVE[-1]


def context_size(mesh=None) -> int:
    """Devices on the `context` axis of `mesh` (default: the active one); 1 without one or
    inside a shard_map that has made it manual."""
    mesh = jax.sharding.get_abstract_mesh() if mesh is None else mesh
    if mesh.empty or AXIS not in mesh.axis_names:
        return 1
    if getattr(mesh, "_name_to_type", {}).get(AXIS) == jax.sharding.AxisType.Manual:
        return 1
    return int(mesh.shape[AXIS])


def multiple(n: int, reorder: str) -> int:
    """Rows must hold a multiple of this many tokens: n blocks, 2n chunks for zigzag."""
    return 2 * n if reorder == "zigzag" and n > 1 else n


def zigzag_order(length: int, n: int) -> np.ndarray:
    """int[length] `order`: the reordered row is `row[order]` (device r's block is chunks
    r and 2n - 1 - r of 2n)."""
    if length % (2 * n):
        raise ValueError(f"zigzag needs a length that is a multiple of 2 * {n}; got {length}")
    chunks = np.arange(length).reshape(2 * n, length // (2 * n))
    return np.concatenate([np.concatenate([chunks[r], chunks[2 * n - 1 - r]]) for r in range(n)])


def token_index(shard, block: int, n: int, reorder: str) -> jax.Array:
    """int32[block]: the row index (before reordering) of each token of `shard`'s block."""
    i = jnp.arange(block, dtype=jnp.int32)
    if reorder == "none" or n == 1:
        return shard * block + i
    c = block // 2
    return jnp.where(i < c, shard * c + i, (2 * n - 1 - shard) * c + i - c)


def _order(length: int, n: int, reorder: str) -> np.ndarray:
    return zigzag_order(length, n) if reorder == "zigzag" and n > 1 else np.arange(length)


def shard_sequence(batch: Mapping[str, jax.Array], n: int | None = None, reorder=None) -> dict:
    """The batch (`lov_jax.batch` keys, [B, L, ...]) laid out for `n` context devices:
    the token axis padded to `multiple(n, reorder)` (segment 0, loss mask 0, no taps)
    and, for zigzag, reordered. Defaults: the active mesh's context size and `current()`.
    Unchanged for n == 1."""
    from lov_jax.batch import FIELDS

    n = context_size() if n is None else n
    reorder = current().reorder if reorder is None else reorder
    if n == 1:
        return dict(batch)
    length = batch["tokens"].shape[1]
    pad = (-length) % multiple(n, reorder)
    order = _order(length + pad, n, reorder)
    out = {}
    for key, x in batch.items():
        if FIELDS.get(key, (None, ()))[1][1:2] == ("L",):
            x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
            x = jnp.take(x, order, axis=1) if reorder == "zigzag" else x
        out[key] = x
    return out


def restore(x: jax.Array, length: int, n: int, reorder: str) -> jax.Array:
    """A per-token output [B, L', ...] of a `shard_sequence`d batch back in row order,
    cut to the row's `length` tokens."""
    order = _order(x.shape[1], n, reorder)
    return jnp.take(x, np.argsort(order), axis=1)[:, :length]


# ---- attention ---------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Spec:
    n: int
    reorder: str
    causal: bool
    sliding_window: int | None
    block_q: int  # query rows per tile inside a ring step (the whole block if it does not divide)


def _split(x: jax.Array, block: int) -> jax.Array:
    """[B, T, ...] -> [T / block, B, block, ...]."""
    x = x.reshape(x.shape[0], x.shape[1] // block, block, *x.shape[2:])
    return jnp.moveaxis(x, 1, 0)


def _join(x: jax.Array) -> jax.Array:
    x = jnp.moveaxis(x, 0, 1)
    return x.reshape(x.shape[0], -1, *x.shape[3:])


def _tile(q, k, v, mask, spec: _Spec) -> chunked.Partial:
    """The local queries over one key block, `block_q` query rows at a time: the largest
    temporary is float32[B, block_q, N, T/n] logits."""
    if q.shape[1] <= spec.block_q or q.shape[1] % spec.block_q:
        return chunked.attend_block(q, k, v, mask)
    parts = jax.lax.map(
        lambda a: chunked.attend_block(a[0], k, v, a[1]),
        (_split(q, spec.block_q), _split(mask, spec.block_q)),
    )
    return chunked.Partial(*(_join(x) for x in parts))


def _tile_grads(q, k, v, mask, dout, lse, delta, spec: _Spec):
    """`chunked.block_grads` of one key block, `block_q` query rows at a time."""
    if q.shape[1] <= spec.block_q or q.shape[1] % spec.block_q:
        return chunked.block_grads(q, k, v, mask, dout, lse, delta)

    def body(dkv, xs):
        dq_i, dk_i, dv_i = chunked.block_grads(xs[0], k, v, *xs[1:])
        return (dkv[0] + dk_i, dkv[1] + dv_i), dq_i

    zero = jnp.zeros(k.shape, jnp.float32)
    xs = tuple(_split(x, spec.block_q) for x in (q, mask, dout, lse, delta))
    (dk, dv), dq = jax.lax.scan(body, (zero, zero), xs)
    return _join(dq), dk, dv


def _mask(q_seg, kv_seg, q_pos, kv_pos, spec: _Spec) -> jax.Array:
    """bool[B, Tq, Tk]: same segment and (causal, windowed) by row index."""
    mask = q_seg[:, :, None] == kv_seg[:, None, :]
    if spec.causal:
        seen = kv_pos[None, None, :] <= q_pos[None, :, None]
        if spec.sliding_window is not None:
            seen &= q_pos[None, :, None] - kv_pos[None, None, :] < spec.sliding_window
        mask &= seen
    return mask


def _rotate(x):
    n = jax.lax.axis_size(AXIS)
    return jax.lax.ppermute(x, AXIS, perm=[(i, (i + 1) % n) for i in range(n)])


def _ring_forward(q, k, v, seg, spec: _Spec):
    """(out in q's dtype, lse float32[B, T, N]) of the local queries over every block."""
    b, t, n_heads, h = q.shape
    me = jax.lax.axis_index(AXIS)
    q_pos = token_index(me, t, spec.n, spec.reorder)

    def attend(acc, i, k_c, v_c, seg_c):
        kv_pos = token_index((me - i) % spec.n, t, spec.n, spec.reorder)
        mask = _mask(seg, seg_c, q_pos, kv_pos, spec)
        block = lambda: chunked.merge(acc, _tile(q, k_c, v_c, mask, spec))  # noqa: E731
        return jax.lax.cond(jnp.any(mask), block, lambda: acc)

    def step(carry, i):
        acc, k_c, v_c, seg_c = carry
        nxt = (_rotate(k_c), _rotate(v_c), _rotate(seg_c))  # in flight during the block
        return (attend(acc, i, k_c, v_c, seg_c), *nxt), None

    init = (chunked.empty_partial(b, t, n_heads, h), k, v, seg)
    (acc, k_c, v_c, seg_c), _ = jax.lax.scan(step, init, jnp.arange(spec.n - 1))
    out, lse = chunked.finish(attend(acc, spec.n - 1, k_c, v_c, seg_c))
    return out.astype(q.dtype), lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _ring(q, k, v, seg, spec: _Spec):
    return _ring_forward(q, k, v, seg, spec)[0]


def _ring_fwd(q, k, v, seg, spec: _Spec):
    out, lse = _ring_forward(q, k, v, seg, spec)
    return out, (q, k, v, seg, out, lse)


def _ring_bwd(spec: _Spec, res, dout):
    q, k, v, seg, out, lse = res
    t = q.shape[1]
    me = jax.lax.axis_index(AXIS)
    q_pos = token_index(me, t, spec.n, spec.reorder)
    delta = jnp.sum(dout.astype(jnp.float32) * out.astype(jnp.float32), -1)  # [B, T, N]
    f32 = lambda x: jnp.zeros(x.shape, jnp.float32)  # noqa: E731

    # dK, dV of the block in hand travel with it; after n rotations each is home again.
    def step(carry, i):
        dq, k_c, v_c, seg_c, dk_c, dv_c = carry
        kv_pos = token_index((me - i) % spec.n, t, spec.n, spec.reorder)
        mask = _mask(seg, seg_c, q_pos, kv_pos, spec)

        def grads():
            dq_i, dk_i, dv_i = _tile_grads(q, k_c, v_c, mask, dout, lse, delta, spec)
            return dq + dq_i, dk_c + dk_i, dv_c + dv_i

        dq, dk_c, dv_c = jax.lax.cond(jnp.any(mask), grads, lambda: (dq, dk_c, dv_c))
        return (dq, *(_rotate(x) for x in (k_c, v_c, seg_c, dk_c, dv_c))), None

    init = (f32(q), k, v, seg, f32(k), f32(v))
    (dq, _, _, _, dk, dv), _ = jax.lax.scan(step, init, jnp.arange(spec.n))
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None


_ring.defvjp(_ring_fwd, _ring_bwd)


def _all_gather(q, k, v, seg, spec: _Spec, impl: str):
    """Local queries over the all-gathered row, back in row order, by the usual kernels."""
    from lov_jax.models.attention import dot_product_attention

    t = q.shape[1]
    me = jax.lax.axis_index(AXIS)
    gather = functools.partial(jax.lax.all_gather, axis_name=AXIS, axis=1, tiled=True)
    k_all, v_all, seg_all = gather(k), gather(v), gather(seg)
    if spec.reorder == "zigzag":  # the gathered row is the reordered one: undo it
        back = np.argsort(zigzag_order(t * spec.n, spec.n))
        k_all, v_all, seg_all = (jnp.take(x, back, axis=1) for x in (k_all, v_all, seg_all))
    pieces = [(0, t)] if spec.reorder == "none" else [(0, t // 2), (t // 2, t)]
    outs = []
    for lo, hi in pieces:  # each piece is contiguous in the row
        start = token_index(me, t, spec.n, spec.reorder)[lo]
        outs.append(
            dot_product_attention(
                q[:, lo:hi],
                k_all,
                v_all,
                q_segment_ids=seg[:, lo:hi],
                kv_segment_ids=seg_all,
                causal=spec.causal,
                q_offset=start,
                sliding_window=spec.sliding_window,
                impl=impl,
            )  # fmt: skip
        )
    return jnp.concatenate(outs, axis=1)


def context_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    segment_ids: jax.Array | None = None,
    causal: bool = False,
    sliding_window: int | None = None,
    impl: str = "xla",
    block_q: int = 512,
) -> jax.Array:
    """Self-attention (the contract of `attention.dot_product_attention` with one
    segment-id array for queries and keys) with T sharded over the active mesh's context
    axis, by `current()`'s strategy and layout. q float[B, T, N, H], k, v float[B, T, K, H]
    hold the layout's token order; `impl` is the all_gather strategy's per-shard kernel;
    `block_q` the ring's query rows per tile."""
    from lov_jax.models import kernel_mesh
    from lov_jax.models.attention import check_window

    check_window(causal, sliding_window)
    cp = current()
    mesh = jax.sharding.get_abstract_mesh()
    n = context_size(mesh)
    b, t, heads, _ = q.shape
    if k.shape[1] != t:
        raise ValueError(f"context attention is self-attention: T={t} queries, {k.shape[1]} keys")
    if t % multiple(n, cp.reorder):
        raise ValueError(
            f"context attention over {n} devices ({cp.reorder} layout) needs a row length "
            f"that is a multiple of {multiple(n, cp.reorder)}; got T={t} "
            "(ring.shard_sequence pads the batch)"
        )
    if segment_ids is None:
        segment_ids = jnp.zeros((b, t), jnp.int32)
    rows, head_axes = kernel_mesh.mesh_split(mesh, b, heads, k.shape[2], "context attention")
    spec = _Spec(n, cp.reorder, causal, sliding_window, block_q)
    if cp.strategy == "ring":
        local = functools.partial(_ring, spec=spec)
    else:
        local = functools.partial(_all_gather, spec=spec, impl=impl)
    qkv = P(rows, AXIS, head_axes, None)
    fn = jax.shard_map(
        local, mesh=mesh, in_specs=(qkv, qkv, qkv, P(rows, AXIS)), out_specs=qkv,
        check_vma=False,
    )  # fmt: skip
    return fn(q, k, v, segment_ids.astype(jnp.int32))
