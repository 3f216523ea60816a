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

Kernels (`impl`, the config's `model.attention_impl`, one of `config.ATTENTION_IMPLS`):

  xla         reference: one fp32 [T, S] logits tensor per head (CPU, tests, decode)
  chunked     blockwise online softmax in XLA, memory linear in T (lov_jax/models/chunked.py)
  splash      TPU Pallas flash attention (lov_jax/models/splash.py)
  pallas_gpu  Pallas' Triton flash attention (lov_jax/models/pallas_gpu.py)
  cudnn       cuDNN packed flash attention on Hopper (lov_jax/models/cudnn.py)
  auto        the first kernel that can do the call: cudnn -> pallas_gpu on GPU, splash
              on TPU, else xla for short rows (T * S <= XLA_MAX_LOGITS) and chunked for
              long ones; the choice and the skipped kernels' reasons are logged once.

A kernel named explicitly runs or raises a ValueError saying why it cannot, except for
cached decode (a `q_offset`): a kernel without one falls back to xla / chunked as `auto`
would, and the reason is logged once.
"""

from __future__ import annotations

import dataclasses
import logging

import jax
import jax.numpy as jnp

from lov_jax.config import ATTENTION_IMPLS

log = logging.getLogger(__name__)

# Above this many logits per head (T * S) `auto` leaves xla for chunked.
XLA_MAX_LOGITS = 2048 * 2048
# Auto's kernels per backend, tried in order before the xla / chunked fallback.
AUTO_ORDER = {"gpu": ("cudnn", "pallas_gpu"), "tpu": ("splash",)}
# Finite mask value: exp(-0.7 * f32max - max) underflows to exactly 0 while
# fully-masked rows stay finite.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def check_window(causal: bool, sliding_window: int | None) -> None:
    if sliding_window is not None and (not causal or sliding_window < 1):
        raise ValueError(f"sliding_window={sliding_window} needs causal=True and W >= 1")


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
    check_window(causal, sliding_window)
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
        logits = jnp.where(mask[:, None, None, :, :], logits, MASK_VALUE)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum("BKGTS,BSKH->BTKGH", probs, v)
    return out.reshape(b, t, n, h)


@dataclasses.dataclass(frozen=True)
class Call:
    """What a kernel needs to know to say whether it can run an attention call."""

    q_len: int
    kv_len: int
    heads: int
    kv_heads: int
    head_dim: int
    dtype: str
    causal: bool
    segments: bool
    self_attention: bool  # T == S and one segment-id array (or none) for queries and keys
    decode: bool  # a q_offset other than the literal 0 (cached decode)
    sliding_window: int | None
    backend: str

    @classmethod
    def of(cls, q, k, *, causal, q_segment_ids, kv_segment_ids, q_offset, sliding_window):
        t, n, h = q.shape[1:]
        return cls(
            q_len=t,
            kv_len=k.shape[1],
            heads=n,
            kv_heads=k.shape[2],
            head_dim=h,
            dtype=jnp.dtype(q.dtype).name,
            causal=causal,
            segments=q_segment_ids is not None,
            self_attention=t == k.shape[1] and q_segment_ids is kv_segment_ids,
            decode=not (isinstance(q_offset, int) and q_offset == 0),
            sliding_window=sliding_window,
            backend=jax.default_backend(),
        )


def unsupported(impl: str, call: Call) -> str | None:
    """Why `impl` cannot run `call` (None: it can). Backend-independent for the Pallas
    kernels (they run in interpret mode off their hardware); `auto` checks the backend."""
    if impl in ("xla", "chunked"):
        return None
    if call.decode:
        return f"impl={impl!r} has no q_offset (cached decode)"
    if impl == "splash":
        if call.sliding_window is not None:
            return "impl='splash' has no sliding_window here yet"
        if call.q_len % 128 or call.kv_len % 128:
            return (f"impl='splash' needs query and key lengths that are multiples of 128; "
                    f"got T={call.q_len}, S={call.kv_len}")  # fmt: skip
        return None
    if impl == "pallas_gpu":
        from lov_jax.models import pallas_gpu

        return pallas_gpu.unsupported(call)
    if impl == "cudnn":
        from lov_jax.models import cudnn

        return cudnn.unsupported(call)
    raise ValueError(f"unknown attention impl {impl!r}; known: {ATTENTION_IMPLS}")


def fallback(call: Call) -> str:
    """xla for short rows (its [T, S] logits are small), chunked for long ones."""
    return "xla" if call.q_len * call.kv_len <= XLA_MAX_LOGITS else "chunked"


def choose(impl: str, call: Call) -> str:
    """The kernel that runs `call` when the config says `impl` (see the module docstring)."""
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"unknown attention impl {impl!r}; known: {ATTENTION_IMPLS}")
    if impl == "auto":
        skipped = []
        for name in AUTO_ORDER.get(call.backend, ()):
            reason = unsupported(name, call)
            if name == "pallas_gpu" and reason is None and call.backend != "gpu":
                reason = "not on a GPU"
            if reason is None:
                _log_once(logging.INFO, f"attention auto on {call.backend}: {name}", skipped)
                return name
            skipped.append(reason)
        chosen = fallback(call)
        why = f"T*S = {call.q_len}*{call.kv_len} {'<=' if chosen == 'xla' else '>'} "
        skipped.append(why + f"{XLA_MAX_LOGITS} (XLA_MAX_LOGITS)")
        _log_once(logging.INFO, f"attention auto on {call.backend}: {chosen}", skipped)
        return chosen
    reason = unsupported(impl, call)
    if reason is None:
        return impl
    if call.decode:
        chosen = fallback(call)
        _log_once(logging.WARNING, f"attention: {chosen} instead of {impl}", [reason])
        return chosen
    raise ValueError(f"{reason} (use impl='chunked' or 'auto')")


_LOGGED: set[str] = set()


def _log_once(level: int, message: str, reasons: list[str]) -> None:
    if reasons:
        message += " (" + "; ".join(reasons) + ")"
    if message not in _LOGGED:
        _LOGGED.add(message)
        log.log(level, message)


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
    check_window(causal, sliding_window)
    call = Call.of(
        q, k, causal=causal, q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids,
        q_offset=q_offset, sliding_window=sliding_window,
    )  # fmt: skip
    impl = choose(impl, call)
    seg = {"q_segment_ids": q_segment_ids, "kv_segment_ids": kv_segment_ids}
    if impl == "chunked":
        from lov_jax.models import chunked

        return chunked.chunked_attention(
            q, k, v, **seg, causal=causal, q_offset=q_offset, sliding_window=sliding_window
        )
    if impl == "splash":
        from lov_jax.models import splash

        return splash.splash_attention(q, k, v, **seg, causal=causal)
    if impl == "pallas_gpu":
        from lov_jax.models import pallas_gpu

        return pallas_gpu.pallas_attention(q, k, v, **seg, causal=causal)
    if impl == "cudnn":
        from lov_jax.models import cudnn

        return cudnn.cudnn_attention(q, k, v, **seg, causal=causal, sliding_window=sliding_window)
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
