"""`lov-jax generate`: thin wrapper over `lov_jax.inference.api.generate`."""

from __future__ import annotations

import json
from pathlib import Path

from lov_jax.config import ModelConfig
from lov_jax.sharding import MESH_HELP


def load_checkpoint(ckpt: str | Path, dtype: str | None = None) -> tuple[ModelConfig, dict]:
    """(cfg, params) from an HF or Orbax dir (`lov_jax.load_pretrained`)."""
    from lov_jax import load_pretrained

    return load_pretrained(ckpt, dtype=dtype)


def load_prompter(args):
    """The checkpoint's tokenizer and chat template (`--conv-template` replaces the latter)."""
    from lov_jax.inference.prompting import Prompter

    return Prompter.from_checkpoint(args.ckpt, conv_template=args.conv_template, system=args.system)


def local_mesh(flag: str | None):
    """The `--mesh` flag's mesh over this process's devices (None: one device).

    In a multi-process job every process decodes its own requests (eval shards records
    by process), so no program spans hosts.
    """
    import jax

    from lov_jax import sharding

    return sharding.mesh_from_flag(flag, devices=jax.local_devices())


def _generate(args) -> int:
    from lov_jax.distributed import maybe_initialize
    from lov_jax.inference.api import generate

    maybe_initialize()  # multi-host: TPU pods, SLURM, LOV_JAX_* (no-op for one process)

    cfg, params = load_checkpoint(args.ckpt, args.dtype)
    request = (args.prompt, args.image, args.video)
    texts, out = generate(
        params, cfg, [request], prompter=load_prompter(args), max_new_tokens=args.max_new_tokens,
        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
        num_frames=args.num_frames, mesh=local_mesh(args.mesh), return_output=True,
        clip_to_context=args.clip_to_context,
    )  # fmt: skip
    if args.json:
        record = {
            "prompt": args.prompt, "images": args.image, "video": args.video,
            "text": texts[0], "token_ids": out.tokens[0], "stopped": out.stopped[0],
            "prefill_s": out.prefill_s, "decode_s": out.decode_s,
        }  # fmt: skip
        print(json.dumps(record))
    else:
        print(texts[0])
    return 0


def add_generate_args(p) -> None:
    p.add_argument("--ckpt", required=True, help="HF (safetensors) or Orbax checkpoint dir")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--top-p", type=float, default=1.0, help="1 = off")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-frames", type=int, default=8, help="frames sampled per video")
    p.add_argument(
        "--conv-template", default=None,
        help="render prompts with this LLaVA-NeXT conversation template instead of the "
        "checkpoint's chat_template (needed when the checkpoint has none)",
    )  # fmt: skip
    p.add_argument("--system", default=None, help="system prompt (default: the template's)")
    p.add_argument("--dtype", default=None, help="param dtype to load (default: as stored)")
    p.add_argument("--mesh", default=None, help=f"{MESH_HELP}; over this host's devices")


def add_commands(subparsers) -> None:
    p = subparsers.add_parser("generate", help="answer a prompt about images / a video")
    add_generate_args(p)
    p.add_argument("--prompt", required=True)
    p.add_argument("--image", action="append", default=[], help="image file (repeatable)")
    p.add_argument("--video", action="append", default=[], help="video file (repeatable)")
    p.add_argument("--json", action="store_true", help="print one JSON record")
    p.add_argument(
        "--clip-to-context", action="store_true",
        help="when prompt + --max-new-tokens exceed the model's context, generate only what "
        "fits (a warning; default: an error)",
    )  # fmt: skip
    p.set_defaults(func=_generate)
