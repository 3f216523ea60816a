"""Running a Pallas attention kernel (splash on TPU, Triton on GPU) on a device mesh.

XLA cannot partition a Pallas kernel ("Please wrap the call in a shard_map"), so under a
mesh of more than one device (`jax.set_mesh`) the kernel runs inside `jax.shard_map`:
each device attends its own rows and heads, placed by the rules table (B over
`activation_batch`, N and K over `activation_heads`). T and S stay whole on every device.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import flax.linen as nn
import jax
from jax.sharding import PartitionSpec as P

from lov_jax import sharding


def mesh_split(mesh, batch: int, heads: int, kv_heads: int, kernel: str):
    """Mesh axes (rows, heads) the kernel's B and N/K dims are split over in shard_map.

    From the active rules table (`sharding.activation_rules`, else the default one):
    `activation_batch` for rows, `activation_heads` for heads. A batch that does not
    divide (the 1-row dummy input of `init`) is replicated instead.
    """
    rules = nn.get_logical_axis_rules() or sharding.LOGICAL_AXIS_RULES
    spec = sharding.logical_to_spec(("activation_batch", "activation_heads"), rules)

    def present(entry) -> tuple[str, ...]:
        axes = (entry,) if isinstance(entry, str) else tuple(entry or ())
        return tuple(a for a in axes if a in mesh.axis_names and mesh.shape[a] > 1)

    rows, head_axes = present(spec[0]), present(spec[1])
    if batch % math.prod(mesh.shape[a] for a in rows):
        rows = ()
    split = math.prod(mesh.shape[a] for a in head_axes)
    if heads % split or kv_heads % split:
        raise ValueError(
            f"{kernel} on this mesh splits heads over {head_axes} ({split} ways): "
            f"query heads ({heads}) and kv heads ({kv_heads}) must both divide by {split}; "
            "use a smaller tensor axis or attention_impl='chunked'"
        )
    return rows or None, head_axes or None


def run_sharded(
    local: Callable, q: jax.Array, k: jax.Array, v: jax.Array, *rows_args, kernel: str
) -> jax.Array:
    """`local(q, k, v, *rows_args)` on the active mesh: directly on one device, else in
    shard_map. q float[B, T, N, H], k/v float[B, S, K, H]; rows_args are [B, ...] arrays
    (segment ids) split like the rows. Returns what `local` does, laid out like q."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return local(q, k, v, *rows_args)
    rows, heads = mesh_split(mesh, q.shape[0], q.shape[2], k.shape[2], kernel)
    qkv = P(rows, None, heads, None)
    specs = (qkv,) * 3 + (P(rows),) * len(rows_args)
    # check_vma=False: the Pallas kernel's outputs carry no varying-axes annotation.
    return jax.shard_map(local, mesh=mesh, in_specs=specs, out_specs=qkv, check_vma=False)(
        q, k, v, *rows_args
    )
