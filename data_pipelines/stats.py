"""Data figures: budget fill, throughput, skip reasons; a synthetic OneVision-like mix.

`run_stats` drives the real loader (any records + process function) and reports what
`lov-jax data stats` prints. `ov_mix_records` / `SyntheticProcess` make an OneVision-like
mix without files (docs/reference.md 8 / docs/design.md 2: ~31% single image, 43% multi-image,
23% video, a few % text-only), and `llava_next_fill` scores LLaVA-NeXT's batching
(docs/reference.md 7.3: modality-grouped, length-sorted megabatches, padded to the longest)
on the same samples for the side-by-side figure.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from data_pipelines.sample import BadSample, Sample
from lov_jax import visual_layout
from lov_jax.config import ModelConfig
from lov_jax.visual_layout import VisualItem

# ---- synthetic OneVision-like mix ------------------------------------------------------

MIX = (("single", 0.31), ("multi", 0.43), ("video", 0.23), ("text", 0.03))
_TEXT_IDS = (100, 30000)  # ordinary vocabulary ids for synthetic text


def _image_size(rng: np.random.Generator) -> tuple[int, int]:
    """Long side: 40% 400-800 px (COCO-like), 30% 800-1400, 30% 1400-2600 (docs, charts);
    aspect ratio log-uniform in [1/2, 2]."""
    r = rng.random()
    lo, hi = (400, 800) if r < 0.4 else (800, 1400) if r < 0.7 else (1400, 2600)
    long = int(rng.integers(lo, hi))
    ar = float(np.exp(rng.uniform(np.log(0.5), np.log(2.0))))
    short = max(int(long / max(ar, 1 / ar)), 32)
    return (long, short) if ar < 1 else (short, long)


def _text_len(rng: np.random.Generator, median: float, sigma: float, lo: int, hi: int) -> int:
    return int(np.clip(rng.lognormal(np.log(median), sigma), lo, hi))


def ov_mix_records(n: int, seed: int = 0) -> list[dict]:
    """`n` synthetic records: {id, kind, image_sizes, num_frames, text_tokens, seed}.

    Text tokens (prompt + answer) are log-normal: single image median 200, multi-image
    150, video 120, text-only 600 (tails to a few thousand). Multi-image 2-8 images,
    video 8-32 frames (frames_upbound 32).
    """
    rng = np.random.default_rng(seed)
    kinds, probs = zip(*MIX, strict=True)
    out = []
    for i, kind in enumerate(rng.choice(kinds, size=n, p=np.asarray(probs) / sum(probs))):
        rec: dict[str, Any] = {"id": f"syn{i}", "kind": str(kind), "seed": int(rng.integers(2**31))}
        rec["image_sizes"], rec["num_frames"] = [], 0
        if kind == "single":
            rec["image_sizes"] = [_image_size(rng)]
            rec["text_tokens"] = _text_len(rng, 200, 1.0, 20, 4000)
        elif kind == "multi":
            rec["image_sizes"] = [_image_size(rng) for _ in range(int(rng.integers(2, 9)))]
            rec["text_tokens"] = _text_len(rng, 150, 0.8, 20, 2000)
        elif kind == "video":
            rec["num_frames"] = int(rng.integers(8, 33))
            rec["text_tokens"] = _text_len(rng, 120, 0.8, 20, 1500)
        else:
            rec["text_tokens"] = _text_len(rng, 600, 1.0, 30, 8000)
        out.append(rec)
    return out


def record_items(record: dict, cfg: ModelConfig) -> list[VisualItem]:
    """The record's visual items, each image of the kind `cfg`'s architecture gives it
    (`image_processing.image_kind`: OneVision anyres alone / pad in a group, LLaVA-NeXT
    anyres, LLaVA-1.5 one crop)."""
    from data_pipelines.image_processing import image_kind

    if record["kind"] == "video":
        return [VisualItem("video", num_frames=record["num_frames"])]
    sizes = [tuple(hw) for hw in record["image_sizes"]]
    kind = image_kind(cfg, len(sizes))
    return [VisualItem(kind, image_size=hw if kind == "anyres" else None) for hw in sizes]


def record_sizes(records: Sequence[dict], cfg: ModelConfig) -> np.ndarray:
    """int64[n, 3]: (total tokens, crops, text tokens) per synthetic record."""
    out = np.zeros((len(records), 3), np.int64)
    for i, r in enumerate(records):
        items = record_items(r, cfg)
        vis = sum(visual_layout.num_tokens(it, cfg) for it in items)
        out[i] = (r["text_tokens"] + vis, sum(visual_layout.num_crops(it, cfg) for it in items),
                  r["text_tokens"])  # fmt: skip
    return out


class SyntheticProcess:
    """Synthetic record -> Sample.

    pixels="zeros": crops are zeros (fast; for packing/fill figures and tests);
    "preprocess": random-content images/frames of the record's sizes go through the real
    `image_processing.preprocess` (each item's kind, or video), i.e. the host preprocessing cost
    without file decoding. Text is random ids; the second half of the text is trained.
    A record with a "skip" key raises BadSample with that reason (bad-input tests).
    """

    def __init__(self, cfg: ModelConfig, pixels: str = "zeros", video_hw=(360, 640)):
        if pixels not in ("zeros", "preprocess"):
            raise ValueError(f"pixels {pixels!r} not in ('zeros', 'preprocess')")
        self.cfg, self.pixels, self.video_hw = cfg, pixels, tuple(video_hw)

    def _crops(self, record: dict, items: list[VisualItem], rng) -> np.ndarray:
        cfg, s = self.cfg, self.cfg.vision.image_size
        n = sum(visual_layout.num_crops(it, cfg) for it in items)
        if self.pixels == "zeros" or not items:
            return np.zeros((n, s, s, 3), np.uint8)
        from data_pipelines.image_processing import preprocess

        def image(h, w):  # smooth random content: cheap to make, realistic to resize
            small = rng.integers(0, 256, (max(h // 16, 1), max(w // 16, 1), 3), dtype=np.uint8)
            from PIL import Image

            return Image.fromarray(small).resize((w, h), Image.Resampling.BILINEAR)

        if record["kind"] == "video":
            h, w = self.video_hw
            frames = [np.asarray(image(h, w)) for _ in range(record["num_frames"])]
            return preprocess("video", np.stack(frames), cfg)[0]
        return np.concatenate(
            [
                preprocess(it.kind, image(h, w), cfg)[0]
                for it, (h, w) in zip(items, record["image_sizes"], strict=True)
            ]
        )

    def __call__(self, record: dict) -> Sample:
        if record.get("skip"):  # a synthetic bad record, e.g. {"skip": "missing_image"}
            raise BadSample(record["skip"], f"{record['skip']}: synthetic record {record['id']}")
        cfg = self.cfg
        rng = np.random.default_rng(record["seed"])
        items = record_items(record, cfg)
        text = rng.integers(*_TEXT_IDS, size=record["text_tokens"]).astype(np.int32)
        head = len(text) // 2
        runs = []
        for it in items:
            pid = cfg.ids.placeholder_id(it.kind)
            runs.append(np.full(visual_layout.num_tokens(it, cfg), pid, np.int32))
        tokens = np.concatenate([text[:head], *runs, text[head:]]).astype(np.int32)
        targets = np.append(tokens[1:], 0).astype(np.int32)
        loss_mask = np.zeros(len(tokens), np.float32)
        loss_mask[len(tokens) - (len(text) - head) : -1] = 1.0
        return Sample(
            id=record["id"], tokens=tokens, targets=targets, loss_mask=loss_mask,
            crops=self._crops(record, items, rng), items=items, source="synthetic",
        )  # fmt: skip


# ---- LLaVA-NeXT's batching on the same samples ------------------------------------------


def llava_next_fill(
    tokens: np.ndarray,
    crops: np.ndarray,
    lengths: np.ndarray,
    multimodal: np.ndarray,
    *,
    world_size: int,
    per_device_batch: int,
    seed: int = 0,
) -> dict[str, float]:
    """Useful fraction of LLM tokens and ViT crops under LLaVA-NeXT's sampler + collator.

    LengthGroupedSampler(group_by_modality_length): multimodal and text-only indices are
    shuffled separately, cut into megabatches of world_size * per_device_batch, each
    sorted by `lengths` (word counts: text only) descending and dealt into world_size
    device batches (greedy to the lightest device, as `split_to_even_chunks`). The
    collator pads each device batch to its longest sample (expanded sequence), and a
    data-parallel step lasts as long as its slowest device. Returns
      pad_token_fill:  real tokens / padded device-batch tokens
      step_token_fill: real tokens / (devices * the step's largest device-batch tokens)
      step_crop_fill:  real crops / (devices * the step's largest device-batch crops)
    """
    rng = np.random.default_rng(seed)
    mega = world_size * per_device_batch
    steps = []
    for group in (np.flatnonzero(multimodal), np.flatnonzero(~multimodal)):
        group = rng.permutation(group)
        steps += [group[i : i + mega] for i in range(0, len(group), mega)]
    real_t = real_c = padded_t = step_t = step_c = 0
    for step in steps:
        step = step[np.argsort(-lengths[step], kind="stable")]
        devices = [[] for _ in range(world_size)]
        load = np.zeros(world_size)
        for i in step:  # fill the lightest device that still has room
            open_ = [d for d in range(world_size) if len(devices[d]) < per_device_batch]
            d = min(open_, key=lambda d: load[d])
            devices[d].append(i)
            load[d] += lengths[i]
        dev_t = [len(d) * tokens[d].max() if d else 0 for d in devices]
        dev_c = [crops[d].sum() if d else 0 for d in devices]
        real_t += tokens[step].sum()
        real_c += crops[step].sum()
        padded_t += sum(dev_t)
        step_t += world_size * max(dev_t)
        step_c += world_size * max(dev_c)
    return {
        "pad_token_fill": real_t / max(padded_t, 1),
        "step_token_fill": real_t / max(step_t, 1),
        "step_crop_fill": real_c / max(step_c, 1),
    }


# ---- the loader's figures ---------------------------------------------------------------


@dataclasses.dataclass
class StatsReport:
    batches: int
    seconds: float
    samples: int
    visual_tokens: int
    stats: dict[str, Any]
    cores: int

    def lines(self) -> list[str]:
        s, sec = self.stats, max(self.seconds, 1e-9)
        out = [
            f"batches {self.batches}, rows {s['rows']}, samples in {s['samples_in']}, "
            f"packed {s['samples_packed']}",
            f"token fill {s['token_fill']:.3f}   crop fill {s['crop_fill']:.3f}",
            f"throughput {self.samples / sec:.1f} samples/s, {self.visual_tokens / sec:.0f} "
            f"visual tokens/s ({self.samples / sec / self.cores:.1f} samples/s/core, "
            f"{self.visual_tokens / sec / self.cores:.0f} visual tokens/s/core, "
            f"{self.cores} cores)",
            f"skipped {s['skipped']}"
            + "".join(f"\n  {k[5:]}: {v}" for k, v in s.items() if k.startswith("skip/")),
        ]
        return out


def run_stats(iterator, max_batches: int | None = None, cores: int | None = None) -> StatsReport:
    """Drain up to `max_batches` from a loader iterator; time it and collect its stats."""
    import os

    t0, batches, visual = time.perf_counter(), 0, 0
    for batch in iterator:
        visual += int((batch["vis_w"] != 0).any(-1).sum())
        batches += 1
        if max_batches is not None and batches >= max_batches:
            break
    seconds = time.perf_counter() - t0
    stats = iterator.stats()
    cores = cores or os.cpu_count() or 1
    return StatsReport(batches, seconds, stats["samples_packed"], visual, stats, cores)


def synthetic_loader_inputs(
    n: int, cfg: ModelConfig, seed: int = 0, pixels: str = "zeros"
) -> tuple[list[dict], Callable[[dict], Sample]]:
    return ov_mix_records(n, seed), SyntheticProcess(cfg, pixels)
