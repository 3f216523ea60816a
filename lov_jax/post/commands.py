"""`lov-jax dpo`, `lov-jax judge`, `lov-jax dpo-loop`: thin wrappers over lov_jax/post."""

from __future__ import annotations


def _config(args):
    from lov_jax.distributed import maybe_initialize
    from lov_jax.train.config_loading import apply_overrides, load_config

    maybe_initialize()  # multi-host: TPU pods, SLURM, LOV_JAX_* (no-op for one process)
    config = apply_overrides(load_config(args.config), args.overrides)
    if "dpo" not in config:
        raise ValueError(f"{args.config} has no `dpo` group: use configs/dpo.py")
    return config


def _dpo(args) -> int:
    from lov_jax.post.train import run_dpo

    result = run_dpo(_config(args), args.workdir)
    if result.metrics:
        last = result.metrics[max(result.metrics)]
        print(f"trained to step {result.final_step}; last loss {last['loss']:.4f}, "
              f"rewards/accuracies {last['rewards/accuracies']:.3f}")  # fmt: skip
    return 0


def _judge(args) -> int:
    import json

    import jax

    from lov_jax.distributed import maybe_initialize
    from lov_jax.inference.prompting import Prompter
    from lov_jax.post import critic
    from lov_jax.pretrained import load_pretrained

    maybe_initialize()
    items = critic.read_judge_records(args.pairs, args.mode, args.media_root)
    cfg, params = load_pretrained(args.ckpt)
    generate = critic.model_generate(params, cfg, Prompter.from_checkpoint(args.ckpt),
                                     max_new_tokens=args.max_new_tokens)  # fmt: skip
    critic.judge(
        items, generate, args.out, args.mode, batch_size=args.batch_size,
        process_index=jax.process_index(), process_count=jax.process_count(),
    )  # fmt: skip
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("judge")
    if jax.process_index() == 0:
        print(json.dumps(critic.summarize(items, args.out, args.mode)))
    return 0


def _loop(args) -> int:
    from lov_jax.post.loop import run_loop

    records = run_loop(_config(args), args.workdir, args.prompts)
    for r in records:
        print(f"round {r['round']}: {r['pairs']} pairs, mean score {r['mean_score']:.3f}, "
              f"{r['steps']} steps")  # fmt: skip
    return 0


def add_commands(sub) -> None:
    d = sub.add_parser(
        "dpo", help="DPO on preference records (configs/dpo.py)",
        description="Overrides: --config.dpo.beta=0.2 --config.data.train_path=p.jsonl",
    )  # fmt: skip
    d.add_argument("--config", required=True, help="configs/dpo.py:<preset>")
    d.add_argument("--workdir", required=True, help="checkpoints, metrics")
    d.set_defaults(func=_dpo, accepts_overrides=True)

    j = sub.add_parser("judge", help="LLaVA-Critic judging of responses (resumable)")
    j.add_argument("--ckpt", required=True, help="the critic checkpoint (HF or Orbax)")
    j.add_argument("--pairs", required=True, help="json / jsonl: responses or chosen/rejected")
    j.add_argument("--out", required=True, help="shards/, judgements.jsonl, summary.json")
    j.add_argument("--mode", choices=("pointwise", "pairwise"), default="pointwise")
    j.add_argument("--media-root", default=None, help="folder the media paths are under")
    j.add_argument("--batch-size", type=int, default=8)
    j.add_argument("--max-new-tokens", type=int, default=512)
    j.set_defaults(func=_judge)

    loop = sub.add_parser(
        "dpo-loop", help="iterative DPO (OV-Chat): sample, judge, pair, train",
        description="Overrides: --config.loop.rounds=2 --config.loop.judge=rule",
    )  # fmt: skip
    loop.add_argument("--config", required=True, help="configs/dpo.py:<preset>")
    loop.add_argument("--workdir", required=True, help="round_<r>/ stages")
    loop.add_argument("--prompts", required=True, help="json / jsonl prompt records")
    loop.set_defaults(func=_loop, accepts_overrides=True)
