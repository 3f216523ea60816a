"""TPU topologies by Cloud TPU name, their chips, and their (AOT-only) devices.

Topology names follow Cloud TPU: `v4-N` and `v5p-N` count TensorCores (two per
chip, one megacore device per chip: v5p-512 = 256 chips), `v5e-N` (= v5litepod)
and `v6e-N` count chips. A raw `<gen>:<AxBxC>` topology string is accepted too.
With `jax[tpu]` (libtpu) installed, a CPU host builds the devices of a topology it
does not have (`jax.experimental.topologies.get_topology_desc`).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os

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
