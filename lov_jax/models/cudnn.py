"""cuDNN flash attention with packed segments (Hopper) behind our attention interface.

Layouts as in `lov_jax.models.attention` (B batch, T query length, S key length, N query
heads, K kv heads with N = K * G, H head dim):

    q: bf16|fp16[B, T, N, H]   k, v: bf16|fp16[B, T, K, H]   ->   out: [B, T, N, H]

Packing goes through jax's private fused-attention API
(`jax._src.cudnn.fused_attention_stablehlo.dot_product_attention`, docs/reference.md
kernels 1a): per row, the length and start of each segment (`segment_layout`, int32
[B, M] and [B, M + 1], -1 padded) replace the segment-id mask; `PADDING_CAUSAL` makes it
causal within each segment. It is the only module that imports the private API, and it
refuses any jax other than JAX_VERSION (the API it was checked against), GPUs before
Hopper (packed layout needs sm90) and cuDNN before MIN_CUDNN.

Deviations from `xla_attention` (the reference):
  * bf16 / fp16 only (cuDNN rejects fp32); fp32 softmax statistics inside cuDNN.
  * Segments must be contiguous runs numbered 1..M (M = `segment_budget`, default
    DEFAULT_MAX_SEGMENTS), what the packer writes; padding (id 0) may sit anywhere. A
    row that breaks this (more than M segments, a split segment, negative ids) gets NaN
    outputs, so the loss shows it instead of training on a wrong mask.
  * Padding rows (id 0) return 0 (the reference's padding rows attend padding; neither is
    ever used).
  * GQA: native for unpacked calls. For packed calls K/V heads are repeated to N: jax
    0.10.2 converts kv offsets to element offsets with the query heads' token stride
    N * H (`_fix_seqlen_offsets`), which is K/V's stride only when K == N.
  * cuDNN keeps softmax statistics per segment slot: float32[B * M, N, T] per call, so M
    is a memory knob, not just a cap.
  * Sliding window W: cuDNN's `sliding_window_length=W` (keys (i - W, i]), as ours.
  * No q_offset (decode): `attention.unsupported` says so; decode falls back.
Whether PADDING_CAUSAL's diagonal is per segment is checked on a GPU by
benchmarks/gpu_bench.py (against chunked), not on CPU: the custom call is CUDA-only.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools

import jax
import jax.numpy as jnp

JAX_VERSION = "0.10.2"
MIN_CUDNN = 90600  # 9.6.0: jax's own packed-layout test requires it
MIN_COMPUTE_CAPABILITY = (9, 0)  # Hopper
DTYPES = ("bfloat16", "float16")
DEFAULT_MAX_SEGMENTS = 64
_MAX_SEGMENTS: contextvars.ContextVar[int] = contextvars.ContextVar(
    "cudnn_max_segments", default=DEFAULT_MAX_SEGMENTS
)


@contextlib.contextmanager
def segment_budget(max_segments: int):
    """Calls traced inside allow up to `max_segments` segments per row (>= 2)."""
    if max_segments < 2:
        raise ValueError(f"segment_budget needs max_segments >= 2, got {max_segments}")
    token = _MAX_SEGMENTS.set(max_segments)
    try:
        yield
    finally:
        _MAX_SEGMENTS.reset(token)


@dataclasses.dataclass(frozen=True)
class Environment:
    """What the kernel needs from the installation and the device."""

    jax_version: str
    backend: str
    compute_capability: tuple[int, int] | None  # of the first GPU
    cudnn_version: int | None  # e.g. 90800 for 9.8.0

    @classmethod
    @functools.cache
    def current(cls) -> Environment:
        backend = jax.default_backend()
        cc = cudnn = None
        if backend == "gpu":
            device = jax.devices("gpu")[0]
            if getattr(device, "compute_capability", None):
                major, minor = device.compute_capability.split(".")[:2]
                cc = (int(major), int(minor))
            from jax._src.lib import cuda_versions  # private, like the kernel itself

            if cuda_versions is not None:
                cudnn = cuda_versions.cudnn_get_version()
        return cls(jax.__version__, backend, cc, cudnn)

    def problem(self) -> str | None:
        """Why the kernel cannot run here (None: it can)."""
        if self.jax_version != JAX_VERSION:
            return (
                f"impl='cudnn' wraps a private jax API checked against jax {JAX_VERSION}; "
                f"this is jax {self.jax_version} (re-check jax._src.cudnn."
                "fused_attention_stablehlo and bump lov_jax.models.cudnn.JAX_VERSION, or "
                "use impl='pallas_gpu' / 'chunked')"
            )
        if self.backend != "gpu":
            return f"impl='cudnn' needs a CUDA GPU; the backend is {self.backend!r}"
        cc = self.compute_capability
        if cc is None or cc < MIN_COMPUTE_CAPABILITY:
            return (
                "impl='cudnn' (packed layout) needs a Hopper GPU (compute capability >= 9.0); "
                f"this one is {cc} (use impl='pallas_gpu')"
            )
        if self.cudnn_version is None or self.cudnn_version < MIN_CUDNN:
            return (
                f"impl='cudnn' needs cuDNN >= {MIN_CUDNN} (9.6.0); found "
                f"{self.cudnn_version} (pip install -e '.[gpu]')"
            )
        return None


def unsupported(call, env: Environment | None = None) -> str | None:
    """Why the kernel cannot run an `attention.Call` here (None: it can)."""
    if call.dtype not in DTYPES:
        return (f"impl='cudnn' needs bfloat16 / float16 q, k, v (model.dtype); "
                f"got {call.dtype}")  # fmt: skip
    if call.head_dim > 256 or call.head_dim % 8:
        return f"impl='cudnn' needs head_dim <= 256 and a multiple of 8, got {call.head_dim}"
    if not call.self_attention:
        return (f"impl='cudnn' here is self-attention only (T == S, one segment-id array); "
                f"got T={call.q_len}, S={call.kv_len}")  # fmt: skip
    return (env or Environment.current()).problem()


def segment_layout(segment_ids: jax.Array, max_segments: int):
    """int32[B, T] ids (1..M per segment, 0 = padding) -> (seqlen int32[B, M],
    offsets int32[B, M + 1], ok bool[B]) as the fused-attention API takes them.

    seqlen[b, m-1] is segment m's token count and offsets[b, m-1] its first index, -1
    where row b has no segment m; the last offset is always -1. ok is False for a row
    whose ids are not contiguous runs within 0..M. Jit-able (segment reductions, O(B*T)).
    """
    t = segment_ids.shape[1]
    index = jnp.arange(t, dtype=jnp.int32)

    def row(seg):
        n = max_segments + 1  # ids 0..M; 0 is padding, ids outside are dropped
        lengths = jax.ops.segment_sum(jnp.ones_like(seg), seg, num_segments=n)[1:]
        starts = jax.ops.segment_min(index, seg, num_segments=n)[1:]
        ends = jax.ops.segment_max(index, seg, num_segments=n)[1:]
        present = lengths > 0
        contiguous = jnp.all(~present | (ends - starts + 1 == lengths))
        ok = contiguous & (jnp.max(seg) <= max_segments) & (jnp.min(seg) >= 0)
        offsets = jnp.where(present, starts, -1)
        return jnp.where(present, lengths, -1), jnp.append(offsets, -1), ok

    seqlen, offsets, ok = jax.vmap(row)(segment_ids.astype(jnp.int32))
    return seqlen.astype(jnp.int32), offsets.astype(jnp.int32), ok


def cudnn_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    q_segment_ids: jax.Array | None = None,
    kv_segment_ids: jax.Array | None = None,
    causal: bool = True,
    sliding_window: int | None = None,
) -> jax.Array:
    """Segment-masked (optionally causal, windowed) self-attention with cuDNN.

    q: bf16|fp16[B, T, N, H]; k, v: [B, T, K, H]; segment ids int32[B, T], the same array
    for q and kv, or neither. Raises ValueError naming what this device / install /
    call lacks (module docstring). Returns [B, T, N, H] in q's dtype.
    """
    from lov_jax.models.attention import Call

    call = Call.of(
        q, k, causal=causal, q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids,
        q_offset=0, sliding_window=sliding_window,
    )  # fmt: skip
    reason = unsupported(call)
    if reason is not None:
        raise ValueError(reason)
    from jax._src.cudnn import fused_attention_stablehlo as fa  # JAX_VERSION checked above

    kw = {"scale": q.shape[-1] ** -0.5, "qkv_layout": "BTNH"}
    kw["sliding_window_length"] = sliding_window
    if q_segment_ids is None:
        kw["mask_type"] = fa.MaskType.CAUSAL if causal else fa.MaskType.NO_MASK
        return fa.dot_product_attention(q, k, v, **kw)
    seqlen, offsets, ok = segment_layout(q_segment_ids, _MAX_SEGMENTS.get())
    groups = q.shape[2] // k.shape[2]
    if groups > 1:  # see the module docstring: packed kv offsets assume K == N
        k, v = jnp.repeat(k, groups, axis=2), jnp.repeat(v, groups, axis=2)
    kw["mask_type"] = fa.MaskType.PADDING_CAUSAL if causal else fa.MaskType.PADDING
    out = fa.dot_product_attention(
        q, k, v, q_seqlen=seqlen, kv_seqlen=seqlen, q_offsets=offsets, kv_offsets=offsets, **kw
    )
    out = jnp.where((q_segment_ids != 0)[:, :, None, None], out, 0)
    return jnp.where(ok[:, None, None, None], out, jnp.nan).astype(q.dtype)
