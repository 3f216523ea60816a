"""Helpers shared by the HF parity tests: build the same inputs for HF and for us."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lov_jax import visual_layout
from lov_jax.config import ModelConfig

TEXT_IDS = [151644, 872, 198]  # "<|im_start|>user\n"
TAIL_IDS = [198, 3838, 374, 419, 30, 151645, 198, 151644, 77091, 198]


@dataclass
class Sample:
    """One prompt: our crops and tokens plus what HF's forward needs."""

    tokens: np.ndarray  # int32[T]
    crops: np.ndarray  # uint8[n, 384, 384, 3]
    items: list  # list[visual_layout.VisualItem]
    hf_kwargs: dict  # pixel_values / image_sizes / batch_num_images / pixel_values_videos


def to_hf_pixels(crops: np.ndarray) -> np.ndarray:
    """uint8[n, S, S, 3] -> float32[n, 3, S, S] normalised like HF (x/255 - 0.5)/0.5."""
    x = crops.astype(np.float32) * np.float32(1 / 255)
    return ((x - 0.5) / 0.5).transpose(0, 3, 1, 2)


def random_image(h: int, w: int, seed: int):
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def expand(items, cfg: ModelConfig, text_between=(TEXT_IDS, TAIL_IDS)) -> np.ndarray:
    """Token ids: header, each item's expanded placeholder run (then a newline), tail."""
    head, tail = text_between
    ids = list(head)
    for item in items:
        token = cfg.ids.video if item.kind == "video" else cfg.ids.image
        ids += [token] * visual_layout.num_tokens(item, cfg) + [198]
    return np.asarray(ids + list(tail), np.int32)


def single_image_sample(h: int, w: int, cfg: ModelConfig, seed: int = 0) -> Sample:
    from data_pipelines import image_processing

    crops, item = image_processing.preprocess("anyres", random_image(h, w, seed), cfg)
    torch_kwargs = {
        "pixel_values": to_hf_pixels(crops)[None],
        "image_sizes": np.asarray([[h, w]]),
    }
    return Sample(expand([item], cfg), crops, [item], torch_kwargs)


def multi_image_sample(sizes, cfg: ModelConfig, seed: int = 0) -> Sample:
    from data_pipelines import image_processing

    crops, items = [], []
    for i, (h, w) in enumerate(sizes):
        c, item = image_processing.preprocess("pad", random_image(h, w, seed + i), cfg)
        crops.append(c)
        items.append(item)
    crops = np.concatenate(crops)
    torch_kwargs = {
        "pixel_values": to_hf_pixels(crops)[:, None],  # [num_images, 1 crop, 3, S, S]
        "image_sizes": np.asarray(sizes),
        "batch_num_images": np.asarray([len(sizes)]),
    }
    return Sample(expand(items, cfg), crops, items, torch_kwargs)


def video_sample(num_frames: int, cfg: ModelConfig, seed: int = 0) -> Sample:
    from data_pipelines import image_processing

    rng = np.random.default_rng(seed)
    frames = rng.integers(0, 256, (num_frames, 240, 320, 3), dtype=np.uint8)
    crops = image_processing.video_frames(frames, cfg)
    item = visual_layout.VisualItem(kind="video", num_frames=num_frames)
    torch_kwargs = {"pixel_values_videos": to_hf_pixels(crops)[None]}
    return Sample(expand([item], cfg), crops, [item], torch_kwargs)


def text_sample() -> Sample:
    tokens = np.asarray(TEXT_IDS + [9707, 11, 1879, 0, 3555] + TAIL_IDS, np.int32)
    return Sample(tokens, np.zeros((0, 384, 384, 3), np.uint8), [], {})


def our_batch(samples, cfg: ModelConfig, length: int, num_crops: int, pack: bool = False):
    """Batch-contract arrays: one sample per row, or all samples packed into one row."""
    rows = [samples] if pack else [[s] for s in samples]
    size = cfg.vision.image_size
    b = len(rows)
    batch = {
        "tokens": np.zeros((b, length), np.int32),
        "positions": np.zeros((b, length), np.int32),
        "segment_ids": np.zeros((b, length), np.int32),
        "pixels": np.zeros((b, num_crops, size, size, 3), np.uint8),
    }
    vis_idx, vis_w = [], []
    for r, row in enumerate(rows):
        t = c = 0
        for seg, s in enumerate(row, start=1):
            n = len(s.tokens)
            batch["tokens"][r, t : t + n] = s.tokens
            batch["positions"][r, t : t + n] = np.arange(n)
            batch["segment_ids"][r, t : t + n] = seg
            batch["pixels"][r, c : c + len(s.crops)] = s.crops
            t, c = t + n, c + len(s.crops)
        items = [item for s in row for item in s.items]
        idx, w = visual_layout.place_taps(batch["tokens"][r], items, cfg, num_crops)
        vis_idx.append(idx)
        vis_w.append(w)
    batch["vis_idx"] = np.stack(vis_idx)
    batch["vis_w"] = np.stack(vis_w)
    return batch


def hf_logits(model, sample: Sample) -> np.ndarray:
    """float32[T, V] logits of the HF model for one unpadded sample."""
    import torch

    kwargs = {k: torch.from_numpy(np.asarray(v)) for k, v in sample.hf_kwargs.items()}
    ids = torch.from_numpy(sample.tokens.astype(np.int64))[None]
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs)
    return out.logits[0].float().numpy()
