"""Pod planning without a pod: AOT-compile the real train step for a TPU topology.

With `jax[tpu]` (libtpu) installed, a CPU host can build the devices of a TPU
topology it does not have (`jax.experimental.topologies.get_topology_desc`),
lower the same jitted step `lov-jax train` runs onto a mesh of those devices
with abstract state and batch (`jax.ShapeDtypeStruct` + shardings; nothing is
allocated), compile it for TPU and read the executable's exact per-chip memory
(`memory_analysis()`) and FLOPs (`cost_analysis()`).

Topology names follow Cloud TPU: `v4-N` and `v5p-N` count TensorCores (two per
chip, one megacore device per chip: v5p-512 = 256 chips), `v5e-N` (= v5litepod)
and `v6e-N` count chips. A raw `<gen>:<AxBxC>` topology string is accepted too.
Multi-slice via `num_slices`: the mesh is the one `lov-jax train` builds
(`distributed.mesh_for_topology`), the data axis across slices (DCN), fsdp and
tensor inside each. The generation decode step is planned by `lov_jax.plan_decode`.

Estimates: step time = FLOPs / (chips * peak bf16 FLOP/s * MFU). The analytical
(model) FLOPs are `metrics.step_flops` with one sample per row (`sample_len`
tokens per sample, default the whole row: the attention-heaviest packing) and
every crop slot used. Compiled FLOPs come from XLA's cost analysis of the
per-chip program times the chip count. Two limits of that figure: custom calls
(the Pallas splash kernel) are not counted, and a while loop's body is counted
once, not once per trip, so with scanned layers (and the micro-batch scan) the
compiled figure is far below the real work (about 1/num_layers of it). It is
printed, but the estimates use the model FLOPs times a recompute factor for the
remat policy (full remat re-runs each block's forward: x4/3 of fwd+bwd).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib.util
import itertools
import os
import time
from unittest import mock

import numpy as np

GIB = 1024**3

INSTALL_HINT = (
    "libtpu is not installed: planning compiles for TPU and needs it (no TPU hardware "
    'required). Install it with `pip install -e .[tpu]` (or `pip install "jax[tpu]==<your '
    'jax version>"`).'
)


class PlanError(ValueError):
    """A plan that cannot be built (bad topology or mesh, libtpu missing, ...)."""


class DoesNotFit(PlanError):
    """The step cannot fit in the chips' HBM (found before or by the TPU compiler)."""


@dataclasses.dataclass(frozen=True)
class Chip:
    family: str  # user-facing prefix: v4 | v5e | v5p | v6e
    topo_prefix: str  # get_topology_desc prefix
    chip_config: str  # "megacore" (one device per 2-core chip) or "default"
    cores_per_name_unit: int  # v4-8 / v5p-8 count TensorCores (2 per chip)
    dims: int  # torus dimensions
    hbm_bytes: int  # usable by one program (see CHIPS)
    peak_flops: float  # dense bf16 FLOP/s per chip
    hbm_bandwidth: float  # bytes/s per chip


# HBM: what the TPU compiler lets a program use, the "available HBM" of its
# out-of-memory error (libtpu with jax 0.10; a little under the 32/16/96/32 GiB on
# the chips). FLOP/s and bandwidth: the Cloud TPU system architecture pages.
CHIPS = {
    "v4": Chip("v4", "v4", "megacore", 2, 3, int(30.75 * GIB), 275e12, 1200e9),
    "v5e": Chip("v5e", "v5e", "default", 1, 2, int(15.75 * GIB), 197e12, 819e9),
    "v5p": Chip("v5p", "v5p", "megacore", 2, 3, int(95.74 * GIB), 459e12, 2765e9),
    "v6e": Chip("v6e", "v6e", "default", 1, 2, int(31.25 * GIB), 918e12, 1638e9),
}
_ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v6lite": "v6e", "v5": "v5p"}


# Executed / model FLOPs per remat policy: full remat re-runs the forward of every
# block in the backward (fwd 2 + bwd 4 + fwd again 2 = 8/6); the dots policies keep
# matmul outputs, so only cheap elementwise work is recomputed.
REMAT_RECOMPUTE = {"full": 4 / 3, "dots": 1.0, "dots_with_no_batch_dims": 1.0, "none": 1.0}


@dataclasses.dataclass(frozen=True)
class Topology:
    name: str  # as given, e.g. "v5p-512"
    chip: Chip
    shape: tuple[int, ...]  # chips per torus dimension, one slice
    num_slices: int = 1

    @property
    def chips_per_slice(self) -> int:
        return int(np.prod(self.shape))

    @property
    def num_chips(self) -> int:
        return self.chips_per_slice * self.num_slices

    @property
    def topology_name(self) -> str:
        return f"{self.chip.topo_prefix}:{'x'.join(map(str, self.shape))}"

    @property
    def chips_per_host_bounds(self) -> tuple[int, int, int]:
        if self.chips_per_slice == 1:
            return (1, 1, 1)
        return (2, 2, 1)

    def describe(self) -> str:
        slices = f" x {self.num_slices} slices" if self.num_slices > 1 else ""
        return (
            f"{self.name} ({self.topology_name}{slices}: {self.num_chips} chips, "
            f"{self.chip.hbm_bytes / GIB:.2f} GiB HBM and {self.chip.peak_flops / 1e12:.0f} "
            "TFLOP/s bf16 per chip)"
        )


def _shape_2d(chips: int) -> tuple[int, int]:
    table = {1: (1, 1), 4: (2, 2), 8: (2, 4), 16: (4, 4), 32: (4, 8), 64: (8, 8)}
    table |= {128: (8, 16), 256: (16, 16)}
    if chips not in table:
        raise PlanError(f"no 2D slice of {chips} chips; choose from {sorted(table)}")
    return table[chips]


def _shape_3d(chips: int) -> tuple[int, int, int]:
    small = {4: (2, 2, 1), 8: (2, 2, 2), 16: (2, 2, 4), 32: (2, 4, 4)}
    if chips in small:
        return small[chips]
    if chips % 64:
        raise PlanError(
            f"no 3D slice of {chips} chips: slices are 4, 8, 16, 32 chips or a multiple of 64"
        )
    best = None
    for a in range(4, chips + 1, 4):
        for b in range(a, chips // a + 1, 4):
            c, rem = divmod(chips, a * b)
            if rem or c < b or c % 4:
                continue
            key = (c / a, c)
            if best is None or key < best[0]:
                best = (key, (a, b, c))
    if best is None:
        raise PlanError(f"no 3D slice of {chips} chips")
    return best[1]


def parse_topology(name: str, num_slices: int = 1) -> Topology:
    """'v5p-512' | 'v5e-16' | 'v6e-256' | 'v4-128' | 'v5litepod-8' | 'v5p:4x4x4' -> Topology."""
    if num_slices < 1:
        raise PlanError(f"num_slices must be >= 1, got {num_slices}")
    text = name.strip().lower()
    if ":" in text:
        gen, _, dims = text.partition(":")
        gen = _ALIASES.get(gen, gen)
        if gen not in CHIPS:
            raise PlanError(f"unknown TPU generation {gen!r}; choose from {sorted(CHIPS)}")
        try:
            shape = tuple(int(d) for d in dims.split("x"))
        except ValueError as err:
            raise PlanError(f"bad topology shape {dims!r} (expected e.g. 4x4x4)") from err
        if len(shape) != CHIPS[gen].dims:
            raise PlanError(f"{gen} topologies have {CHIPS[gen].dims} dimensions, got {dims!r}")
        return Topology(name, CHIPS[gen], shape, num_slices)
    gen, sep, count = text.rpartition("-")
    gen = _ALIASES.get(gen, gen)
    if not sep or gen not in CHIPS or not count.isdigit():
        raise PlanError(
            f"unknown topology {name!r}: use v4-N, v5e-N, v5p-N, v6e-N (Cloud TPU names) "
            "or <gen>:<AxB[xC]>"
        )
    chip = CHIPS[gen]
    n = int(count)
    if n % chip.cores_per_name_unit:
        raise PlanError(f"{name}: {gen}-N counts TensorCores (2 per chip); N must be even")
    chips = n // chip.cores_per_name_unit
    shape = _shape_3d(chips) if chip.dims == 3 else _shape_2d(chips)
    return Topology(name, chip, shape, num_slices)


def libtpu_available() -> bool:
    return importlib.util.find_spec("libtpu") is not None


def topology_devices(topo: Topology) -> list:
    """The (AOT-only) TPU devices of the topology; slice-major order."""
    if not libtpu_available():
        raise PlanError(INSTALL_HINT)
    # AOT compilation never opens a chip: let several planning processes load libtpu
    # at once (otherwise the second one fails on /tmp/libtpu_lockfile).
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from jax.experimental import topologies

    desc = topologies.get_topology_desc(
        platform="tpu",
        topology_name=topo.topology_name,
        chip_config_name=topo.chip.chip_config,
        chips_per_host_bounds=topo.chips_per_host_bounds,
        num_slices=topo.num_slices,
    )
    devices = list(desc.devices)
    if len(devices) != topo.num_chips:
        raise PlanError(
            f"{topo.topology_name} gave {len(devices)} devices, expected {topo.num_chips}"
        )
    return sorted(devices, key=lambda d: (getattr(d, "slice_index", 0), d.id))


def resolve_mesh(
    num_chips: int, data: int = 1, fsdp: int = -1, tensor: int = 1, num_slices: int = 1
) -> tuple[int, int, int]:
    """(data, fsdp, tensor) with one -1 filled in; PlanError unless it tiles the chips."""
    shape = [data, fsdp, tensor]
    if shape.count(-1) > 1:
        raise PlanError("at most one mesh axis may be -1")
    if any(s == 0 or s < -1 for s in shape):
        raise PlanError(f"mesh axes must be positive or -1, got {shape}")
    known = int(np.prod([s for s in shape if s != -1]))
    if -1 in shape:
        if num_chips % known:
            raise PlanError(
                f"mesh data={data} fsdp={fsdp} tensor={tensor} does not divide the "
                f"{num_chips} chips of the topology ({num_chips} % {known} != 0)"
            )
        shape[shape.index(-1)] = num_chips // known
    if int(np.prod(shape)) != num_chips:
        raise PlanError(
            f"mesh data={shape[0]} fsdp={shape[1]} tensor={shape[2]} has "
            f"{int(np.prod(shape))} devices but the topology has {num_chips} chips"
        )
    if num_slices > 1 and shape[0] % num_slices:
        raise PlanError(
            f"with {num_slices} slices the data axis ({shape[0]}) must be a multiple of the "
            "slice count (only data parallelism crosses the DCN)"
        )
    return tuple(shape)


def build_mesh(devices, shape: tuple[int, int, int], num_slices: int = 1):
    """The (data, fsdp, tensor) mesh `lov-jax train` builds on these devices.

    `shape` is global; with several slices the data axis spans them (DCN) and fsdp x
    tensor stay inside each slice (`distributed.mesh_for_topology`, ICI-aware order).
    """
    from lov_jax.distributed import mesh_for_topology

    data, fsdp, tensor = shape
    ici = {"data": data // num_slices, "fsdp": fsdp, "tensor": tensor}
    try:
        return mesh_for_topology(ici, num_slices, devices)
    except (ValueError, NotImplementedError) as err:
        raise PlanError(
            f"cannot lay mesh data={data} fsdp={fsdp} tensor={tensor} out on the topology: "
            "the train mesh does not split physical torus axes, so each mesh axis inside a "
            "slice must be a product of some of the slice's dimensions "
            f"({str(err).splitlines()[0]})"
        ) from err


def check_divisible(tree) -> None:
    """PlanError naming every abstract array whose sharding does not divide its shape."""
    import jax

    bad = []
    for path, x in jax.tree_util.tree_leaves_with_path(tree):
        try:
            x.sharding.shard_shape(x.shape)
        except ValueError:
            bad.append(f"{jax.tree_util.keystr(path)} {x.shape} over {x.sharding.spec}")
    if bad:
        shown = "; ".join(bad[:4]) + (f"; ... ({len(bad)} in all)" if len(bad) > 4 else "")
        raise PlanError(f"the mesh does not divide these arrays (jit would refuse them): {shown}")


class CompiledMemory:
    """Per-chip HBM of a compiled program (mixed into the plan dataclasses, which carry
    `topology` and the compiler's argument/output/alias/temp/code byte counts)."""

    @property
    def total_bytes(self) -> int:
        return (
            self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes
            + self.code_bytes
        )  # fmt: skip

    @property
    def capacity_bytes(self) -> int:
        return self.topology.chip.hbm_bytes

    @property
    def fits(self) -> bool:
        return self.total_bytes <= self.capacity_bytes


@dataclasses.dataclass
class PlanResult(CompiledMemory):
    topology: Topology
    preset: str
    mesh: tuple[int, int, int]
    remat: str
    attention: str
    rows_per_device: int
    grad_accum: int
    seq_len: int
    max_crops: int
    global_rows: int  # B * A rows per optimizer step
    argument_bytes: int
    output_bytes: int
    alias_bytes: int
    temp_bytes: int
    code_bytes: int
    compiled_flops: float  # whole step, all chips (custom calls not counted)
    analytical_flops: float  # whole step, model FLOPs
    mfu: float
    compile_s: float  # lowering + compiling
    lower_s: float = 0.0

    @property
    def tokens_per_step(self) -> int:
        return self.global_rows * self.seq_len

    @property
    def step_seconds(self) -> float:
        """Model FLOPs at the stated MFU."""
        peak = self.topology.num_chips * self.topology.chip.peak_flops
        return self.analytical_flops / (peak * self.mfu)

    @property
    def recompute_factor(self) -> float:
        return REMAT_RECOMPUTE.get(self.remat, 1.0)

    @property
    def step_seconds_compiled(self) -> float:
        """Model FLOPs + remat recompute at the same utilisation of the chips' peak."""
        peak = self.topology.num_chips * self.topology.chip.peak_flops
        return self.analytical_flops * self.recompute_factor / (peak * self.mfu)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens_per_step / self.step_seconds_compiled

    def lines(self) -> list[str]:
        g = lambda b: f"{b / GIB:8.2f} GiB"  # noqa: E731
        head = self.capacity_bytes - self.total_bytes
        ratio = self.compiled_flops / self.analytical_flops if self.analytical_flops else 0
        chips = self.topology.num_chips
        return [
            f"topology     {self.topology.describe()}",
            f"model        {self.preset}  remat={self.remat}  attention={self.attention}",
            f"mesh         {mesh_text(self.mesh, self.topology.num_slices)}",
            f"batch        {self.grad_accum} micro x {self.global_rows // self.grad_accum} rows "
            f"({self.rows_per_device}/data shard) x {self.seq_len} tokens, "
            f"{self.max_crops} crops/row = {self.tokens_per_step} tokens/step",
            f"compiled in  {self.compile_s:.1f} s (lowering {self.lower_s:.1f} s)",
            "HBM per chip",
            f"  arguments  {g(self.argument_bytes)}",
            f"  outputs    {g(self.output_bytes)}  (aliased with arguments: "
            f"{self.alias_bytes / GIB:.2f} GiB)",
            f"  temps      {g(self.temp_bytes)}",
            f"  code       {g(self.code_bytes)}",
            f"  total      {g(self.total_bytes)} of {self.capacity_bytes / GIB:.2f} GiB "
            f"({100 * self.total_bytes / self.capacity_bytes:.0f}%), headroom {head / GIB:.2f} "
            f"GiB -> {'FITS' if self.fits else 'DOES NOT FIT'}",
            "FLOPs per step",
            f"  compiled   {self.compiled_flops:.4g} ({self.compiled_flops / chips:.4g}/chip; "
            "XLA counts scan bodies once and no custom calls: a lower bound)",
            f"  analytical {self.analytical_flops:.4g} (model FLOPs, one sample per row)",
            f"  ratio      {ratio:.3f} compiled/analytical",
            f"estimate at {100 * self.mfu:.0f}% MFU",
            f"  step time  {format_seconds(self.step_seconds)} (model FLOPs); "
            f"{format_seconds(self.step_seconds_compiled)} with remat recompute "
            f"(x{self.recompute_factor:.2f})",
            f"  tokens/s   {self.tokens_per_step / self.step_seconds:,.0f} "
            f"({self.tokens_per_step / self.step_seconds / chips:,.0f} per chip); "
            f"{self.tokens_per_second:,.0f} with remat recompute",
        ]


def out_of_memory(err: Exception, what: str) -> DoesNotFit | None:
    """The TPU compiler's out-of-HBM error as DoesNotFit (else None)."""
    text = str(err)
    if "RESOURCE_EXHAUSTED" not in text and "Ran out of memory" not in text:
        return None
    summary = " ".join([ln.strip() for ln in text.splitlines() if ln.strip()][:3])[:600]
    return DoesNotFit(f"the TPU compiler reports the {what} does not fit: {summary}")


def mesh_text(mesh: tuple[int, int, int], num_slices: int) -> str:
    d, f, t = mesh
    dcn = f" ({num_slices} slices over DCN x {d // num_slices} in-slice)" if num_slices > 1 else ""
    return f"data={d}{dcn} fsdp={f} tensor={t}"


def format_seconds(s: float) -> str:
    return f"{s:.3f} s" if s >= 1 else f"{s * 1e3:.3f} ms"


def cfg_from_config(config, remat: str | None, attention: str):
    from lov_jax.train.run import model_from_config

    if config.init_from:
        raise PlanError("plan builds the preset's shapes; clear init_from (no weights are read)")
    cfg, _ = model_from_config(config)
    kw = {"attention_impl": attention}
    if remat is not None:
        kw["remat_policy"] = remat
    return cfg.replace(**kw)


@contextlib.contextmanager
def _tpu_kernels():
    """Lower Pallas kernels for TPU (not interpret mode) while the host backend is CPU.

    Only the mode changes: under the sharded mesh the model's splash attention runs in
    `jax.shard_map` on its own (`lov_jax.models.splash`), as in `lov-jax train`.
    """
    from lov_jax.models import splash

    kernel = functools.partial(splash.splash_attention, interpret=False)
    with mock.patch.object(splash, "splash_attention", kernel):
        yield


def plan(
    config,
    topology: str | Topology,
    *,
    data: int = 1,
    fsdp: int = -1,
    tensor: int = 1,
    remat: str | None = None,
    attention: str = "splash",
    rows_per_device: int = 1,
    seq_len: int | None = None,
    max_crops: int | None = None,
    grad_accum: int | None = None,
    sample_len: int | None = None,
    mfu: float = 0.5,
    num_slices: int = 1,
    devices=None,
) -> PlanResult:
    """AOT-compile the train step of a stage config for a TPU topology; see module doc."""
    import jax
    import jax.numpy as jnp

    from lov_jax.train import metrics
    from lov_jax.train.step import Trainer

    topo = topology if isinstance(topology, Topology) else parse_topology(topology, num_slices)
    shape = resolve_mesh(topo.num_chips, data, fsdp, tensor, topo.num_slices)
    if not 0 < mfu <= 1:
        raise PlanError(f"mfu must be in (0, 1], got {mfu}")
    if rows_per_device < 1:
        raise PlanError(f"rows_per_device must be >= 1, got {rows_per_device}")
    cfg = cfg_from_config(config, remat, attention)
    seq_len = seq_len or config.data.seq_len
    max_crops = config.data.max_crops if max_crops is None else max_crops
    accum = grad_accum or config.optim.grad_accum
    if attention == "splash" and seq_len % 128:
        raise PlanError(f"splash attention needs seq_len % 128 == 0, got {seq_len}")
    devices = topology_devices(topo) if devices is None else devices
    mesh = build_mesh(devices, shape, topo.num_slices)
    trainer = Trainer(
        cfg, config.optim, mesh, total_steps=1000, loss_chunk=config.train.loss_chunk,
        loss_tokens_per_row=config.train.get("loss_tokens_per_row", 0),
    )  # fmt: skip
    state = trainer.abstract_state()
    rows = rows_per_device * shape[0] * shape[1]  # B: rows sharded over (data, fsdp)
    size = cfg.vision.image_size
    a, b, n, length = accum, rows, max_crops, seq_len
    specs = {
        "tokens": ((a, b, length), jnp.int32),
        "targets": ((a, b, length), jnp.int32),
        "loss_mask": ((a, b, length), jnp.float32),
        "segment_ids": ((a, b, length), jnp.int32),
        "positions": ((a, b, length), jnp.int32),
        "pixels": ((a, b, n, size, size, 3), jnp.uint8),
        "vis_idx": ((a, b, length, 4), jnp.int32),
        "vis_w": ((a, b, length, 4), jnp.float32),
    }
    batch = {
        k: jax.ShapeDtypeStruct(s, dt, sharding=trainer.batch_sharding)
        for k, (s, dt) in specs.items()
    }
    check_divisible((state, batch))
    state_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))
    if state_bytes / topo.num_chips > topo.chip.hbm_bytes:
        raise DoesNotFit(
            f"{config.model.preset} cannot fit on {topo.name} at all: params + optimizer "
            f"state are {state_bytes / GIB:.1f} GiB, {state_bytes / topo.num_chips / GIB:.1f} "
            f"GiB/chip even fully sharded, over {topo.chip.hbm_bytes / GIB:.2f} GiB HBM"
        )
    start = time.perf_counter()
    try:
        with trainer._context(), _tpu_kernels():
            lowered = trainer._step.lower(state, batch)
            lower_s = time.perf_counter() - start
            compiled = lowered.compile()
    except Exception as err:
        if (oom := out_of_memory(err, "step")) is not None:
            raise oom from err
        raise
    compile_s = time.perf_counter() - start

    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    if isinstance(cost, list | tuple):
        cost = cost[0] if cost else {}
    per_chip_flops = float((cost or {}).get("flops", 0.0))
    sample = min(sample_len or seq_len, seq_len)
    per_row = [sample] * (seq_len // sample) + ([seq_len % sample] if seq_len % sample else [])
    analytical = metrics.step_flops(cfg, per_row * (a * b), a * b * n, config.optim.trainable)
    return PlanResult(
        topology=topo,
        preset=config.model.preset,
        mesh=shape,
        remat=cfg.remat_policy,
        attention=attention,
        rows_per_device=rows_per_device,
        grad_accum=accum,
        seq_len=seq_len,
        max_crops=max_crops,
        global_rows=a * b,
        argument_bytes=int(mem.argument_size_in_bytes),
        output_bytes=int(mem.output_size_in_bytes),
        alias_bytes=int(mem.alias_size_in_bytes),
        temp_bytes=int(mem.temp_size_in_bytes),
        code_bytes=int(mem.generated_code_size_in_bytes),
        compiled_flops=per_chip_flops * topo.num_chips,
        analytical_flops=analytical,
        mfu=mfu,
        compile_s=compile_s,
        lower_s=lower_s,
    )


def search(
    config,
    topology: str,
    *,
    tensors: tuple[int, ...] = (1, 2, 4, 8),
    remats: tuple[str, ...] = ("full", "dots_with_no_batch_dims"),
    rows: tuple[int, ...] = (1, 2),
    num_slices: int = 1,
    log=print,
    **kw,
) -> tuple[list[PlanResult], list[tuple[dict, str]]]:
    """Compile a small grid (tensor x remat x rows per device; fsdp = the rest).

    Returns (fitting plans ranked by estimated tokens/s, then by HBM used, [(setting,
    reason)] that failed or did not fit). Within one (tensor, remat) a larger row count is
    only tried if the smaller one fits. At a fixed MFU the estimate differs only by the
    remat recompute: it cannot see communication (fsdp gathers vs tensor all-reduces).
    """
    topo = parse_topology(topology, num_slices)
    devices = topology_devices(topo)
    data = topo.num_slices
    fitting, rejected = [], []
    for tensor, remat in itertools.product(tensors, remats):
        if topo.num_chips % (tensor * data):
            continue
        for r in sorted(rows):
            setting = {"data": data, "tensor": tensor, "remat": remat, "rows_per_device": r}
            try:
                res = plan(
                    config, topo, data=data, fsdp=-1, tensor=tensor, remat=remat,
                    rows_per_device=r, devices=devices, **kw,
                )  # fmt: skip
            except Exception as err:  # noqa: BLE001 - report and keep searching
                msg = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
                rejected.append((setting, msg))
                log(f"  {setting}: failed ({msg})")
                break
            status = "fits" if res.fits else "does not fit"
            log(
                f"  {setting}: {res.total_bytes / GIB:.2f} GiB/chip, {status}, "
                f"{res.tokens_per_second:,.0f} tokens/s est. ({res.compile_s:.0f} s compile)"
            )
            if not res.fits:
                rejected.append((setting, f"{res.total_bytes / GIB:.2f} GiB/chip > capacity"))
                break
            fitting.append(res)
    fitting.sort(key=lambda r: (-r.tokens_per_second, r.total_bytes))
    return fitting, rejected
