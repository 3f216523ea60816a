"""Meshes, logical axis names and the one rules table that maps them to mesh axes.

Changing the parallelism means editing `LOGICAL_AXIS_RULES` (or passing another
table), never the model. Mesh axes: `data` (pure data parallel), `fsdp`
(data parallel + parameter/optimizer sharding), `context` (the LLM's sequence: ring or
all-gather-KV attention, lov_jax/models/ring.py), `tensor` (Megatron-style).

Every mesh is built by `make_mesh` (commands through `mesh_from_flag`, the train loop
through `mesh_from_config`, the planner on a TPU topology's devices), and every batch is
placed by `batch_sharding`: its rows over the mesh axes `activation_batch` maps to.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

# jax and flax are imported where used: the CLI builds every --mesh flag from this module
# (MESH_HELP) and stays light until a command runs.
if TYPE_CHECKING:
    import jax
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "context", "tensor")

# logical name -> mesh axis (or tuple of axes, or None = replicated).
LOGICAL_AXIS_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    # parameters
    ("vocab", "tensor"),
    ("embed", ("fsdp", "context")),  # context devices share the params and optimizer too
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
    ("lora_rank", None),  # LoRA adapters' rank axis (lov_jax/lora)
    # the vision tower and the projector's input width: their own names, so the tower's
    # widths (SigLIP 1152 = 2^7 x 9) need not divide what the LLM's do; a dimension its
    # axes do not divide is replicated (`REPLICATE_UNEVEN`), the tower being small
    ("vision_embed", ("fsdp", "context")),
    ("vision_mlp", "tensor"),
    ("vision_heads", "tensor"),
    # activations
    ("activation_batch", ("data", "fsdp")),
    ("activation_length", "context"),  # the LLM's tokens (L) over the context axis
    ("activation_crops", ("data", "fsdp", "context")),  # the vision tower's B * N crops
    ("activation_patches", None),  # patches of one crop (the tower's sequence)
    ("activation_embed", None),
    ("activation_heads", "tensor"),
    ("activation_mlp", "tensor"),
    ("activation_vocab", "tensor"),
)


# The one --mesh syntax (generate, eval, convert, plan); train reads the same sizes from
# its config's `mesh` block (`mesh_from_config`).
MESH_HELP = (
    "mesh axis sizes, e.g. fsdp=4,tensor=2: any of data, fsdp, context, tensor (unnamed: "
    "data=1, fsdp=the remaining devices, context=1, tensor=1); one size may be -1 (the "
    "remaining devices)"
)


def parse_mesh(text: str) -> dict[str, int]:
    """'fsdp=4,tensor=2' -> {'fsdp': 4, 'tensor': 2}: any subset of MESH_AXES.

    A ValueError names the offending item (unknown axis, no '=', a non-integer size, an
    axis given twice); sizes are checked against the devices by `make_mesh`.
    """
    sizes: dict[str, int] = {}
    for item in (p.strip() for p in text.split(",")):
        if not item:
            continue
        name, sep, value = (x.strip() for x in item.partition("="))
        if not sep or name not in MESH_AXES:
            raise ValueError(
                f"bad --mesh item {item!r}: expected AXIS=SIZE with AXIS one of {MESH_AXES}"
            )
        if name in sizes:
            raise ValueError(f"bad --mesh item {item!r}: {name} is given twice")
        try:
            sizes[name] = int(value)
        except ValueError:
            raise ValueError(f"bad --mesh item {item!r}: {value!r} is not an integer") from None
    return sizes


def mesh_shape(
    data: int, fsdp: int, tensor: int, num_devices: int, dcn_data: int = 1, *, context: int = 1
) -> tuple[int, int, int, int]:
    """The (data, fsdp, context, tensor) sizes (MESH_AXES order) inside one of `dcn_data`
    slices of `num_devices`, the one -1 filled in; a ValueError unless they tile the
    devices."""
    shape = [data, fsdp, context, tensor]
    named = " ".join(f"{a}={s}" for a, s in zip(MESH_AXES, shape, strict=True))
    if shape.count(-1) > 1 or any(s == 0 or s < -1 for s in shape) or dcn_data < 1:
        raise ValueError(f"mesh {named} dcn_data={dcn_data}: sizes must be >= 1, one may be -1")
    if num_devices % dcn_data:
        raise ValueError(f"{num_devices} devices do not split into {dcn_data} slices")
    per_slice = num_devices // dcn_data
    known = math.prod(s for s in shape if s != -1)
    if -1 in shape:
        if per_slice % known:
            raise ValueError(
                f"mesh {named}: {per_slice} devices per slice ({num_devices} devices / "
                f"{dcn_data} slices) are not a multiple of {known}"
            )
        shape[shape.index(-1)] = per_slice // known
    if math.prod(shape) != per_slice:
        slices = f" x dcn_data={dcn_data}" if dcn_data > 1 else ""
        raise ValueError(
            f"mesh {named}{slices} needs {math.prod(shape) * dcn_data} devices, have {num_devices}"
        )
    return tuple(shape)


def make_mesh(
    data: int = 1,
    fsdp: int = -1,
    tensor: int = 1,
    *,
    context: int = 1,
    dcn_data: int = 1,
    devices: Sequence[jax.Device] | None = None,
) -> Mesh:
    """The (data, fsdp, context, tensor) mesh every command builds; one size may be -1.

    `data`, `fsdp`, `context`, `tensor` are sizes inside one slice; `dcn_data` slices are
    stacked on `data` over the data-center network, so the global data axis is
    `dcn_data * data`. Slices are told apart by `device.slice_index` (TPU multi-slice) or,
    where that does not give `dcn_data` groups (CPU/GPU clusters), by process. `context`
    sits between fsdp and tensor: its ring's neighbours are near on the torus. The device
    order is `device_array`'s.
    """
    import jax
    from jax.sharding import AxisType, Mesh

    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(data, fsdp, tensor, len(devices), dcn_data, context=context)
    array = device_array(shape, devices, dcn_data)
    return Mesh(array, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def device_array(shape: Sequence[int], devices: Sequence, dcn_data: int = 1):
    """`devices` as an array of `shape` (MESH_AXES, inside one slice), in ICI order.

    On TPU `mesh_utils` maps each mesh axis onto torus axes (`coords`, `core_on_chip`);
    where no product of whole torus axes gives an axis (tensor=8 on v5p-128's 4x4x4),
    physical axes are split (`allow_split_physical_axes`). With `dcn_data` > 1 the
    granules (TPU slices, else processes) are stacked on `data`. Devices of several TPU
    slices with dcn_data != their slice count is a ValueError naming the axes that would
    cross the data-center network.
    """
    from jax.experimental import mesh_utils

    # Granules: TPU slices where devices carry distinct slice_index values, else processes
    # (GPU/CPU clusters report slice_index 0 everywhere, or none).
    slices = {getattr(d, "slice_index", None) for d in devices}
    processes = {d.process_index for d in devices}
    tpu_slices = len(slices) if None not in slices else 1
    if tpu_slices > 1 and tpu_slices != dcn_data:
        inner = [f"{a}={n}" for a, n in zip(MESH_AXES, shape, strict=True) if n > 1]
        raise ValueError(
            f"devices span {tpu_slices} TPU slices but dcn_data={dcn_data}: "
            f"{' x '.join(inner) or 'the mesh'} would cross the data-center network (DCN, "
            f"the slow link between slices); set dcn_data={tpu_slices} (config.mesh."
            "dcn_data, lov-jax plan --num-slices) so only the data axis spans slices"
        )
    if dcn_data == 1:
        return mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
    if tpu_slices == dcn_data:
        by_process = False
    elif len(processes) == dcn_data:
        by_process = True
    else:
        raise ValueError(
            f"devices span {len(slices)} slice(s) and {len(processes)} process(es): "
            f"cannot form dcn_data={dcn_data} slices"
        )
    return mesh_utils.create_hybrid_device_mesh(
        shape, (dcn_data, 1, 1, 1), devices, process_is_granule=by_process,
        allow_split_physical_axes=True,
    )  # fmt: skip


def mesh_from_flag(text: str | None, devices: Sequence[jax.Device] | None = None) -> Mesh | None:
    """The mesh of a command's `--mesh` value (`MESH_HELP`), or None when it is empty."""
    return make_mesh(**parse_mesh(text), devices=devices) if text else None


def mesh_from_config(
    mesh_config: Mapping[str, int], devices: Sequence[jax.Device] | None = None
) -> Mesh:
    """The mesh of a stage config's `mesh` block (`configs/common.py`).

    `data`, `fsdp`, `context`, `tensor`, `dcn_data` as in `make_mesh`; `num_devices` > 0
    keeps only the first that many devices (the CPU demo). `context_strategy` and
    `context_reorder` are the context axis's attention (`context_from_config`), not sizes.
    A ValueError names the config fields.
    """
    fields = {"data": 1, "fsdp": -1, "context": 1, "tensor": 1, "dcn_data": 1, "num_devices": -1}
    unknown = set(mesh_config) - set(fields) - set(CONTEXT_FIELDS)
    if unknown:
        raise ValueError(
            f"unknown config.mesh fields {sorted(unknown)}; expected "
            f"{list(fields) + list(CONTEXT_FIELDS)}"
        )
    fields.update({k: int(v) for k, v in mesh_config.items() if k in fields})
    import jax

    devices = list(jax.devices() if devices is None else devices)
    num = fields.pop("num_devices")
    if num > 0:
        if num > len(devices):
            raise ValueError(f"mesh.num_devices={num}: only {len(devices)} devices")
        devices = devices[:num]
    try:
        return make_mesh(**fields, devices=devices)
    except ValueError as err:
        named = " x ".join(f"mesh.{k}={v}" for k, v in fields.items())
        raise ValueError(f"{named}: {err}") from None


# config.mesh fields of the context axis's attention (lov_jax/models/ring.py) and defaults.
CONTEXT_FIELDS = {"context_strategy": "ring", "context_reorder": "zigzag"}


def context_from_config(mesh_config: Mapping[str, object]):
    """The `ring.ContextParallel` a stage config's mesh block asks for (strategy: "ring" |
    "all_gather"; reorder: "zigzag" | "none"); a ValueError names a bad field."""
    from lov_jax.models.ring import ContextParallel

    kw = {k[len("context_") :]: mesh_config.get(k, v) for k, v in CONTEXT_FIELDS.items()}
    try:
        return ContextParallel(**kw)
    except ValueError as err:
        raise ValueError(f"config.mesh: {err}") from None


# Logical names whose dimension is replicated where its mesh axes do not divide it
# (`params_sharding`); any other indivisible dimension is left for jit / the planner's
# `check_divisible` to refuse, naming the array.
REPLICATE_UNEVEN = frozenset({"vision_embed", "vision_mlp", "vision_heads"})


def fit_spec(
    names: Sequence[str | None], shape: Sequence[int], axis_sizes: Mapping[str, int],
    rules: Sequence[tuple] = LOGICAL_AXIS_RULES,
) -> PartitionSpec:  # fmt: skip
    """`logical_to_spec(names)` with each `REPLICATE_UNEVEN` dimension that its mesh axes
    (sizes `axis_sizes`, e.g. `mesh.shape`) do not divide replicated instead."""
    from jax.sharding import PartitionSpec

    spec = list(logical_to_spec(names, rules))
    for i, (name, axes) in enumerate(zip(names, spec, strict=True)):
        flat = (axes,) if isinstance(axes, str) else tuple(axes or ())
        if name in REPLICATE_UNEVEN and shape[i] % math.prod(axis_sizes.get(a, 1) for a in flat):
            spec[i] = None
    return PartitionSpec(*spec)


def logical_to_spec(
    names: Sequence[str | None], rules: Sequence[tuple] = LOGICAL_AXIS_RULES
) -> PartitionSpec:
    """Map logical axis names to a PartitionSpec; a mesh axis used twice is an error."""
    from jax.sharding import PartitionSpec

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


def batch_sharding(
    mesh: Mesh, rules: Sequence[tuple] = LOGICAL_AXIS_RULES, *, micro_batched: bool = False
) -> NamedSharding:
    """Sharding of every batch array (`lov_jax.batch`): rows by `activation_batch`.

    Trailing dims stay whole; `micro_batched` adds the train step's leading micro-batch
    axis A, also whole (the step scans over it).
    """
    from jax.sharding import NamedSharding

    names = (None, "activation_batch") if micro_batched else ("activation_batch",)
    return NamedSharding(mesh, logical_to_spec(names, rules))


def batch_shards(axis_sizes: Mapping[str, int], rules: Sequence[tuple] = LOGICAL_AXIS_RULES) -> int:
    """Ways the batch rows are split on a mesh of these axis sizes (`mesh.shape`): a
    global batch is a multiple of this."""
    entry = logical_to_spec(("activation_batch",), rules)[0]
    axes = (entry,) if isinstance(entry, str) else tuple(entry or ())
    return math.prod(axis_sizes.get(a, 1) for a in axes)


def params_sharding(boxed_tree, mesh: Mesh, rules: Sequence[tuple] = LOGICAL_AXIS_RULES):
    """NamedSharding tree for a tree of `nn.LogicallyPartitioned` leaves (abstract ok).

    Works for params and for optimizer states built from boxed params (moments keep
    their parameter's names); unboxed leaves (step counters) are replicated. The tower's
    uneven dimensions are replicated (`fit_spec`).
    """
    import flax.linen as nn
    import jax
    from jax.sharding import NamedSharding, PartitionSpec

    def to_sharding(x):
        if isinstance(x, nn.LogicallyPartitioned):
            return NamedSharding(mesh, fit_spec(x.names, x.value.shape, mesh.shape, rules))
        return NamedSharding(mesh, PartitionSpec())

    return jax.tree.map(
        to_sharding, boxed_tree, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned)
    )


def activation_rules(rules: Sequence[tuple] = LOGICAL_AXIS_RULES):
    """Context manager under which `nn.with_logical_constraint` uses our table."""
    import flax.linen as nn

    return nn.logical_axis_rules(tuple(rules))
