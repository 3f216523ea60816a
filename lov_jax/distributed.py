"""Multi-host start-up: join a multi-controller JAX job when the environment is one.

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
The mesh of a multi-slice job is `sharding.make_mesh(..., dcn_data=slices)`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import jax

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
