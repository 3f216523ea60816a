"""`lov-jax convert hf-to-orbax | orbax-to-hf`: thin flag parsing over import_hf / export."""

from __future__ import annotations

from lov_jax.sharding import MESH_HELP

_DTYPES = ("float32", "bfloat16", "float16")
_LAYOUTS = ("hf", "hf_legacy", "original")  # export.LAYOUTS_OUT (imported lazily there)
_OVERWRITE_HELP = "replace an existing --out that an earlier conversion wrote"
_NONFINITE_HELP = (
    "convert tensors with NaN / inf or values outside --dtype's range (a warning each; "
    "default: an error naming them)"
)


def _report(convert, *args, **kwargs) -> int:
    """Run one conversion and print its summary line (a failure: `lov_jax.cli.main` prints
    its one `error:`; a CheckpointError lists every problem)."""
    stats = convert(*args, **kwargs)
    print(stats.line(), flush=True)
    return 0


def _hf_to_orbax(args) -> int:
    from lov_jax.convert.import_hf import hf_to_orbax

    return _report(
        hf_to_orbax, args.hf, args.out, dtype=args.dtype, mesh=args.mesh,
        overwrite=args.overwrite, progress=not args.no_progress,
        allow_nonfinite=args.allow_nonfinite,
    )  # fmt: skip


def _orbax_to_hf(args) -> int:
    from lov_jax.convert.export import orbax_to_hf

    return _report(
        orbax_to_hf, args.ckpt, args.out, step=args.step, dtype=args.dtype,
        max_shard_size=args.max_shard_size, overwrite=args.overwrite, assets=args.assets,
        layout=args.layout, progress=not args.no_progress,
        allow_nonfinite=args.allow_nonfinite,
    )  # fmt: skip


def add_commands(subparsers) -> None:
    convert = subparsers.add_parser("convert", help="HF safetensors <-> Orbax checkpoints")
    sub = convert.add_subparsers(dest="convert_command", required=True)

    a = sub.add_parser("hf-to-orbax", help="HF LLaVA / NeXT / OneVision dir -> Orbax checkpoint")
    a.add_argument(
        "--hf", required=True,
        help="HF dir: llava-hf, transformers 5, or an original haotian-liu / lmms-lab one",
    )  # fmt: skip
    a.add_argument("--out", required=True, help="new Orbax checkpoint directory")
    a.add_argument("--dtype", choices=_DTYPES, default=None, help="cast (default: keep)")
    a.add_argument("--mesh", default=None, help=f"{MESH_HELP}; params placed and saved sharded")
    a.add_argument("--overwrite", action="store_true", help=_OVERWRITE_HELP)
    a.add_argument("--allow-nonfinite", action="store_true", help=_NONFINITE_HELP)
    a.add_argument("--no-progress", action="store_true", help="no progress bar")
    a.set_defaults(func=_hf_to_orbax)

    b = sub.add_parser("orbax-to-hf", help="Orbax checkpoint or training run -> HF dir")
    b.add_argument("--ckpt", required=True, help="converted checkpoint, run dir or step dir")
    b.add_argument("--out", required=True, help="new HF directory")
    b.add_argument("--step", type=int, default=None, help="training step (default: latest)")
    b.add_argument("--dtype", choices=_DTYPES, default=None, help="cast (default: as stored)")
    b.add_argument("--max-shard-size", default="5GB", help='e.g. "5GB", "500MB", "2GiB"')
    b.add_argument("--assets", default=None, help="take tokenizer/processor files from here")
    b.add_argument(
        "--layout", choices=_LAYOUTS, default="hf",
        help="hf: what transformers 5 writes; hf_legacy: llava-hf hub names; original: a "
        "haotian-liu / LLaVA-VL checkpoint (flat config.json, tower in vision_tower/)",
    )  # fmt: skip
    b.add_argument("--overwrite", action="store_true", help=_OVERWRITE_HELP)
    b.add_argument("--allow-nonfinite", action="store_true", help=_NONFINITE_HELP)
    b.add_argument("--no-progress", action="store_true", help="no progress bar")
    b.set_defaults(func=_orbax_to_hf)

    from lov_jax.lora.runs import add_commands as add_lora_commands

    add_lora_commands(sub)  # orbax-to-peft, peft-to-orbax (LoRA adapters)
