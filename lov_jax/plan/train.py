"""Train-step plan: AOT-compile the real train step for a TPU topology.

The step `lov-jax train` runs (`Trainer.lower`) is lowered onto a mesh of the
topology's devices with abstract state and batch (`Trainer.abstract_state` /
`abstract_batch`: `jax.ShapeDtypeStruct` + shardings; nothing is allocated), compiled
for TPU, and the executable's exact per-chip memory (`memory_analysis()`) and FLOPs
(`cost_analysis()`) are read. Multi-slice via `num_slices`: the data axis across
slices (DCN), fsdp and tensor inside each, as `lov-jax train` builds it.

Estimates: step time = FLOPs / (chips * peak bf16 FLOP/s * MFU). The analytical
(model) FLOPs are `metrics.step_flops` with one sample per row (`sample_len`
tokens per sample, default the whole row: the attention-heaviest packing) and
every crop slot used. Compiled FLOPs are read from the per-chip optimized HLO
(`plan.flops.hlo_flops`, times the chip count): matmul FLOPs with each while body
(scanned layers, the micro-batch scan, the chunked loss) counted times its
`known_trip_count`, and the splash kernels from their formula; XLA's own
`cost_analysis()` (each body once, no custom calls) is printed beside it. The
executed figure (`plan.flops.executed_flops`) is the model FLOPs plus the recompute
the step must do (remat, the loss's head forward, the attention kernel's), so
compiled / executed shows whether the compiled step does wasted or missing work.
The step time uses the model FLOPs times the remat policy's recompute factor (full
remat re-runs each block's forward: x4/3 of fwd+bwd).
"""

from __future__ import annotations

import dataclasses
import itertools

from lov_jax import sharding
from lov_jax.plan import flops
from lov_jax.plan.compile import (
    CompiledMemory,
    build_mesh,
    cfg_from_config,
    check_divisible,
    compile_for_tpu,
    format_seconds,
    mesh_text,
    resolve_mesh,
)
from lov_jax.plan.topology import (
    GIB,
    DoesNotFit,
    PlanError,
    Topology,
    parse_topology,
    topology_devices,
)

# Executed / model FLOPs per remat policy: full remat re-runs the forward of every
# block in the backward (fwd 2 + bwd 4 + fwd again 2 = 8/6); the dots policies keep
# matmul outputs, so only cheap elementwise work is recomputed.
REMAT_RECOMPUTE = {"full": 4 / 3, "dots": 1.0, "dots_with_no_batch_dims": 1.0, "none": 1.0}


@dataclasses.dataclass
class PlanResult(CompiledMemory):
    topology: Topology
    preset: str
    mesh: tuple[int, int, int, int]  # sharding.MESH_AXES
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
    compiled_flops: float  # whole step, all chips: HLO matmuls x trip counts + kernels
    analytical_flops: float  # whole step, model FLOPs
    executed_flops: float  # model FLOPs + the recompute the step must do (plan.flops)
    xla_cost_flops: float  # XLA's cost_analysis() x chips (while bodies once, no kernels)
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
        ratio = self.compiled_flops / self.executed_flops if self.executed_flops else 0
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
            "HLO matmuls x while trip counts + splash kernels)",
            f"  executed   {self.executed_flops:.4g} (model FLOPs + remat / loss / kernel "
            "recompute)",
            f"  analytical {self.analytical_flops:.4g} (model FLOPs, one sample per row)",
            f"  ratio      {ratio:.3f} compiled/executed, "
            f"{self.compiled_flops / self.analytical_flops:.3f} compiled/analytical",
            f"  XLA cost   {self.xla_cost_flops:.4g} (cost_analysis: scan bodies once, no "
            "custom calls)",
            f"estimate at {100 * self.mfu:.0f}% MFU",
            f"  step time  {format_seconds(self.step_seconds)} (model FLOPs); "
            f"{format_seconds(self.step_seconds_compiled)} with remat recompute "
            f"(x{self.recompute_factor:.2f})",
            f"  tokens/s   {self.tokens_per_step / self.step_seconds:,.0f} "
            f"({self.tokens_per_step / self.step_seconds / chips:,.0f} per chip); "
            f"{self.tokens_per_second:,.0f} with remat recompute",
        ]


def plan(
    config,
    topology: str | Topology,
    *,
    data: int = 1,
    fsdp: int = -1,
    tensor: int = 1,
    context: int = 1,
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

    from lov_jax.train import metrics
    from lov_jax.train.step import Trainer

    topo = topology if isinstance(topology, Topology) else parse_topology(topology, num_slices)
    shape = resolve_mesh(topo.num_chips, data, fsdp, tensor, topo.num_slices, context)
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
        context=(cp := sharding.context_from_config(config.mesh)),
    )  # fmt: skip
    if shape[2] > 1:  # the LLM's attention is the context strategy's (models/ring.py)
        attention = f"{cp.strategy} over context={shape[2]} ({cp.reorder})"
    state = trainer.abstract_state()
    rows = rows_per_device * sharding.batch_shards(mesh.shape)  # B: rows over activation_batch
    a, b, n, length = accum, rows, max_crops, seq_len
    batch = trainer.abstract_batch(b, length, n, micro_batches=a)
    check_divisible((state, batch))
    state_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))
    if state_bytes / topo.num_chips > topo.chip.hbm_bytes:
        raise DoesNotFit(
            f"{config.model.preset} cannot fit on {topo.name} at all: params + optimizer "
            f"state are {state_bytes / GIB:.1f} GiB, {state_bytes / topo.num_chips / GIB:.1f} "
            f"GiB/chip even fully sharded, over {topo.chip.hbm_bytes / GIB:.2f} GiB HBM"
        )
    compiled, lower_s, compile_s = compile_for_tpu(lambda: trainer.lower(state, batch), "step")

    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    if isinstance(cost, list | tuple):
        cost = cost[0] if cost else {}
    per_chip_flops = float((cost or {}).get("flops", 0.0))
    counted = flops.hlo_flops(compiled.as_text())
    sample = min(sample_len or seq_len, seq_len)
    per_row = [sample] * (seq_len // sample) + ([seq_len % sample] if seq_len % sample else [])
    analytical = metrics.step_flops(cfg, per_row * (a * b), a * b * n, config.optim.trainable)
    executed = flops.executed_flops(
        cfg, per_row * (a * b), a * b * n, config.optim.trainable, rows=a * b,
        seq_len=seq_len, loss_chunk=config.train.loss_chunk,
        recompute=REMAT_RECOMPUTE.get(cfg.remat_policy, 1.0),
    )  # fmt: skip
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
        compiled_flops=counted.total * topo.num_chips,
        analytical_flops=analytical,
        executed_flops=executed,
        xla_cost_flops=per_chip_flops * topo.num_chips,
        mfu=mfu,
        compile_s=compile_s,
        lower_s=lower_s,
    )


# Context sizes `search` tries (those the chips and the row length allow).
SEARCH_CONTEXTS = (1, 2, 4, 8)


def search(
    config,
    topology: str,
    *,
    contexts: tuple[int, ...] = (1,),
    tensors: tuple[int, ...] = (1, 2, 4, 8),
    remats: tuple[str, ...] = ("full", "dots_with_no_batch_dims"),
    rows: tuple[int, ...] = (1, 2),
    num_slices: int = 1,
    log=print,
    **kw,
) -> tuple[list[PlanResult], list[tuple[dict, str]]]:
    """Compile a small grid (context x tensor x remat x rows per device; fsdp = the rest).

    Returns (fitting plans ranked by estimated tokens/s, then by HBM used, [(setting,
    reason)] that failed or did not fit). Within one (tensor, remat) a larger row count is
    only tried if the smaller one fits. At a fixed MFU the estimate differs only by the
    remat recompute: it cannot see communication (fsdp gathers vs tensor all-reduces).
    """
    topo = parse_topology(topology, num_slices)
    devices = topology_devices(topo)
    data = topo.num_slices
    fitting, rejected = [], []
    for context, tensor, remat in itertools.product(contexts, tensors, remats):
        if topo.num_chips % (context * tensor * data):
            continue
        for r in sorted(rows):
            setting = {"data": data, "context": context, "tensor": tensor, "remat": remat,
                       "rows_per_device": r}  # fmt: skip
            try:
                res = plan(
                    config, topo, data=data, fsdp=-1, tensor=tensor, context=context,
                    remat=remat, rows_per_device=r, devices=devices, **kw,
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
