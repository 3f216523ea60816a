"""`lov-jax data stats` (budget fill, throughput, skip reasons) and `lov-jax data build`
(json + media folders -> ArrayRecord shards with the media embedded)."""

from __future__ import annotations

import argparse
import functools
from pathlib import Path


def _data_subparsers(subparsers) -> argparse._SubParsersAction:
    """The `data` command's subparsers, created or shared with other modules' `data` verbs."""
    data = subparsers.choices.get("data")
    if data is None:
        data = subparsers.add_parser("data", help="data pipeline tools")
        return data.add_subparsers(dest="data_command", required=True)
    for action in data._actions:  # another module created `lov-jax data` first
        if isinstance(action, argparse._SubParsersAction):
            return action
    return data.add_subparsers(dest="data_command", required=True)


def add_commands(subparsers) -> None:
    sub = _data_subparsers(subparsers)
    p = sub.add_parser("stats", help="budget fill, throughput and skip reasons of the loader")
    p.add_argument("data", nargs="?", help="json / jsonl / data yaml / parquet / array_record")
    p.add_argument("--image-folder", default=None)
    p.add_argument("--video-folder", default=None)
    p.add_argument("--tokenizer", default=None, help="tokenizer.json or checkpoint dir")
    p.add_argument("--synthetic", type=int, default=None, metavar="N",
                   help="N synthetic records of an OneVision-like mix instead of DATA")  # fmt: skip
    p.add_argument("--pixels", choices=("zeros", "preprocess"), default="zeros",
                   help="synthetic: zero crops, or preprocess generated images")  # fmt: skip
    p.add_argument("--preset", default="ov_7b", help="model preset (visual geometry, token ids)")
    p.add_argument("-L", "--max-tokens", type=int, default=32768)
    p.add_argument("-N", "--max-crops", type=int, default=84)
    p.add_argument("-B", "--batch-size", type=int, default=1)
    p.add_argument("--window", type=int, default=128)
    p.add_argument("--batches", type=int, default=None, help="stop after this many batches")
    p.add_argument("--workers", type=int, default=0, help="decoding processes")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_stats)

    b = sub.add_parser("build", help="json/jsonl/yaml + media folders -> ArrayRecord shards")
    b.add_argument("data", help="json / jsonl / data yaml")
    b.add_argument("--out", required=True, help="output directory")
    b.add_argument("--image-folder", default=None)
    b.add_argument("--video-folder", default=None)
    b.add_argument("--name", default="data", help="shard file prefix")
    b.add_argument("--records-per-shard", type=int, default=4096)
    b.set_defaults(func=_build)


def _build(args) -> int:
    from data_pipelines.array_record_build import build_array_record
    from data_pipelines.sources import open_source

    source = open_source(args.data, image_folder=args.image_folder, video_folder=args.video_folder)
    report = build_array_record(
        source, args.out, name=args.name, records_per_shard=args.records_per_shard
    )
    print(
        f"{report.num_records} records, {report.num_bytes / 1e6:.1f} MB in "
        f"{len(report.files)} shard(s) under {args.out}; media missing: {report.missing_media}"
    )
    return 0


def _stats(args) -> int:
    from data_pipelines import loader, stats
    from lov_jax import config

    cfg = config.preset(args.preset)
    lc = loader.LoaderConfig(
        batch_size=args.batch_size, max_tokens=args.max_tokens, max_crops=args.max_crops,
        seed=args.seed, window=args.window, num_workers=args.workers,
    )  # fmt: skip
    if args.synthetic is not None:
        from data_pipelines.tokenizer import build_qwen2_tokenizer, qwen2_token_ids

        # the synthetic mix stands for OneVision data on the Qwen-2 vocabulary
        cfg = cfg.replace(token_ids=qwen2_token_ids(build_qwen2_tokenizer()))
        records, process = stats.synthetic_loader_inputs(
            args.synthetic, cfg, args.seed, args.pixels
        )
    else:
        if args.data is None or args.tokenizer is None:
            raise SystemExit("give DATA and --tokenizer, or --synthetic N")
        from data_pipelines import records as rec
        from data_pipelines import sources
        from data_pipelines.tokenizer import load_tokenizer
        from lov_jax.token_ids import read_token_ids

        tok = load_tokenizer(args.tokenizer)
        tok_dir = (
            Path(args.tokenizer) if Path(args.tokenizer).is_dir() else Path(args.tokenizer).parent
        )
        cfg = cfg.replace(token_ids=read_token_ids(tok_dir, tokenizer=tok))
        # a stats run counts malformed jsonl lines with the other skip reasons
        records = sources.open_source(
            args.data, args.image_folder, args.video_folder, args.seed, on_error=lc.on_error
        )
        options = rec.RecordOptions(max_tokens=args.max_tokens, max_crops=args.max_crops)
        process = functools.partial(rec.process_record, cfg=cfg, tokenizer=tok, options=options)
    it = loader.make_loader(records, process, cfg, lc, process_index=0, process_count=1)
    try:
        report = stats.run_stats(it, args.batches, cores=args.workers + 1 if args.workers else 1)
    finally:
        it.close()
    print(f"L={lc.max_tokens} N={lc.max_crops} B={lc.batch_size} window={lc.window}")
    print("\n".join(report.lines()))
    return 0
