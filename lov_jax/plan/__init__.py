"""Pod planning without a pod: AOT-compile the real train / decode step for a TPU topology.

    topology.py   Cloud TPU names -> chips, slices and the (AOT-only) devices
    compile.py    the mesh on a topology, divisibility, per-chip HBM, lower + compile
    train.py      the train step (`Trainer.lower`): HBM, FLOPs, step time; mesh search
    decode.py     the KV-cache decode step (`Generator.lower_decode`): HBM, tokens/s
    commands.py   `lov-jax plan`

Needs libtpu (`pip install -e .[tpu]`), not TPU hardware.
"""

from lov_jax.plan.compile import build_mesh, check_divisible, resolve_mesh
from lov_jax.plan.decode import DecodePlan, plan_decode
from lov_jax.plan.topology import (
    CHIPS,
    GIB,
    INSTALL_HINT,
    DoesNotFit,
    PlanError,
    Topology,
    libtpu_available,
    parse_topology,
    topology_devices,
)
from lov_jax.plan.train import SEARCH_CONTEXTS, PlanResult, plan, search

__all__ = [
    "CHIPS",
    "GIB",
    "INSTALL_HINT",
    "DecodePlan",
    "DoesNotFit",
    "PlanError",
    "PlanResult",
    "SEARCH_CONTEXTS",
    "Topology",
    "build_mesh",
    "check_divisible",
    "libtpu_available",
    "parse_topology",
    "plan",
    "plan_decode",
    "resolve_mesh",
    "search",
    "topology_devices",
]
