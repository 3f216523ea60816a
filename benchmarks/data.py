"""Data pipeline figures (issue "Figures"): budget fill, packing/pipeline throughput,
image preprocessing speed vs HF.

    .venv/bin/python benchmarks/data.py [--samples 20000] [--pipeline-samples 150]

1. Budget fill on a synthetic OneVision-like mix (data_pipelines.stats.ov_mix_records):
   our balanced greedy packer at L tokens / N crops per row, Grain-style first-fit
   (128 open bins, flushed when an element fits none) on the same two budgets, and
   LLaVA-NeXT's scheme (modality-grouped, length-sorted megabatches, padded to the
   longest; docs/reference.md 7.3) at the OV recipe's batch 1/device on 128 devices and at
   batch 4/device.
2. Throughput: packing + row assembly (zero crops), and the full pipeline with real
   image/video preprocessing of generated images (no file decoding), per CPU core.
3. Image preprocessing alone: ours (`image_processing.preprocess("anyres", ...)`) vs
   `transformers.LlavaOnevisionImageProcessorPil` on the same single images.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

from data_pipelines import loader, packing, stats
from lov_jax import config


def ours_fill(sizes: np.ndarray, pack: packing.PackConfig) -> tuple[float, float, int]:
    """Balanced greedy over sizes only (what the loader runs, minus the arrays)."""
    ok = (sizes[:, 0] <= pack.max_tokens) & (sizes[:, 1] <= pack.max_crops)
    pend_t, pend_c, it = [], [], iter(sizes[ok])
    rows_t, rows_c = [], []
    exhausted = False
    while True:
        while not exhausted and len(pend_t) < pack.window:
            nxt = next(it, None)
            if nxt is None:
                exhausted = True
            else:
                pend_t.append(int(nxt[0]))
                pend_c.append(int(nxt[1]))
        if not pend_t:
            break
        chosen = packing.select_row(pend_t, pend_c, pack)
        rows_t.append(sum(pend_t[i] for i in chosen))
        rows_c.append(sum(pend_c[i] for i in chosen))
        keep = sorted(set(range(len(pend_t))) - set(chosen))
        pend_t, pend_c = [pend_t[i] for i in keep], [pend_c[i] for i in keep]
    return _fill(rows_t, rows_c, pack)


def first_fit_fill(sizes: np.ndarray, pack: packing.PackConfig, bins: int = 128):
    """Grain FirstFitPackIterDataset semantics on two budgets."""
    rows_t, rows_c = [], []
    open_t, open_c = [0] * bins, [0] * bins
    for t, c, _ in sizes:
        if t > pack.max_tokens or c > pack.max_crops:
            continue
        for b in range(bins):
            if open_t[b] + t <= pack.max_tokens and open_c[b] + c <= pack.max_crops:
                open_t[b] += t
                open_c[b] += c
                break
        else:  # fits no open bin: emit them all, start over with this element
            rows_t += [x for x in open_t if x]
            rows_c += [y for x, y in zip(open_t, open_c, strict=True) if x]
            open_t, open_c = [int(t)] + [0] * (bins - 1), [int(c)] + [0] * (bins - 1)
    rows_t += [x for x in open_t if x]
    rows_c += [y for x, y in zip(open_t, open_c, strict=True) if x]
    return _fill(rows_t, rows_c, pack)


def _fill(rows_t, rows_c, pack):
    n = len(rows_t)
    return sum(rows_t) / (n * pack.max_tokens), sum(rows_c) / (n * pack.max_crops), n


def fill_table(n: int, big_l: int, big_n: int, cfg) -> list[str]:
    records = stats.ov_mix_records(n, seed=0)
    sizes = stats.record_sizes(records, cfg)
    kinds = np.array([r["kind"] for r in records])
    pack = packing.PackConfig(big_l, big_n, window=128)
    lines = [
        f"mix: {n} samples, {np.mean(kinds == 'single'):.0%} single image, "
        f"{np.mean(kinds == 'multi'):.0%} multi-image, {np.mean(kinds == 'video'):.0%} video, "
        f"{np.mean(kinds == 'text'):.0%} text-only; mean {sizes[:, 0].mean():.0f} tokens, "
        f"{sizes[:, 1].mean():.1f} crops, {sizes[:, 0].sum() / sizes[:, 1].sum():.0f} tokens/crop",
        "",
        f"| scheme (L = {big_l}, N = {big_n}) | token fill | crop fill |",
        "| --- | --- | --- |",
    ]
    t0 = time.perf_counter()
    ft, fc, rows = ours_fill(sizes, pack)
    sel = time.perf_counter() - t0
    lines.append(f"| ours: balanced greedy, window 128 ({rows} rows) | {ft:.1%} | {fc:.1%} |")
    ft, fc, rows = first_fit_fill(sizes, pack)
    lines.append(f"| first-fit, 128 open bins ({rows} rows) | {ft:.1%} | {fc:.1%} |")
    multimodal = kinds != "text"
    for world, bs in ((128, 1), (128, 4)):
        r = stats.llava_next_fill(
            sizes[:, 0], sizes[:, 1], sizes[:, 2], multimodal, world_size=world,
            per_device_batch=bs,
        )  # fmt: skip
        lines.append(
            f"| LLaVA-NeXT, {bs}/device x {world}: step waits for the slowest device | "
            f"{r['step_token_fill']:.1%} | {r['step_crop_fill']:.1%} |"
        )
        if bs > 1:
            lines.append(
                f"| LLaVA-NeXT, {bs}/device: real tokens in the padded device batch | "
                f"{r['pad_token_fill']:.1%} | (crops unpadded) |"
            )
    lines += ["", f"row selection alone: {n / sel:,.0f} samples/s (sizes only)"]
    return lines


def pipeline_lines(n: int, big_l: int, big_n: int, cfg, pixels: str, workers: int) -> str:
    records = stats.ov_mix_records(n, seed=1)
    lc = loader.LoaderConfig(batch_size=1, max_tokens=big_l, max_crops=big_n, num_workers=workers)
    it = loader.make_loader(
        records, stats.SyntheticProcess(cfg, pixels), cfg, lc, process_index=0, process_count=1
    )
    try:
        rep = stats.run_stats(it, cores=workers + 1 if workers else 1)
    finally:
        it.close()
    sec = rep.seconds
    what = "packing + row assembly (zero crops)" if pixels == "zeros" else "full pipeline"
    return (
        f"| {what}, {workers} workers | {rep.samples / sec:.1f} | "
        f"{rep.samples / sec / rep.cores:.1f} | {rep.visual_tokens / sec / rep.cores:,.0f} | "
        f"{rep.stats['rows'] / sec:.2f} |"
    )


def preprocess_lines(n: int, cfg, repeats: int = 2) -> list[str]:
    from PIL import Image
    from transformers import LlavaOnevisionImageProcessorPil
    from transformers.image_utils import PILImageResampling

    from data_pipelines import image_processing

    s = cfg.vision.image_size
    hf = LlavaOnevisionImageProcessorPil(
        image_mean=[0.5] * 3, image_std=[0.5] * 3, size={"height": s, "width": s},
        image_grid_pinpoints=[list(p) for p in config.ANYRES_GRID_PINPOINTS], do_pad=True,
        resample=PILImageResampling.BICUBIC,
    )  # fmt: skip
    rng = np.random.default_rng(0)
    images = []
    for r in stats.ov_mix_records(4 * n, seed=2):
        if r["kind"] == "single" and len(images) < n:
            h, w = r["image_sizes"][0]
            small = rng.integers(0, 256, (h // 16 + 1, w // 16 + 1, 3), dtype=np.uint8)
            images.append(Image.fromarray(small).resize((w, h), Image.Resampling.BILINEAR))

    def bench(fn):
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            for img in images:
                fn(img)
            best = min(best, time.perf_counter() - t0)
        return best / len(images)

    ours = bench(lambda img: image_processing.preprocess("anyres", img, cfg))
    ours_f32 = bench(
        lambda img: image_processing.normalize(image_processing.preprocess("anyres", img, cfg)[0])
    )
    theirs = bench(lambda img: hf(images=[img], return_tensors="np"))
    # Same pixels: ours (normalised) equals HF's crops.
    img = images[0]
    a = image_processing.normalize(image_processing.preprocess("anyres", img, cfg)[0])
    b = np.asarray(hf(images=[img], return_tensors="np")["pixel_values"][0]).transpose(0, 2, 3, 1)
    same = np.allclose(a, b[: len(a)], atol=1e-6)
    sizes = [im.size[::-1] for im in images]
    return [
        f"{len(images)} single images, sizes {min(sizes)}..{max(sizes)} (H, W), best of {repeats},"
        f" 1 core; outputs equal: {same}",
        "",
        "| image preprocessing (anyres_max_9) | ms / image | images / s |",
        "| --- | --- | --- |",
        f"| ours: uint8 crops (what the loader ships) | {ours * 1e3:.1f} | {1 / ours:.1f} |",
        f"| ours: + normalise to float32 (HF's output) | {ours_f32 * 1e3:.1f} | "
        f"{1 / ours_f32:.1f} |",
        f"| HF LlavaOnevisionImageProcessorPil | {theirs * 1e3:.1f} | {1 / theirs:.1f} |",
    ]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=20000, help="mix size for the fill figure")
    ap.add_argument("-L", "--max-tokens", type=int, default=32768)
    ap.add_argument("-N", "--max-crops", type=int, default=84)
    ap.add_argument("--pack-samples", type=int, default=600)
    ap.add_argument("--pipeline-samples", type=int, default=150)
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--images", type=int, default=40)
    args = ap.parse_args(argv)
    cfg = config.ov_7b()
    big_l, big_n = args.max_tokens, args.max_crops
    print(f"host: {os.cpu_count()} CPU cores\n")
    print("\n".join(fill_table(args.samples, big_l, big_n, cfg)))
    print()
    print("| throughput (B=1) | samples/s | samples/s/core | visual tokens/s/core | rows/s |")
    print("| --- | --- | --- | --- | --- |")
    print(pipeline_lines(args.pack_samples, big_l, big_n, cfg, "zeros", 0))
    print(pipeline_lines(args.pipeline_samples, big_l, big_n, cfg, "preprocess", args.workers))
    print()
    print("\n".join(preprocess_lines(args.images, cfg)))


if __name__ == "__main__":
    main()
