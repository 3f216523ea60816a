"""`lov-jax train --config configs/<stage>.py:<preset> --workdir DIR [--config.a.b=v ...]`."""

from __future__ import annotations


def _train(args) -> int:
    from lov_jax.distributed import maybe_initialize
    from lov_jax.train.config_loading import apply_overrides, load_config
    from lov_jax.train.run import train_from_config

    maybe_initialize()  # multi-host: TPU pods, SLURM, LOV_JAX_* (no-op for one process)
    config = apply_overrides(load_config(args.config), args.overrides)
    result = train_from_config(config, args.workdir)
    last = result.losses[max(result.losses)] if result.losses else float("nan")
    print(f"trained to step {result.final_step}; last loss {last:.4f}")
    return 0


def add_commands(sub) -> None:
    train = sub.add_parser(
        "train",
        help="train a stage (stage1 / stage1_5 / stage2_si / stage2_ov)",
        description="Overrides: --config.optim.lr=1e-4 --config.data.train_path=data.yaml ...",
    )
    train.add_argument("--config", required=True, help="configs/<stage>.py:<preset>")
    train.add_argument("--workdir", required=True, help="checkpoints, metrics, TensorBoard")
    train.set_defaults(func=_train, accepts_overrides=True)
