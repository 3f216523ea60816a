"""Shared building blocks: logically-partitioned dense layers, norms, remat, scan."""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


class DenseGeneral(nn.Module):
    """y = x . kernel (+ bias) contracting the trailing `n_in` axes of x.

    kernel: param_dtype[*in_shape, *features] with logical names `axes`; bias carries
    the output axes' names. (Flax's DenseGeneral initialises a flat kernel and
    re-boxes it, which breaks logical constraints for multi-axis kernels.)
    """

    features: tuple[int, ...]
    axes: tuple[str, ...]
    n_in: int = 1
    use_bias: bool = True
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        in_shape = x.shape[-self.n_in :]
        kernel = self.param(
            "kernel",
            nn.with_logical_partitioning(_fan_in_normal(self.n_in), self.axes),
            (*in_shape, *self.features),
            self.param_dtype,
        )
        contract = tuple(range(x.ndim - self.n_in, x.ndim))
        y = jax.lax.dot_general(
            x.astype(self.dtype),
            kernel.astype(self.dtype),
            ((contract, tuple(range(self.n_in))), ((), ())),
        )
        if self.use_bias:
            bias = self.param(
                "bias",
                nn.with_logical_partitioning(nn.initializers.zeros_init(), self.axes[self.n_in :]),
                self.features,
                self.param_dtype,
            )
            y = y + bias.astype(self.dtype)
        return y


def _fan_in_normal(n_in: int):
    def init(key, shape, dtype=jnp.float32):
        fan_in = int(np.prod(shape[:n_in]))
        return jax.random.normal(key, shape, dtype) * (fan_in**-0.5)

    return init


def dense(
    features: int | Sequence[int],
    *,
    axes: tuple[str, ...],
    name: str,
    dtype: jnp.dtype,
    param_dtype: jnp.dtype,
    in_axes: int | Sequence[int] = -1,
    use_bias: bool = True,
) -> DenseGeneral:
    """DenseGeneral over the trailing axes `in_axes` (-1, or (-2, -1) for head-split inputs)."""
    n_in = 1 if isinstance(in_axes, int) else len(in_axes)
    features = (features,) if isinstance(features, int) else tuple(features)
    if len(axes) != n_in + len(features):
        raise ValueError(f"{name}: {len(axes)} logical axes for a {n_in}+{len(features)}-d kernel")
    return DenseGeneral(
        features=features,
        axes=axes,
        n_in=n_in,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=param_dtype,
        name=name,
    )


class RMSNorm(nn.Module):
    """Qwen-2 RMSNorm: normalise in fp32, cast back to the input dtype, then scale."""

    eps: float
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param(
            "scale",
            nn.with_logical_partitioning(nn.initializers.ones_init(), ("norm",)),
            (x.shape[-1],),
            self.param_dtype,
        )
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return normed.astype(x.dtype) * scale.astype(x.dtype)


class LayerNorm(nn.Module):
    """LayerNorm computed in fp32 (SigLIP), output in the input dtype."""

    eps: float
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        init = nn.with_logical_partitioning
        width = (x.shape[-1],)
        scale = self.param(
            "scale", init(nn.initializers.ones_init(), ("norm",)), width, self.param_dtype
        )
        bias = self.param(
            "bias", init(nn.initializers.zeros_init(), ("norm",)), width, self.param_dtype
        )
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        out = (x32 - mean) * jax.lax.rsqrt(var + self.eps) * scale + bias
        return out.astype(x.dtype)


def remat_policy(name: str):
    return {
        "full": None,  # save nothing: recompute the whole block
        "dots": jax.checkpoint_policies.checkpoint_dots,
        "dots_with_no_batch_dims": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    }[name]


def scanned(
    block: type[nn.Module], *, remat: str, length: int, name: str, in_axes=nn.broadcast, **kwargs
):
    """`length` copies of `block` stacked on a leading 'layers' axis and run with nn.scan.

    The block's __call__ is `(carry, *args) -> (carry, per-layer output or None)`; `in_axes`
    says which args are broadcast (default: all) and which are scanned on axis 0.
    """
    if remat != "none":
        block = nn.remat(block, policy=remat_policy(remat), prevent_cse=False)
    stack = nn.scan(
        block,
        variable_axes={"params": 0},
        split_rngs={"params": True, "dropout": True},  # dropout: per-layer masks (LoRA)
        in_axes=in_axes,
        length=length,
        metadata_params={nn.PARTITION_NAME: "layers"},
    )
    return stack(name=name, **kwargs)
