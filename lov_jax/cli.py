"""`lov-jax` console entry point: thin argument parsing over library functions."""

from __future__ import annotations

import argparse
import importlib
import sys

# Subsystems that add their own subcommands: each module defines `add_commands(subparsers)`
# and sets `func` on its parsers (thin wrappers over one library function each).
COMMAND_MODULES: tuple[str, ...] = (
    "lov_jax.convert.commands",
    "lov_jax.train.commands",
    "lov_jax.inference.commands",
    "lov_jax.eval.commands",
    "data_pipelines.commands",
    "lov_jax.plan.commands",
    "lov_jax.serve.commands",
    "lov_jax.post.commands",
)


def _demo(args) -> int:
    from lov_jax.demo import run_demo

    return run_demo(args.out, seed=args.seed)


def _check_parity(args) -> int:
    import json
    from pathlib import Path

    from lov_jax.parity import check_parity

    messages = json.loads(Path(args.messages).read_text()) if args.messages else None
    report = check_parity(
        args.hf,
        question=args.prompt,
        image_paths=tuple(args.image),
        video_path=args.video,
        num_frames=args.num_frames,
        atol=args.atol,
        save_logits=args.save_logits,
        messages=messages,
    )
    print("\n".join(report.lines()))
    return 0 if report.passed else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lov-jax", description=__doc__)
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="embedded end-to-end run on CPU")
    demo.add_argument("--out", default="demo_out", help="working directory")
    demo.add_argument("--seed", type=int, default=0, help="data, initialisation and shuffling")
    demo.set_defaults(func=_demo)

    parity = sub.add_parser("check-parity", help="HF (PyTorch) vs lov_jax on the same raw inputs")
    parity.add_argument("--hf", required=True, help="llava-hf style checkpoint directory")
    parity.add_argument("--prompt", default="What is shown here?")
    parity.add_argument("--image", action="append", default=[], help="image file (repeatable)")
    parity.add_argument("--video", default=None, help="video file (mp4/webm/...)")
    parity.add_argument("--num-frames", type=int, default=8)
    parity.add_argument("--atol", type=float, default=1e-4)
    parity.add_argument("--save-logits", default=None, help="write our logits + ids to this .npz")
    parity.add_argument(
        "--messages", default=None,
        help="a JSON file of chat messages (several turns; image parts name files) instead "
        "of --prompt / --image / --video",
    )  # fmt: skip
    parity.set_defaults(func=_check_parity)

    for module in COMMAND_MODULES:
        importlib.import_module(module).add_commands(sub)
    return parser


DEBUG_HELP = "on an error, raise it with its traceback (anywhere on the command line)"
# Errors whose message is the whole story (they name the file / field / line themselves):
# ValueError / OSError and every exception class defined in this repo's packages; any
# other exception is also prefixed with its type.
_USER_ERRORS = (ValueError, OSError)
_OWN_PACKAGES = ("lov_jax", "data_pipelines")


def error_line(e: BaseException) -> str:
    """The one `error: <what>, <where>` text every command prints for a failure."""
    msg = str(e).strip() or type(e).__name__
    own = type(e).__module__.split(".")[0] in _OWN_PACKAGES
    if own or isinstance(e, _USER_ERRORS):
        return f"error: {msg}"
    return f"error: {type(e).__name__}: {msg} (rerun with --debug for the traceback)"


def main(argv: list[str] | None = None) -> int:
    """Run one command. A failure prints `error: ...` on stderr and returns non-zero; the
    traceback only with `--debug`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "accepts_overrides", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.overrides = extra
    try:
        return int(args.func(args) or 0)
    except SystemExit as e:
        if debug or not isinstance(e.code, str):
            raise
        print(f"error: {e.code}", file=sys.stderr, flush=True)
        return 2
    except Exception as e:  # noqa: BLE001 - every command's failures end here, one style
        if debug:
            raise
        print(error_line(e), file=sys.stderr, flush=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())
