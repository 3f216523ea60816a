"""`lov-jax plan --config configs/<stage>.py:<preset> --topology v5p-512 [...]`.

AOT-compiles the real train step for a TPU topology on this (CPU) host and prints
per-chip HBM, compiled vs analytical FLOPs and a step-time estimate; see
`lov_jax.plan.train`. `--decode --batch B --cache-len C` plans the generation decode step
instead (`lov_jax.plan.decode`). `--num-slices S` puts S slices on the data axis (DCN).
Needs libtpu (`pip install -e .[tpu]`), not TPU hardware.
"""

from __future__ import annotations

import functools
import sys

from lov_jax.plan import topology
from lov_jax.plan.topology import DoesNotFit, PlanError
from lov_jax.sharding import MESH_HELP


def mesh_sizes(flag: str, num_slices: int = 1) -> dict[str, int]:
    """The `--mesh` flag (`sharding.parse_mesh`) as global sizes; data defaults to the
    slice count, fsdp to the remaining chips, context and tensor to 1."""
    from lov_jax import sharding

    try:
        sizes = {"data": num_slices, "fsdp": -1, "context": 1, "tensor": 1}
        return {**sizes, **sharding.parse_mesh(flag)}
    except ValueError as err:
        raise PlanError(str(err)) from None


def _plan(args) -> int:
    import os

    import jax

    from lov_jax import sharding

    # The plan compiles for TPU through an AOT-only client; the host backend stays CPU
    # (libtpu must not go looking for local TPU chips or a metadata server).
    if not os.environ.get("JAX_PLATFORMS"):
        jax.config.update("jax_platforms", "cpu")
    from lov_jax import plan
    from lov_jax.train.config_loading import apply_overrides, load_config

    try:
        if not topology.libtpu_available():
            raise PlanError(topology.INSTALL_HINT)
        config = apply_overrides(load_config(args.config), args.overrides)
        mesh = mesh_sizes(args.mesh, args.num_slices)
        if args.decode:
            return _decode(config, args, mesh)
        common = dict(
            attention=args.attention,
            seq_len=args.seq_len,
            max_crops=args.max_crops,
            grad_accum=args.grad_accum,
            sample_len=args.sample_len,
            mfu=args.mfu,
        )
        if args.search:
            log = functools.partial(print, flush=True)  # progress shows in a piped log
            log(f"searching meshes for {args.topology} (fsdp = remaining chips) ...")
            given = sharding.parse_mesh(args.mesh)  # a context size fixes the search's
            contexts = (given["context"],) if "context" in given else plan.SEARCH_CONTEXTS
            fitting, rejected = plan.search(
                config, args.topology, num_slices=args.num_slices, log=log,
                contexts=contexts, **common,
            )  # fmt: skip
            if not fitting:
                print("no configuration fits; rejected:")
                for setting, why in rejected:
                    print(f"  {setting}: {why}")
                return 1
            print("\nfitting configurations, best estimated throughput first:")
            print(
                f"{'data':>5} {'fsdp':>5} {'context':>7} {'tensor':>6} {'remat':<24} {'rows':>4} "
                f"{'GiB/chip':>9} {'step s':>8} {'tokens/s':>12}"
            )
            for r in fitting:
                d, f, c, t = r.mesh
                print(
                    f"{d:>5} {f:>5} {c:>7} {t:>6} {r.remat:<24} {r.rows_per_device:>4} "
                    f"{r.total_bytes / plan.GIB:>9.2f} {r.step_seconds_compiled:>8.3f} "
                    f"{r.tokens_per_second:>12,.0f}"
                )
            print("\nbest:")
            print("\n".join(fitting[0].lines()))
            return 0
        result = plan.plan(
            config, args.topology, **mesh, remat=args.remat,
            rows_per_device=args.rows_per_device, num_slices=args.num_slices, **common,
        )  # fmt: skip
    except DoesNotFit as err:
        print(f"error: DOES NOT FIT: {err}", file=sys.stderr)  # the cli's one error style
        return 1
    except PlanError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print("\n".join(result.lines()))
    return 0 if result.fits else 1


def _decode(config, args, mesh: dict[str, int]) -> int:
    from lov_jax.plan.decode import plan_decode

    if args.batch is None or args.cache_len is None:
        raise PlanError("--decode needs --batch and --cache-len")
    if args.search:
        raise PlanError("--search plans the train step; pass --mesh with --decode")
    result = plan_decode(
        config, args.topology, batch=args.batch, cache_len=args.cache_len,
        new_tokens=args.new_tokens, param_dtype=args.param_dtype, num_slices=args.num_slices,
        **mesh,
    )  # fmt: skip
    print("\n".join(result.lines()))
    return 0 if result.fits else 1


def add_commands(sub) -> None:
    p = sub.add_parser(
        "plan",
        help="AOT-compile the train or decode step for a TPU topology: HBM, FLOPs, step time",
        description=(
            "Compiles the real train step (or with --decode the KV-cache decode step) for a "
            "TPU topology on this host (needs libtpu: pip install -e .[tpu]; no TPU). "
            "Topologies: v4-N / v5p-N (N TensorCores, 2 per chip), v5e-N / v6e-N (N chips), "
            "or <gen>:<AxB[xC]>; --num-slices for multi-slice. Exit status 1 when the plan "
            "does not fit in HBM. Overrides: --config.optim.grad_accum=4 ..."
        ),
    )
    p.add_argument("--config", required=True, help="configs/<stage>.py:<preset>")
    p.add_argument("--topology", required=True, help="e.g. v5p-512, v5e-16, v6e-256, v4-128")
    p.add_argument("--num-slices", type=int, default=1, help="multi-slice: data axis over DCN")
    p.add_argument(
        "--mesh", default="", help=f"{MESH_HELP}; global sizes, data defaults to --num-slices"
    )
    p.add_argument(
        "--remat", default=None, help="remat policy (default: the config's model.remat_policy)"
    )
    p.add_argument("--attention", default="splash", choices=("splash", "xla"))
    p.add_argument("--rows-per-device", type=int, default=1, help="rows per data shard")
    p.add_argument("--seq-len", type=int, default=None, help="default: config data.seq_len")
    p.add_argument("--max-crops", type=int, default=None, help="default: config data.max_crops")
    p.add_argument("--grad-accum", type=int, default=None, help="default: config optim")
    p.add_argument(
        "--sample-len", type=int, default=None,
        help="tokens per packed sample for the analytical FLOPs (default: a whole row)",
    )  # fmt: skip
    p.add_argument("--mfu", type=float, default=0.5, help="assumed model FLOPs utilisation")
    p.add_argument(
        "--search", action="store_true",
        help="grid over context x tensor x remat x rows (--mesh context=C fixes context)",
    )  # fmt: skip
    g = p.add_argument_group("decode step (the KV-cache generation loop of generate/eval)")
    g.add_argument("--decode", action="store_true", help="plan the decode step, not training")
    g.add_argument("--batch", type=int, default=None, help="rows decoded together")
    g.add_argument("--cache-len", type=int, default=None, help="KV-cache slots: prompt + new")
    g.add_argument("--new-tokens", type=int, default=128, help="of the cache slots")
    g.add_argument("--param-dtype", default="bfloat16", help="serving weight dtype")
    p.set_defaults(func=_plan, accepts_overrides=True)
