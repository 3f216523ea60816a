"""`lov-jax serve`: thin wrapper over `lov_jax.serve.build_service` + the HTTP server."""

from __future__ import annotations

from lov_jax.sharding import MESH_HELP


def _ints(flag: str, text: str | None) -> tuple[int, ...] | None:
    if text is None or text.strip().lower() == "none":
        return None
    try:
        values = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise SystemExit(f"--{flag} takes comma-separated ints, got {text!r}") from None
    if any(v < 1 for v in values):
        raise SystemExit(f"--{flag} values must be >= 1, got {text!r}")
    return values


def _serve(args) -> int:
    from pathlib import Path

    import jax

    from lov_jax import sharding
    from lov_jax.distributed import maybe_initialize
    from lov_jax.inference.commands import load_checkpoint, load_prompter, local_mesh
    from lov_jax.serve import (
        Batching,
        ServeConfig,
        build_decoder,
        build_service,
        make_server,
        multihost,
    )

    maybe_initialize()  # a pod: every process joins; process 0 serves HTTP
    cfg, params = load_checkpoint(args.ckpt, args.dtype)
    lengths = _ints("length-buckets", args.length_buckets)
    if lengths is None:
        lengths = tuple(1 << k for k in range(7, 31) if (1 << k) < args.context)
    batching = Batching(
        slots=args.slots, context=args.context, length_buckets=lengths,
        crop_buckets=_ints("crop-buckets", args.crop_buckets), max_queue=args.max_queue,
    )  # fmt: skip
    config = ServeConfig(
        model_name=args.model_name or Path(args.ckpt).resolve().name, host=args.host,
        port=args.port, max_body_bytes=int(args.max_body_mb * (1 << 20)),
        max_image_pixels=args.max_image_pixels, frames_as_video=args.frames_as_video,
        num_frames=args.num_frames, allow_local_files=not args.no_local_files,
        default_max_tokens=args.default_max_tokens, request_timeout_s=args.request_timeout,
    )  # fmt: skip
    warmup = _ints("warmup-crops", args.warmup_crops) if args.warmup_crops != "" else ()
    if not multihost.is_pod():
        decoder = build_decoder(params, cfg, batching, mesh=local_mesh(args.mesh), warmup=warmup)
    else:  # one model over every process's devices; each process runs the same calls
        mesh = sharding.mesh_from_flag(args.mesh or "fsdp=-1")
        decoder = build_decoder(params, cfg, batching, mesh=mesh, warmup=warmup)
        if jax.process_index() != 0:
            multihost.follow(decoder)
            return 0
        decoder = multihost.PodDecoder(decoder)
    service = build_service(params, cfg, load_prompter(args), config, batching, decoder=decoder)
    server = make_server(service)
    host, port = server.server_address[:2]
    print(f"lov-jax serve: {config.model_name} at http://{host}:{port}/v1", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        service.scheduler.close()
    return 0


def add_commands(subparsers) -> None:
    p = subparsers.add_parser("serve", help="OpenAI-compatible server with continuous batching")
    p.add_argument("--ckpt", required=True, help="HF (safetensors) or Orbax checkpoint dir")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: local only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--mesh", default=None, help=MESH_HELP)
    p.add_argument("--model-name", default=None, help="`model` clients name (default: dir name)")
    p.add_argument("--slots", type=int, default=8, help="requests decoded together")
    p.add_argument("--context", type=int, default=8192, help="cache columns per slot")
    p.add_argument("--length-buckets", default=None,
                   help="prompt-length buckets, comma separated (default: powers of two "
                   "from 128 below --context)")  # fmt: skip
    p.add_argument("--crop-buckets", default=None, help="crop-count buckets (default: 2^k)")
    p.add_argument("--warmup-crops", default="1,2,4,8,16,32",
                   help="crop buckets compiled at start with every length bucket ('none': "
                   "compile on demand; '': text only)")  # fmt: skip
    p.add_argument("--max-queue", type=int, default=64, help="waiting requests, then 503")
    p.add_argument("--request-timeout", type=float, default=600.0, help="seconds per request")
    p.add_argument("--max-body-mb", type=float, default=64.0, help="request size cap")
    p.add_argument("--max-image-pixels", type=int, default=40_000_000)
    p.add_argument("--frames-as-video", action="store_true",
                   help="several images in one request are the frames of one video "
                   "(lmms-eval sends video this way)")  # fmt: skip
    p.add_argument(
        "--num-frames",
        type=int,
        default=32,
        help="frames sampled from a video file (lmms-eval llava_onevision: 32)",
    )
    p.add_argument("--no-local-files", action="store_true", help="refuse local media paths")
    p.add_argument("--default-max-tokens", type=int, default=1024)
    p.add_argument("--conv-template", default=None, help="as `lov-jax generate --conv-template`")
    p.add_argument("--system", default=None, help="system prompt (default: the template's)")
    p.add_argument("--dtype", default=None, help="param dtype to load (default: as stored)")
    p.set_defaults(func=_serve)
