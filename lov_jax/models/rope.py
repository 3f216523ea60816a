"""RoPE frequency tables with HF's scaling types (docs: ../shared/REFERENCE_VIDEO_POST.md 3).

`rope_type` is one of ROPE_TYPES: `default`, `linear` (positions / factor), `dynamic` (NTK:
theta grows with the sequence length), `yarn` (ramped interpolation + an attention factor on
cos and sin) and `llama3` (Llama-3.1's banded interpolation). The maths follows transformers'
`ROPE_INIT_FUNCTIONS` (modeling_rope_utils.py) op for op in float32, so the tables equal
`Qwen2RotaryEmbedding` / `LlamaRotaryEmbedding` at every position (tested to 128k).

Dynamic NTK depends on the sequence length. HF keeps state: its rotary module recomputes
`inv_freq` when `max(position_ids) + 1` grows past the longest length seen so far (at first
`max_position_embeddings`) and resets when a call is back under it. We are stateless: every
call uses `L = max(positions) + 1` of that call, the default table when L <= max_position_
embeddings and the NTK table for L otherwise. For a prefill followed by cached decode (each
step's position one more than the last) both give the same tables at every step, and the
cache holds keys rotated at their own step in both. They differ only when a call follows a
longer one without dropping under max_position_embeddings (HF keeps the longer table).
The maximum is over the whole batch, as HF's.

Config dialects (transformers 5 `standardize_rope_params`): the dict is `rope_scaling` (4.x,
wins when both are set) or `rope_parameters` (5.x); its type is `rope_type` or the legacy
`type`; `rope_theta` inside it wins over the top-level one. yarn / llama3 take
`original_max_position_embeddings` from the top level if set there, else from the dict, else
`max_position_embeddings`. A key outside a type's fields is an error (HF only warns).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "llama3")
# Per scaled type: (required keys, optional keys) of its HF dict besides rope_type / type /
# rope_theta / partial_rotary_factor (1.0 only).
_KEYS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "linear": (("factor",), ()),
    "dynamic": (("factor",), ()),
    "yarn": (("factor",), ("original_max_position_embeddings", "attention_factor", "beta_fast",
                           "beta_slow", "mscale", "mscale_all_dim", "truncate")),
    "llama3": (("factor", "low_freq_factor", "high_freq_factor"),
               ("original_max_position_embeddings",)),
}  # fmt: skip
_COMMON_KEYS = ("rope_type", "type", "rope_theta", "partial_rotary_factor")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """A scaled RoPE (`TextConfig.rope_scaling`; None there = default RoPE).

    factor: the context stretch s (every type). original_max_position_embeddings: the
    pre-training length (yarn, llama3). low/high_freq_factor: llama3's band edges. beta_fast,
    beta_slow (None = 32, 1), mscale, mscale_all_dim, attention_factor, truncate: yarn's.
    """

    rope_type: str
    factor: float
    original_max_position_embeddings: int | None = None
    low_freq_factor: float | None = None
    high_freq_factor: float | None = None
    beta_fast: float | None = None
    beta_slow: float | None = None
    mscale: float | None = None
    mscale_all_dim: float | None = None
    attention_factor: float | None = None
    truncate: bool = True

    def __post_init__(self):
        where = f"rope_scaling ({self.rope_type})"
        if self.rope_type not in _KEYS:
            raise ValueError(f"rope_scaling rope_type {self.rope_type!r}: one of {tuple(_KEYS)}")
        if not isinstance(self.factor, (int, float)) or self.factor < 1.0:
            raise ValueError(f"{where}: factor {self.factor!r} must be a number >= 1")
        required, optional = _KEYS[self.rope_type]
        for f in dataclasses.fields(self)[2:]:
            value = getattr(self, f.name)
            if f.name in required and value is None:
                raise ValueError(f"{where}: {f.name} is required")
            unset = value is None or (f.name == "truncate" and value is True)
            if f.name not in required + optional and not unset:
                raise ValueError(f"{where}: {f.name} is not a field of this type")
        if self.rope_type in ("yarn", "llama3"):
            orig = self.original_max_position_embeddings
            if not isinstance(orig, int) or orig < 1:
                raise ValueError(f"{where}: original_max_position_embeddings {orig!r}: an int >= 1")
        if self.rope_type == "llama3" and not self.high_freq_factor > self.low_freq_factor:
            raise ValueError(
                f"{where}: high_freq_factor {self.high_freq_factor} must exceed "
                f"low_freq_factor {self.low_freq_factor}"
            )

    def to_hf(self) -> dict[str, Any]:
        """The keys of this type for config.json's `rope_parameters` (no rope_theta)."""
        required, optional = _KEYS[self.rope_type]
        out: dict[str, Any] = {"rope_type": self.rope_type}
        for name in required + optional:
            value = getattr(self, name)
            if value is not None and not (name == "truncate" and value is True):
                out[name] = value
        return out


def rope_from_hf(
    t: dict, max_position_embeddings: int, where: str = "text_config"
) -> tuple[float, RopeScaling | None]:
    """(rope_theta, scaling or None) from an LLM's config.json dict `t` (see module doc)."""
    field = "rope_scaling" if t.get("rope_scaling") else "rope_parameters"
    d = t.get(field) or {}
    if not isinstance(d, dict):
        raise ValueError(f"{where}.{field} = {d!r}: a dict")
    if "rope_type" in d and "type" in d and d["rope_type"] != d["type"]:
        raise ValueError(f"{where}.{field}: rope_type {d['rope_type']!r} != type {d['type']!r}")
    kind = d.get("rope_type", d.get("type", "default"))
    theta = float(d.get("rope_theta", t.get("rope_theta", 10000.0)))
    if kind not in ROPE_TYPES:
        raise ValueError(f"{where}.{field} rope_type {kind!r}: one of {ROPE_TYPES}")
    if d.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError(f"{where}.{field}.partial_rotary_factor: only 1.0 (full rotary)")
    required, optional = _KEYS.get(kind, ((), ()))
    unknown = sorted(set(d) - set(_COMMON_KEYS + required + optional))
    if unknown:
        raise ValueError(f"{where}.{field}: {unknown} are not fields of rope_type {kind!r}")
    missing = [k for k in required if k not in d]
    if missing:
        raise ValueError(f"{where}.{field}: rope_type {kind!r} needs {missing}")
    if kind == "default":
        return theta, None
    kw = {k: d[k] for k in required + optional if k in d}
    if kind in ("yarn", "llama3"):
        orig = t.get("original_max_position_embeddings")
        orig = orig or kw.get("original_max_position_embeddings") or max_position_embeddings
        kw["original_max_position_embeddings"] = orig
    if kind == "yarn" and kw["factor"] is None:  # HF: the ratio of the two lengths
        kw["factor"] = max_position_embeddings / kw["original_max_position_embeddings"]
    try:
        return theta, RopeScaling(kind, **kw)
    except ValueError as err:
        raise ValueError(f"{where}.{field}: {err}") from None


def rope_to_hf(theta: float, scaling: RopeScaling | None) -> dict[str, Any]:
    """config.json's `rope_parameters` (what transformers 5 reads)."""
    rest = {"rope_type": "default"} if scaling is None else scaling.to_hf()
    return {"rope_theta": theta, **rest}


# ---- the tables (float32, op for op as modeling_rope_utils.py) ----------------------------


def _div(a, b) -> jax.Array:
    """a / b elementwise, rounded as IEEE division: XLA turns a division by a broadcast
    scalar into a multiply by its reciprocal (1 ulp off torch); full-size operands keep it
    a division when evaluated op by op (jax.ensure_compile_time_eval)."""
    a, b = jnp.broadcast_arrays(jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32))
    return jax.lax.div(a, b)


def _default_inv_freq(theta, dim: int) -> jax.Array:
    return 1.0 / (theta ** _div(jnp.arange(0, dim, 2, dtype=jnp.float32), dim))


def inv_freq_and_scale(
    dim: int, theta: float, scaling: RopeScaling | None, max_position_embeddings: int
) -> tuple[jax.Array, float]:
    """(inv_freq float32[dim/2], attention_scaling) at initialisation, as HF's rotary
    module holds them (dynamic: the default table, its state before any long call)."""
    s = scaling
    kind = "default" if s is None else s.rope_type
    if kind == "default":
        return _default_inv_freq(theta, dim), 1.0
    if kind == "linear":
        return _div(_default_inv_freq(theta, dim), s.factor), 1.0
    if kind == "dynamic":  # python floats, seq_len = max_position_embeddings
        lmax = max_position_embeddings
        base = theta * ((s.factor * lmax / lmax) - (s.factor - 1)) ** (dim / (dim - 2))
        return _default_inv_freq(base, dim), 1.0
    if kind == "llama3":
        return _llama3_inv_freq(dim, theta, s), 1.0
    return _yarn_inv_freq(dim, theta, s)


def _llama3_inv_freq(dim: int, theta: float, s: RopeScaling) -> jax.Array:
    inv = _default_inv_freq(theta, dim)
    old, lf, hf = s.original_max_position_embeddings, s.low_freq_factor, s.high_freq_factor
    low_wavelen, high_wavelen = old / lf, old / hf
    wavelen = _div(2 * math.pi, inv)
    inv_llama = jnp.where(wavelen > low_wavelen, _div(inv, s.factor), inv)
    smooth = _div(_div(old, wavelen) - lf, hf - lf)
    smoothed = _div((1 - smooth) * inv_llama, s.factor) + smooth * inv_llama
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return jnp.where(medium, smoothed, inv_llama)


def _yarn_inv_freq(dim: int, theta: float, s: RopeScaling) -> tuple[jax.Array, float]:
    def mscale(scale, m=1.0):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    scale = s.attention_factor
    if scale is None:
        if s.mscale and s.mscale_all_dim:
            scale = float(mscale(s.factor, s.mscale) / mscale(s.factor, s.mscale_all_dim))
        else:
            scale = mscale(s.factor)
    orig = s.original_max_position_embeddings

    def correction_dim(rotations):
        return (dim * math.log(orig / (rotations * 2 * math.pi))) / (2 * math.log(theta))

    low, high = correction_dim(s.beta_fast or 32), correction_dim(s.beta_slow or 1)
    if s.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # HF: prevent a singular ramp
    pos_freqs = theta ** _div(jnp.arange(0, dim, 2, dtype=jnp.float32), dim)
    extrapolation, interpolation = _div(1.0, pos_freqs), _div(1.0, s.factor * pos_freqs)
    ramp = jnp.clip(_div(jnp.arange(dim // 2, dtype=jnp.float32) - low, high - low), 0, 1)
    extra = 1 - ramp
    return interpolation * (1 - extra) + extrapolation * extra, scale


def _dynamic_inv_freq(dim: int, theta: float, s: RopeScaling, seq_len, lmax: int) -> jax.Array:
    """HF's growth branch, seq_len a traced int: float32 tensor maths as torch does it."""
    seq = jnp.maximum(seq_len, lmax).astype(jnp.float32)
    base = theta * (_div(s.factor * seq, lmax) - (s.factor - 1)) ** (dim / (dim - 2))
    return _default_inv_freq(base, dim)


@functools.lru_cache(maxsize=64)
def static_table(
    dim: int, theta: float, scaling: RopeScaling | None, max_position_embeddings: int
) -> tuple[np.ndarray, float]:
    """inv_freq_and_scale as host values, evaluated op by op on the CPU (not constant-folded
    by XLA) so they round as torch's do, whatever the backend.

    It runs in a thread of its own: the caller is usually inside a trace under
    `jax.set_mesh`, where an eager op would be placed on the mesh's devices (and under the
    planner's AOT topology mesh there is no device to run it on). A fresh thread has a clean
    trace state and no mesh; the result enters the caller's program as a constant.
    """

    def evaluate():
        with jax.default_device(jax.local_devices(backend="cpu")[0]):
            inv_freq, scale = inv_freq_and_scale(dim, theta, scaling, max_position_embeddings)
            return np.asarray(inv_freq), float(scale)

    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(evaluate).result()


def rope_frequencies(positions: jax.Array, cfg) -> tuple[jax.Array, float]:
    """(inv_freq float32[head_dim/2], attention_scaling) a TextConfig's RoPE uses for a call
    at int32 `positions` (only dynamic depends on them: L = max(positions) + 1)."""
    dim, theta, s = cfg.head_dim, cfg.rope_theta, cfg.rope_scaling
    lmax = cfg.max_position_embeddings
    inv_freq, scale = static_table(dim, theta, s, lmax)
    if s is not None and s.rope_type == "dynamic":
        seq_len = jnp.max(positions) + 1
        grown = _dynamic_inv_freq(dim, theta, s, seq_len, lmax)
        # the barrier keeps XLA from folding p * (1 / x) into p / x (rounded otherwise)
        inv_freq = jax.lax.optimization_barrier(jnp.where(seq_len > lmax, grown, inv_freq))
    return inv_freq, scale


def rope_cos_sin(positions: jax.Array, cfg, dtype: jnp.dtype) -> tuple[jax.Array, jax.Array]:
    """int32[B, T] -> cos, sin: dtype[B, T, head_dim] of a TextConfig's RoPE, float32 inside.

    The attention factor (yarn) multiplies cos and sin, so q.k logits scale by its square.
    """
    inv_freq, scale = rope_frequencies(positions, cfg)
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, Dh/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return (jnp.cos(emb) * scale).astype(dtype), (jnp.sin(emb) * scale).astype(dtype)
