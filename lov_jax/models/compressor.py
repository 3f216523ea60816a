"""LLaVA-Mini's query compressor (`Resampler`, docs/reference_family.md B.2).

C x C learned queries cross-attend the tower's features in CLIP space (width D = the
tower's hidden size, before the projector):

    Xn = ln_kv(X)                                  X f[B, N, D], N = 576 (48*48 in HD)
    q  = (ln_q(query) + P_q) @ Wq + bq             query, P_q f[C^2, D]
    k  = (Xn + P_k) @ Wk + bk,   v = Xn @ Wv + bv  P_k f[N, D]
    Z  = concat_h softmax(q_h k_h^T / sqrt(d)) v_h @ Wo + bo       f[B, C^2, D]

No residual, no MLP, no output norm. P_q = `pos_embed`, the MAE 2-D sin-cos table of the
C x C grid (`sincos_table`); P_k = that table bicubically upsampled (PyTorch's
F.interpolate, align_corners=False, A = -0.75, border clamp; `bicubic_matrix`) to
sqrt(N) x sqrt(N) in fp32, then cast. At C = 1 both are one constant row, so the
1-token model's keys carry no position (softmax is shift invariant); the numerics are
kept anyway.

Layout vs PyTorch's nn.MultiheadAttention: `in_proj_weight` [3D, D] (q; k; v stacked) is
one head-split `in_proj_kernel` [D, 3, heads, d] (`in_proj_bias` [3, heads, d]);
`out_proj.weight` [D, D] is `out_proj/kernel` [heads, d, D]. `pos_embed` is a frozen
buffer in the reference, saved in its state dict: a param here (so it converts and round
trips bit-exact) that the model never differentiates (stop_gradient) and the optimizer
labels frozen (lov_jax/train/optimizer.py).
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lov_jax.models.attention import dot_product_attention
from lov_jax.models.layers import LayerNorm, dense

LN_EPS = 1e-5  # nn.LayerNorm default
QUERY_STD = 0.02  # Resampler.init_weights: trunc_normal_(std=0.02)


def sincos_1d(dim: int, pos: np.ndarray) -> np.ndarray:
    """MAE `get_1d_sincos_pos_embed_from_grid`: [sin(p*om), cos(p*om)], om_k = 1e4^(-2k/dim)."""
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    out = np.einsum("m,d->md", pos.reshape(-1).astype(np.float64), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def sincos_table(dim: int, grid: int) -> np.ndarray:
    """MAE `get_2d_sincos_pos_embed(dim, grid)`: f32[grid^2, dim], token h*grid + w.

    The first half encodes grid[0] of meshgrid(w, h), i.e. the column w (the MAE quirk)."""
    if dim % 4:
        raise ValueError(f"sin-cos table width {dim} is not a multiple of 4")
    gw, gh = np.meshgrid(np.arange(grid, dtype=np.float32), np.arange(grid, dtype=np.float32))
    return np.concatenate([sincos_1d(dim // 2, gw), sincos_1d(dim // 2, gh)], axis=1).astype(
        np.float32
    )


def _cubic(t: np.ndarray, a: float = -0.75) -> tuple[np.ndarray, ...]:
    """PyTorch's upsample_bicubic2d weights of the taps at -1, 0, 1, 2 for offset t."""

    def near(x):  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x):  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    return far(t + 1), near(t), near(1 - t), far(2 - t)


@functools.cache
def bicubic_1d(in_size: int, out_size: int) -> np.ndarray:
    """f64[out, in]: F.interpolate(mode="bicubic", align_corners=False) along one axis."""
    m = np.zeros((out_size, in_size))
    for o in range(out_size):
        src = (o + 0.5) * (in_size / out_size) - 0.5  # not clamped for cubic
        base = int(np.floor(src))
        for k, w in zip(range(-1, 3), _cubic(np.float64(src - base)), strict=True):
            m[o, min(max(base + k, 0), in_size - 1)] += w
    return m


def bicubic_matrix(grid: int, side: int) -> np.ndarray:
    """f32[side^2, grid^2]: a row-major grid x grid table -> side x side (get_abs_pos)."""
    m = bicubic_1d(grid, side)
    return np.kron(m, m).astype(np.float32)


def _table_init(grid: int):
    def init(key, shape, dtype=jnp.float32):
        del key
        return jnp.asarray(sincos_table(shape[-1], grid), dtype)

    return init


class Compressor(nn.Module):
    """X f[B, N, D] (N a square) -> compressed f[B, C^2, D]; `grid` = C."""

    grid: int
    num_heads: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, n, d = x.shape
        side = int(round(n**0.5))
        if side * side != n:
            raise ValueError(f"compressor keys: {n} features are not a square grid")
        if d % self.num_heads:
            raise ValueError(f"compressor width {d} is not a multiple of {self.num_heads} heads")
        kw = {"dtype": self.dtype, "param_dtype": self.param_dtype}
        init = nn.with_logical_partitioning
        q_count, axes = self.grid**2, ("patches", "embed")
        query = self.param(
            "query", init(nn.initializers.normal(QUERY_STD), axes), (q_count, d), self.param_dtype
        )
        table = self.param("pos_embed", init(_table_init(self.grid), axes), (q_count, d),
                           self.param_dtype)  # fmt: skip
        table = jax.lax.stop_gradient(table)  # a frozen buffer in the reference
        pos_k = jnp.einsum(
            "NQ,QD->ND",
            jnp.asarray(bicubic_matrix(self.grid, side)),
            table.astype(jnp.float32),
            precision=jax.lax.Precision.HIGHEST,
        ).astype(self.dtype)
        xn = LayerNorm(LN_EPS, self.param_dtype, name="ln_kv")(x.astype(self.dtype))
        qn = LayerNorm(LN_EPS, self.param_dtype, name="ln_q")(query.astype(self.dtype))
        nh, hd = self.num_heads, d // self.num_heads
        kernel = self.param(
            "in_proj_kernel", init(nn.initializers.xavier_uniform(in_axis=0, out_axis=(1, 2, 3)),
                           ("embed", None, "heads", "head_dim")),
            (d, 3, nh, hd), self.param_dtype,
        )  # fmt: skip
        bias = self.param(
            "in_proj_bias", init(nn.initializers.zeros_init(), (None, "heads", "head_dim")),
            (3, nh, hd), self.param_dtype,
        )  # fmt: skip
        kernel, bias = kernel.astype(self.dtype), bias.astype(self.dtype)

        def proj(inputs, i):  # q, k or v of the stacked in_proj: [..., D] -> [..., heads, d]
            return jnp.einsum("...D,DNH->...NH", inputs, kernel[:, i]) + bias[i]

        q = proj(qn + table.astype(self.dtype), 0)  # [C^2, heads, d]
        k = proj(xn + pos_k[None], 1)  # [B, N, heads, d]
        v = proj(xn, 2)
        q = jnp.broadcast_to(q[None], (b, *q.shape))
        out = dot_product_attention(q, k, v)  # every query sees every feature
        return dense(
            d, axes=("heads", "head_dim", "embed"), in_axes=(-2, -1), name="out_proj", **kw
        )(out)
