"""`lov-jax eval`: thin wrapper over `lov_jax.eval.runner.run_eval`."""

from __future__ import annotations

from lov_jax.sharding import MESH_HELP


def _eval(args) -> int:
    import jax

    from lov_jax.distributed import maybe_initialize
    from lov_jax.eval.runner import ModelPredictor, run_eval
    from lov_jax.inference.commands import load_checkpoint, load_prompter, local_mesh

    # multi-host: TPU pods, SLURM, LOV_JAX_* (no-op for one process); --distributed forces
    if not maybe_initialize() and args.distributed:
        jax.distributed.initialize()
    cfg, params = load_checkpoint(args.ckpt, args.dtype)
    predictor = ModelPredictor(
        params, cfg, load_prompter(args), mesh=local_mesh(args.mesh),
        temperature=args.temperature,
    )  # fmt: skip
    model_config = {
        "model_args": f"ckpt={args.ckpt}", "batch_size": args.batch_size,
        "gen_kwargs": {"temperature": args.temperature}, "limit": args.limit,
    }  # fmt: skip
    results = run_eval(
        args.task, args.out, predictor, batch_size=args.batch_size, limit=args.limit,
        model="lov_jax", model_config=model_config,
    )  # fmt: skip
    if results is not None and args.fail_on_missing and any(results["missing"].values()):
        return 1
    return 0


def add_commands(subparsers) -> None:
    p = subparsers.add_parser("eval", help="benchmark-style evaluation (lmms-eval metrics)")
    p.add_argument("--ckpt", required=True, help="HF (safetensors) or Orbax checkpoint dir")
    p.add_argument("--task", action="append", required=True, help="task jsonl or yaml (repeatable)")
    p.add_argument("--out", required=True, help="output dir (rerun with the same dir to resume)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--limit", type=int, default=None, help="first N records of each task")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--conv-template", default=None, help="as `lov-jax generate --conv-template`")
    p.add_argument("--system", default=None, help="system prompt (default: the template's)")
    p.add_argument("--dtype", default=None)
    p.add_argument("--mesh", default=None, help=f"{MESH_HELP}; over this host's devices")
    p.add_argument("--distributed", action="store_true", help="jax.distributed.initialize()")
    p.add_argument("--fail-on-missing", action="store_true")
    p.set_defaults(func=_eval)
