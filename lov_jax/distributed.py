"""Multi-host start-up and topology-aware meshes.

`maybe_initialize()` joins this process to a multi-controller JAX job (`jax.distributed`)
when the environment says it is one, and does nothing for a single process:

- explicit: arguments, or `LOV_JAX_COORDINATOR` (host:port), `LOV_JAX_NUM_PROCESSES`,
  `LOV_JAX_PROCESS_ID` (and optional `LOV_JAX_LOCAL_DEVICE_IDS`, comma separated), as
  exported by `launch/local_cluster.sh`;
- forced: `LOV_JAX_DISTRIBUTED=1` (JAX's cluster detection fills in the values; the
  TPU VM launcher sets it, since a TPU VM's shell has no pod variables); `=0` turns
  auto-detection off;
- auto-detected (JAX's own cluster detection fills in the values): SLURM with more
  than one task, TPU VM pods (`TPU_WORKER_HOSTNAMES` naming several hosts), multi-slice
  (`MEGASCALE_*`), GKE/XPK TPU jobs.

On the CPU backend, collectives go through gloo (set before the backend starts).

`mesh_for_topology(ici, dcn_data)` builds the (data, fsdp, tensor) mesh of a job that
spans `dcn_data` slices: the `ici` axes live inside a slice (fast interconnect), and
the slices are stacked along the `data` axis (data-center network).
`mesh_from_config(config.mesh)` is that mesh for a stage config's `mesh` block; every
mesh built from a train config goes through it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

from lov_jax import sharding

ENV_COORDINATOR = "LOV_JAX_COORDINATOR"
ENV_NUM_PROCESSES = "LOV_JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "LOV_JAX_PROCESS_ID"
ENV_LOCAL_DEVICE_IDS = "LOV_JAX_LOCAL_DEVICE_IDS"
ENV_FORCE = "LOV_JAX_DISTRIBUTED"

_initialized_here = False


def detect_cluster(environ: Mapping[str, str] | None = None) -> str | None:
    """Name of the multi-process environment found in `environ` ('explicit', 'forced',
    'slurm', 'tpu', 'megascale'), or None for a single-process run."""
    env = os.environ if environ is None else environ
    force = env.get(ENV_FORCE, "").strip().lower()
    if force in ("0", "false", "no", "off"):
        return None
    if env.get(ENV_COORDINATOR) or _int(env.get(ENV_NUM_PROCESSES), 1) > 1:
        return "explicit"
    if force in ("1", "true", "yes", "on", "auto"):
        return "forced"
    if any(k.startswith("MEGASCALE_") for k in env) and env.get("MEGASCALE_COORDINATOR_ADDRESS"):
        return "megascale"
    hosts = [h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]
    if len(hosts) > 1:
        return "tpu"
    # Inside `srun` the step's task count; a bare batch script / salloc shell stays single.
    tasks = env.get("SLURM_STEP_NUM_TASKS", env.get("SLURM_NTASKS", env.get("SLURM_NPROCS")))
    if env.get("SLURM_JOB_ID") and _int(tasks, 1) > 1:
        return "slurm"
    return None


def maybe_initialize(
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    local_device_ids: Sequence[int] | None = None,
) -> bool:
    """`jax.distributed.initialize()` when this is a multi-process job; idempotent.

    Returns True when this process is (now or already) part of a distributed job.
    """
    global _initialized_here
    if _initialized_here or _is_initialized():
        return True
    env = os.environ
    coordinator = coordinator or env.get(ENV_COORDINATOR) or None
    if num_processes is None and env.get(ENV_NUM_PROCESSES):
        num_processes = int(env[ENV_NUM_PROCESSES])
    if process_id is None and env.get(ENV_PROCESS_ID):
        process_id = int(env[ENV_PROCESS_ID])
    if local_device_ids is None and env.get(ENV_LOCAL_DEVICE_IDS):
        local_device_ids = [int(x) for x in env[ENV_LOCAL_DEVICE_IDS].split(",")]

    explicit = coordinator is not None or (num_processes or 1) > 1
    if not explicit and detect_cluster() is None:
        return False
    if explicit and (coordinator is None or num_processes is None or process_id is None):
        raise ValueError(
            "an explicit multi-process job needs coordinator, num_processes and process_id "
            f"(or ${ENV_COORDINATOR}, ${ENV_NUM_PROCESSES}, ${ENV_PROCESS_ID}); got "
            f"coordinator={coordinator!r} num_processes={num_processes} process_id={process_id}"
        )
    if explicit and num_processes == 1:
        return False
    _use_gloo_on_cpu()
    if explicit:
        jax.distributed.initialize(
            coordinator_address=coordinator, num_processes=num_processes,
            process_id=process_id, local_device_ids=local_device_ids,
        )  # fmt: skip
    else:  # SLURM / TPU VM / GKE: JAX's cluster detection reads the environment
        jax.distributed.initialize(local_device_ids=local_device_ids)
    _initialized_here = True
    return True


def mesh_for_topology(
    ici: Mapping[str, int], dcn_data: int = 1, devices: Sequence[jax.Device] | None = None
) -> Mesh:
    """(data, fsdp, tensor) mesh: `ici` axes inside each slice, `dcn_data` slices on `data`.

    `ici` maps mesh axis names (`data`, `fsdp`, `tensor`; missing = 1, one may be -1) to
    sizes within one slice; the global `data` axis is `dcn_data * ici['data']`. Slices are
    told apart by `device.slice_index` (TPU multi-slice) or, where that does not give
    `dcn_data` groups (CPU/GPU clusters), by process.
    """
    devices = list(jax.devices() if devices is None else devices)
    unknown = set(ici) - set(sharding.MESH_AXES)
    if unknown:
        raise ValueError(f"unknown mesh axes {sorted(unknown)}; expected {sharding.MESH_AXES}")
    if dcn_data < 1:
        raise ValueError(f"dcn_data must be >= 1, got {dcn_data}")
    if len(devices) % dcn_data:
        raise ValueError(f"{len(devices)} devices do not split into {dcn_data} slices")
    per_slice = len(devices) // dcn_data
    shape = [int(ici.get(a, 1)) for a in sharding.MESH_AXES]
    if shape.count(-1) > 1:
        raise ValueError("at most one ici mesh axis may be -1")
    known = int(np.prod([s for s in shape if s != -1]))
    if -1 in shape:
        if per_slice % known:
            raise ValueError(
                f"{per_slice} devices per slice ({len(devices)} devices / {dcn_data} slices) "
                f"do not divide into ici mesh {dict(zip(sharding.MESH_AXES, shape, strict=True))}"
            )
        shape[shape.index(-1)] = per_slice // known
    if int(np.prod(shape)) * dcn_data != len(devices):
        sizes = " x ".join(f"{a}={s}" for a, s in zip(sharding.MESH_AXES, shape, strict=True))
        raise ValueError(
            f"mesh ici({sizes}) x dcn_data={dcn_data} needs {int(np.prod(shape)) * dcn_data} "
            f"devices, have {len(devices)} ({per_slice} per slice)"
        )
    if dcn_data == 1:
        data, fsdp, tensor = shape
        return sharding.make_mesh(data=data, fsdp=fsdp, tensor=tensor, devices=devices)
    from jax.experimental import mesh_utils

    # Granules: TPU slices where devices carry distinct slice_index values, else processes
    # (GPU/CPU clusters report slice_index 0 everywhere, or none).
    slices = {getattr(d, "slice_index", None) for d in devices}
    processes = {d.process_index for d in devices}
    if None not in slices and len(slices) == dcn_data:
        by_process = False
    elif len(processes) == dcn_data:
        by_process = True
    else:
        raise ValueError(
            f"devices span {len(slices)} slice(s) and {len(processes)} process(es): "
            f"cannot form dcn_data={dcn_data} slices"
        )
    array = mesh_utils.create_hybrid_device_mesh(
        shape, (dcn_data, 1, 1), devices, process_is_granule=by_process
    )
    return Mesh(array, sharding.MESH_AXES, axis_types=(AxisType.Auto,) * len(shape))


def mesh_from_config(
    mesh_config: Mapping[str, int], devices: Sequence[jax.Device] | None = None
) -> Mesh:
    """The mesh of a stage config's `mesh` block (`configs/common.py`).

    `data`, `fsdp`, `tensor` are sizes inside one slice (one may be -1: the rest of the
    slice); `dcn_data` slices are stacked on `data` over DCN, so the global data axis is
    `dcn_data * data`; `num_devices` > 0 keeps only the first that many devices (the CPU
    demo). The product must equal the device count.
    """
    fields = {"data": 1, "fsdp": -1, "tensor": 1, "dcn_data": 1, "num_devices": -1}
    unknown = set(mesh_config) - set(fields)
    if unknown:
        raise ValueError(f"unknown config.mesh fields {sorted(unknown)}; expected {list(fields)}")
    fields.update({k: int(v) for k, v in mesh_config.items()})
    devices = list(jax.devices() if devices is None else devices)
    if fields["num_devices"] > 0:
        if fields["num_devices"] > len(devices):
            raise ValueError(
                f"mesh.num_devices={fields['num_devices']}: only {len(devices)} devices"
            )
        devices = devices[: fields["num_devices"]]
    ici = {a: fields[a] for a in sharding.MESH_AXES}
    _check_mesh_size(ici, fields["dcn_data"], len(devices))
    return mesh_for_topology(ici, fields["dcn_data"], devices)


def _check_mesh_size(ici: Mapping[str, int], dcn_data: int, num_devices: int) -> None:
    """A ValueError naming the config.mesh fields unless they tile `num_devices`."""
    sizes = {**ici, "dcn_data": dcn_data}
    named = " x ".join(f"mesh.{k}={v}" for k, v in sizes.items())
    values = list(sizes.values())
    if dcn_data < 1 or values.count(-1) > 1 or any(v == 0 or v < -1 for v in values):
        raise ValueError(f"{named}: sizes must be >= 1, and at most one of data/fsdp/tensor -1")
    known = int(np.prod([v for v in values if v != -1]))
    if -1 in values and num_devices % known:
        raise ValueError(f"{named}: {num_devices} devices are not a multiple of {known}")
    if -1 not in values and known != num_devices:
        raise ValueError(
            f"{named} = {known} devices, but the job has {num_devices}; make the product "
            "equal the device count (or set one of data/fsdp/tensor to -1)"
        )


def _use_gloo_on_cpu() -> None:
    platforms = os.environ.get("JAX_PLATFORMS", "") or str(jax.config.jax_platforms or "")
    if platforms.split(",")[0].strip() == "cpu":
        jax.config.update("jax_cpu_collectives_implementation", "gloo")


def _is_initialized() -> bool:
    probe = getattr(jax.distributed, "is_initialized", None)
    return bool(probe()) if callable(probe) else False


def _int(value: str | None, default: int) -> int:
    try:
        return int(value) if value not in (None, "") else default
    except ValueError:
        return default
