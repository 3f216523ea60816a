"""Meshes, logical axis names and the one rules table that maps them to mesh axes.

Changing the parallelism means editing `LOGICAL_AXIS_RULES` (or passing another
table), never the model. Mesh axes: `data` (pure data parallel), `fsdp`
(data parallel + parameter/optimizer sharding), `tensor` (Megatron-style).
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# logical name -> mesh axis (or tuple of axes, or None = replicated).
LOGICAL_AXIS_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    # parameters
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("q_heads", "tensor"),
    ("kv_heads", "tensor"),
    ("heads", "tensor"),
    ("head_dim", None),
    ("layers", None),
    ("norm", None),
    ("patches", None),
    ("conv_height", None),
    ("conv_width", None),
    ("channels", None),
    # activations
    ("activation_batch", ("data", "fsdp")),
    ("activation_length", None),
    ("activation_embed", None),
    ("activation_heads", "tensor"),
    ("activation_mlp", "tensor"),
    ("activation_vocab", "tensor"),
)


def make_mesh(
    data: int = 1, fsdp: int = -1, tensor: int = 1, devices: Sequence[jax.Device] | None = None
) -> Mesh:
    """A (data, fsdp, tensor) mesh; one axis may be -1 (all remaining devices)."""
    devices = list(jax.devices() if devices is None else devices)
    shape = [data, fsdp, tensor]
    if shape.count(-1) > 1:
        raise ValueError("at most one mesh axis may be -1")
    known = int(np.prod([s for s in shape if s != -1]))
    if -1 in shape:
        if len(devices) % known:
            raise ValueError(f"{len(devices)} devices do not divide into mesh {shape}")
        shape[shape.index(-1)] = len(devices) // known
    if int(np.prod(shape)) != len(devices):
        raise ValueError(
            f"mesh data={shape[0]} fsdp={shape[1]} tensor={shape[2]} needs "
            f"{int(np.prod(shape))} devices, have {len(devices)}"
        )
    return jax.make_mesh(tuple(shape), MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def logical_to_spec(
    names: Sequence[str | None], rules: Sequence[tuple] = LOGICAL_AXIS_RULES
) -> PartitionSpec:
    """Map logical axis names to a PartitionSpec; a mesh axis used twice is an error."""
    table = dict(rules)
    used: set[str] = set()
    spec = []
    for name in names:
        if name is not None and name not in table:
            raise KeyError(f"logical axis {name!r} has no rule in the sharding table")
        axes = None if name is None else table[name]
        flat = (axes,) if isinstance(axes, str) else tuple(axes or ())
        if used & set(flat):
            raise ValueError(f"logical axes {tuple(names)} map mesh axis {used & set(flat)} twice")
        used |= set(flat)
        spec.append(axes)
    return PartitionSpec(*spec)


def params_sharding(boxed_tree, mesh: Mesh, rules: Sequence[tuple] = LOGICAL_AXIS_RULES):
    """NamedSharding tree for a tree of `nn.LogicallyPartitioned` leaves (abstract ok).

    Works for params and for optimizer states built from boxed params (moments keep
    their parameter's names); unboxed leaves (step counters) are replicated.
    """

    def to_sharding(x):
        if isinstance(x, nn.LogicallyPartitioned):
            return NamedSharding(mesh, logical_to_spec(x.names, rules))
        return NamedSharding(mesh, PartitionSpec())

    return jax.tree.map(
        to_sharding, boxed_tree, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned)
    )


def activation_rules(rules: Sequence[tuple] = LOGICAL_AXIS_RULES):
    """Context manager under which `nn.with_logical_constraint` uses our table."""
    return nn.logical_axis_rules(tuple(rules))
