"""What the train and decode plans share: the mesh on a topology, divisibility checks,
per-chip HBM of a compiled program, and lowering + compiling for TPU.

Both plans compile the same functions the commands run, through public seams
(`Trainer.lower`, `Generator.lower_decode`); Pallas kernels are lowered for TPU (not
interpret mode) while the host backend is CPU with `splash.kernel_mode`.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from lov_jax import sharding
from lov_jax.plan.topology import DoesNotFit, PlanError


def resolve_mesh(
    num_chips: int,
    data: int = 1,
    fsdp: int = -1,
    tensor: int = 1,
    num_slices: int = 1,
    context: int = 1,
) -> tuple[int, int, int, int]:
    """Global (data, fsdp, context, tensor) (`sharding.MESH_AXES`) with the -1 filled in;
    PlanError unless it tiles the chips.

    With several slices only data parallelism crosses the DCN: the global data axis is a
    multiple of the slice count, fsdp x context x tensor live inside each slice.
    """
    if num_slices > 1 and data != -1 and data % num_slices:
        raise PlanError(
            f"with {num_slices} slices the data axis ({data}) must be a multiple of the "
            "slice count (only data parallelism crosses the DCN)"
        )
    per_slice = data // num_slices if data != -1 else -1
    try:
        d, f, c, t = sharding.mesh_shape(
            per_slice, fsdp, tensor, num_chips, num_slices, context=context
        )
    except ValueError as err:
        raise PlanError(f"{err} (the topology's chips)") from None
    return d * num_slices, f, c, t


def build_mesh(devices, shape: tuple[int, int, int, int], num_slices: int = 1):
    """The mesh `lov-jax train` builds on these devices (`sharding.make_mesh`).

    `shape` is global (data, fsdp, context, tensor); with several slices the data axis
    spans them (DCN) and the others stay inside each slice (ICI-aware order).
    """
    data, fsdp, context, tensor = shape
    try:
        return sharding.make_mesh(
            data // num_slices, fsdp, tensor, context=context, dcn_data=num_slices,
            devices=devices,
        )  # fmt: skip
    except (ValueError, NotImplementedError) as err:
        raise PlanError(
            f"cannot lay mesh {mesh_text(shape, 1)} out on the topology "
            f"({str(err).splitlines()[0]})"
        ) from err


def compile_for_tpu(lower: Callable[[], object], what: str):
    """(compiled, lowering seconds, lowering + compiling seconds) of `lower()`'s program.

    Pallas kernels traced inside lower for TPU; the compiler's out-of-HBM error is
    raised as DoesNotFit naming `what`.
    """
    from lov_jax.models import splash

    start = time.perf_counter()
    try:
        with splash.kernel_mode(interpret=False):
            lowered = lower()
        lower_s = time.perf_counter() - start
        compiled = lowered.compile()
    except Exception as err:
        if (oom := out_of_memory(err, what)) is not None:
            raise oom from err
        raise
    return compiled, lower_s, time.perf_counter() - start


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


def out_of_memory(err: Exception, what: str) -> DoesNotFit | None:
    """The TPU compiler's out-of-HBM error as DoesNotFit (else None)."""
    text = str(err)
    if "RESOURCE_EXHAUSTED" not in text and "Ran out of memory" not in text:
        return None
    summary = " ".join([ln.strip() for ln in text.splitlines() if ln.strip()][:3])[:600]
    return DoesNotFit(f"the TPU compiler reports the {what} does not fit: {summary}")


def mesh_text(mesh: tuple[int, int, int, int], num_slices: int) -> str:
    d, f, c, t = mesh
    dcn = f" ({num_slices} slices over DCN x {d // num_slices} in-slice)" if num_slices > 1 else ""
    return f"data={d}{dcn} fsdp={f} context={c} tensor={t}"


def format_seconds(s: float) -> str:
    return f"{s:.3f} s" if s >= 1 else f"{s * 1e3:.3f} ms"


def cfg_from_config(config, remat: str | None, attention: str):
    """The stage config's preset as `lov-jax train` builds it (special ids: its tokenizer's)."""
    from data_pipelines.tokenizer import qwen2_token_ids
    from lov_jax.token_ids import TokenIdError
    from lov_jax.train.run import load_tokenizer_for, model_from_config

    if config.init_from:
        raise PlanError("plan builds the preset's shapes; clear init_from (no weights are read)")
    cfg, _ = model_from_config(config)
    kw = {"attention_impl": attention}
    ids = qwen2_token_ids(load_tokenizer_for(config))
    try:
        ids.check(cfg.text.vocab_size)
        kw["token_ids"] = ids
    except TokenIdError:
        # A LLaVA-1.5 / NeXT preset's vocabulary is not Qwen's: its ids come with a
        # checkpoint (init_from); the train step's shapes need none.
        if config.init_from:
            raise
    if remat is not None:
        kw["remat_policy"] = remat
    return cfg.replace(**kw)
