"""Decode-step plan: AOT-compile the KV-cache decode of `lov-jax generate`/eval for a TPU.

The compiled function is the Generator's jitted decode loop (`lov_jax.inference.engine`,
`Generator.lower_decode`), the `while_loop` whose body is one token step of the whole
batch, lowered with abstract params and cache (`jax.ShapeDtypeStruct` + shardings of the
rules table) on a mesh of the topology's devices. Its memory analysis gives the exact
per-chip HBM:

    params   dtype[...]                      every weight, vision tower included
    cache    (k, v) dtype[L, B, C, K, Dh]    B over data x fsdp, K over tensor
    temps    one step's activations, logits float32[B, V], sampling

Decode is memory bound. Each step a chip reads from HBM the language-model weights it
holds (the untied input embedding only for B rows, so it is left out) and its whole
cache shard (the XLA decode attention reads all C slots, masked); the estimate is

    step time = max(bytes read per chip / HBM bandwidth, FLOPs / (chips * peak bf16))
    tokens/s  = B / step time

with the chips' HBM bandwidths from `plan.topology.CHIPS` (Cloud TPU docs: v4 1200, v5e 819,
v5p 2765, v6e 1638 GB/s). FLOPs per step: 2 * LM params * B plus the attention,
4 * B * C * N * Dh per layer. With fsdp > 1 the weights are sharded over fsdp too; the
estimate assumes each chip reads only its shard (XLA may instead all-gather them over
ICI, reading W / tensor per chip: printed as well). Compiled FLOPs are not used: XLA
counts the loop body and the layer scan inside it once.
"""

from __future__ import annotations

import dataclasses

import numpy as np

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
from lov_jax.plan.topology import GIB, PlanError, Topology, parse_topology, topology_devices


@dataclasses.dataclass
class DecodePlan(CompiledMemory):
    topology: Topology
    preset: str
    mesh: tuple[int, int, int, int]  # sharding.MESH_AXES
    batch: int
    cache_len: int
    new_tokens: int
    param_dtype: str
    cache_dtype: str
    params_bytes: int  # per chip, every weight
    lm_read_bytes: int  # per chip, LM weights one step reads (held shard)
    lm_gathered_bytes: int  # per chip, the same with fsdp shards all-gathered
    cache_bytes: int  # per chip, k and v
    argument_bytes: int
    output_bytes: int
    alias_bytes: int
    temp_bytes: int
    code_bytes: int
    step_flops: float  # whole batch, one token each
    compile_s: float

    @property
    def memory_seconds(self) -> float:
        return (self.lm_read_bytes + self.cache_bytes) / self.topology.chip.hbm_bandwidth

    @property
    def compute_seconds(self) -> float:
        chip = self.topology.chip
        return self.step_flops / (self.topology.num_chips * chip.peak_flops)

    @property
    def step_seconds(self) -> float:
        return max(self.memory_seconds, self.compute_seconds)

    @property
    def tokens_per_second(self) -> float:
        return self.batch / self.step_seconds

    def lines(self) -> list[str]:
        g = lambda b: f"{b / GIB:8.2f} GiB"  # noqa: E731
        chip = self.topology.chip
        head = self.capacity_bytes - self.total_bytes
        bound = "memory" if self.memory_seconds >= self.compute_seconds else "compute"
        gathered = (self.lm_gathered_bytes + self.cache_bytes) / chip.hbm_bandwidth
        lines = [
            f"topology     {self.topology.describe()}",
            f"model        {self.preset} decode step (KV cache), params {self.param_dtype}, "
            f"cache {self.cache_dtype}",
            f"mesh         {mesh_text(self.mesh, self.topology.num_slices)}",
            f"batch        {self.batch} rows x cache {self.cache_len} slots "
            f"({self.cache_len - self.new_tokens} prompt + {self.new_tokens} new)",
            f"compiled in  {self.compile_s:.1f} s",
            "HBM per chip",
            f"  params     {g(self.params_bytes)}  (LM weights read per step: "
            f"{self.lm_read_bytes / GIB:.2f} GiB)",
            f"  cache      {g(self.cache_bytes)}",
            f"  arguments  {g(self.argument_bytes)}  (params + cache + inputs)",
            f"  outputs    {g(self.output_bytes)}  (aliased with arguments: "
            f"{self.alias_bytes / GIB:.2f} GiB, the donated cache)",
            f"  temps      {g(self.temp_bytes)}",
            f"  code       {g(self.code_bytes)}",
            f"  total      {g(self.total_bytes)} of {self.capacity_bytes / GIB:.2f} GiB "
            f"({100 * self.total_bytes / self.capacity_bytes:.0f}%), headroom {head / GIB:.2f} "
            f"GiB -> {'FITS' if self.fits else 'DOES NOT FIT'}",
            f"estimate per step (HBM {chip.hbm_bandwidth / 1e9:,.0f} GB/s, "
            f"{chip.peak_flops / 1e12:.0f} TFLOP/s bf16 per chip)",
            f"  memory     {format_seconds(self.memory_seconds)} "
            f"({(self.lm_read_bytes + self.cache_bytes) / GIB:.2f} GiB read per chip)",
            f"  compute    {format_seconds(self.compute_seconds)} ({self.step_flops:.4g} FLOPs at "
            "100% of peak)",
            f"  step time  {format_seconds(self.step_seconds)} ({bound} bound)",
            f"  tokens/s   {self.tokens_per_second:,.0f} "
            f"({self.tokens_per_second / self.topology.num_chips:,.0f} per chip)",
        ]
        if self.lm_gathered_bytes != self.lm_read_bytes:
            lines.append(
                f"  fsdp       if XLA all-gathers the fsdp-sharded weights, each chip reads "
                f"{self.lm_gathered_bytes / GIB:.2f} GiB of them: {format_seconds(gathered)}, "
                f"{self.batch / max(gathered, self.compute_seconds):,.0f} tokens/s"
            )
        return lines


def plan_decode(
    config,
    topology: str | Topology,
    *,
    batch: int,
    cache_len: int,
    new_tokens: int = 128,
    data: int = 1,
    fsdp: int = -1,
    tensor: int = 1,
    context: int = 1,
    param_dtype: str = "bfloat16",
    num_slices: int = 1,
    devices=None,
) -> DecodePlan:
    """AOT-compile the generation decode step for a TPU topology; see the module doc."""
    import jax
    import jax.numpy as jnp

    from lov_jax import sharding
    from lov_jax.inference.engine import Generator
    from lov_jax.models.llava_onevision import abstract_params
    from lov_jax.train import metrics

    topo = topology if isinstance(topology, Topology) else parse_topology(topology, num_slices)
    if context != 1:
        raise PlanError(f"context={context}: the decode step shards no sequence (use context=1)")
    shape = resolve_mesh(topo.num_chips, data, fsdp, tensor, topo.num_slices)
    rows = sharding.batch_shards(dict(zip(sharding.MESH_AXES, shape, strict=True)))
    if batch < 1 or batch % rows:
        raise PlanError(f"batch {batch} must be a positive multiple of data x fsdp = {rows}")
    if not 0 < new_tokens < cache_len:
        raise PlanError(f"need 0 < new_tokens ({new_tokens}) < cache_len ({cache_len})")
    cfg = cfg_from_config(config, None, "xla")  # decode attends the cache with XLA
    t = cfg.text
    if t.num_kv_heads % shape[3] or t.num_heads % shape[3]:
        raise PlanError(
            f"tensor={shape[3]} must divide the query ({t.num_heads}) and kv "
            f"({t.num_kv_heads}) heads: the cache is split by kv head"
        )
    mesh = build_mesh(topology_devices(topo) if devices is None else devices, shape, num_slices)
    # Params are passed to each call: a Generator without params still holds the jitted
    # decode; no weights are placed (the rules table shards the abstract ones below).
    # A preset without token ids (LLaVA-1.5 / NeXT: cfg_from_config) still lowers: the
    # pad id only fills host batches, and none is built here.
    gen = Generator({}, cfg, pad_id=0 if cfg.token_ids is None else None)
    boxed = abstract_params(gen.cfg)
    pdtype = jnp.dtype(param_dtype)
    params = jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(
            s.shape, pdtype if jnp.issubdtype(s.dtype, jnp.floating) else s.dtype, sharding=sh
        ),
        _unbox(boxed),
        sharding.params_sharding(boxed, mesh, gen.rules),
    )
    cache = gen.abstract_cache(batch, cache_len, mesh)
    check_divisible((params, cache))
    compiled, _, compile_s = compile_for_tpu(
        lambda: gen.lower_decode(params, batch=batch, cache_len=cache_len,
                                 new_tokens=new_tokens, mesh=mesh),
        "decode step",
    )  # fmt: skip
    mem = compiled.memory_analysis()

    lm = params["language_model"]
    skip = () if t.tie_word_embeddings else ("embed_tokens",)
    lm_read = [x for k, x in lm.items() if k not in skip]
    n = metrics.param_counts(cfg)
    flops = 2 * n["llm"] * batch + 4 * batch * cache_len * t.num_heads * t.head_dim * t.num_layers
    return DecodePlan(
        topology=topo,
        preset=config.model.preset,
        mesh=shape,
        batch=batch,
        cache_len=cache_len,
        new_tokens=new_tokens,
        param_dtype=pdtype.name,
        cache_dtype=jnp.dtype(cfg.dtype).name,
        params_bytes=sum(_shard_bytes(x) for x in jax.tree.leaves(params)),
        lm_read_bytes=sum(_shard_bytes(x) for x in jax.tree.leaves(lm_read)),
        lm_gathered_bytes=sum(
            _shard_bytes(x, ignore=("data", "fsdp")) for x in jax.tree.leaves(lm_read)
        ),
        cache_bytes=sum(_shard_bytes(x) for x in jax.tree.leaves(cache)),
        argument_bytes=int(mem.argument_size_in_bytes),
        output_bytes=int(mem.output_size_in_bytes),
        alias_bytes=int(mem.alias_size_in_bytes),
        temp_bytes=int(mem.temp_size_in_bytes),
        code_bytes=int(mem.generated_code_size_in_bytes),
        step_flops=float(flops),
        compile_s=compile_s,
    )


def _shard_bytes(x, ignore: tuple[str, ...] = ()) -> int:
    """Bytes of one device's shard of an abstract array; `ignore`d mesh axes unsplit."""
    spec = x.sharding.spec
    mesh = x.sharding.mesh
    shape = list(x.shape)
    for i, entry in enumerate(spec):
        axes = (entry,) if isinstance(entry, str) else tuple(entry or ())
        split = int(np.prod([mesh.shape[a] for a in axes if a not in ignore]))
        shape[i] = -(-shape[i] // split)
    return int(np.prod(shape)) * x.dtype.itemsize


def _unbox(tree):
    import flax.linen as nn

    return nn.meta.unbox(tree)
