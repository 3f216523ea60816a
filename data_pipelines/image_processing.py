"""HF-compatible image/video preprocessing on the host (numpy + Pillow), channels-last.

Pixel-exact with `transformers.LlavaOnevisionImageProcessorPil` (the PIL backend, which
matches the original LLaVA-NeXT code; docs/reference.md 2, 4.1, 5.2). Crops stay uint8 until
`normalize`, so the host can ship uint8 pixels and the device normalises the same way.

Layout deviation from HF: crops are uint8[n, 384, 384, 3] (channels-last), HF's
pixel_values are float32[n, 3, 384, 384].
"""

from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image

from lov_jax.config import ModelConfig
from lov_jax.visual_layout import VisualItem, select_best_resolution

# SigLIP normalisation (hub preprocessor_config.json overrides HF's CLIP class defaults).
IMAGE_MEAN = (0.5, 0.5, 0.5)
IMAGE_STD = (0.5, 0.5, 0.5)
# Multi-image pad-to-square background, as HF: tuple(int(m * 255) for m in image_mean).
PAD_COLOR = tuple(int(m * 255) for m in IMAGE_MEAN)  # (127, 127, 127)


def to_rgb(image: Image.Image | np.ndarray) -> Image.Image:
    """RGB PIL image. Transparency is composited onto white, as HF's `convert_to_rgb`.

    (The original LLaVA-NeXT code calls `.convert("RGB")`, which drops alpha instead;
    the two differ only on transparent pixels.)
    """
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        image = image.convert("RGBA")
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, image).convert("RGB")
    return image.convert("RGB")


def _resize(image: Image.Image, height: int, width: int) -> np.ndarray:
    """PIL bicubic resize -> uint8[height, width, 3] (PIL copies when the size is unchanged)."""
    return np.asarray(image.resize((width, height), resample=Image.Resampling.BICUBIC))


def _resize_output_size(size_hw: tuple[int, int], target_hw: tuple[int, int]) -> tuple[int, int]:
    """HF `get_patch_output_size`: fit inside target keeping aspect, ceil on the short side."""
    (h, w), (th, tw) = size_hw, target_hw
    scale_w, scale_h = tw / w, th / h
    if scale_w < scale_h:
        return min(int(np.ceil(h * scale_w)), th), tw
    return th, min(int(np.ceil(w * scale_h)), tw)


def anyres_crops(
    image: Image.Image | np.ndarray, cfg: ModelConfig
) -> tuple[np.ndarray, tuple[int, int]]:
    """Higher AnyRes crops (docs/reference.md 2.2-2.4).

    Returns (crops uint8[1 + gh*gw, S, S, 3], (H, W) of the original), S = image_size.
    crops[0] is the original resized straight to SxS (aspect not kept); crops[1:] are
    the grid cells, row-major, of the original bicubic-resized into (best_h, best_w)
    with black padding split floor/ceil around it.
    """
    image = to_rgb(image)
    s = cfg.vision.image_size
    size_hw = (image.height, image.width)
    best_h, best_w = select_best_resolution(size_hw, cfg.image_grid_pinpoints)
    new_h, new_w = _resize_output_size(size_hw, (best_h, best_w))
    canvas = np.zeros((best_h, best_w, 3), np.uint8)
    top, left = (best_h - new_h) // 2, (best_w - new_w) // 2
    canvas[top : top + new_h, left : left + new_w] = _resize(image, new_h, new_w)
    # [gh*S, gw*S, 3] -> [gh, gw, S, S, 3] -> [gh*gw, S, S, 3] (row-major cells)
    grid = canvas.reshape(best_h // s, s, best_w // s, s, 3).transpose(0, 2, 1, 3, 4)
    crops = np.concatenate([_resize(image, s, s)[None], grid.reshape(-1, s, s, 3)])
    return crops, size_hw


def square_crop(image: Image.Image | np.ndarray, cfg: ModelConfig) -> np.ndarray:
    """Stage-1 crop: direct bicubic resize to SxS. Returns uint8[1, S, S, 3]."""
    s = cfg.vision.image_size
    return _resize(to_rgb(image), s, s)[None]


def pad_crop(image: Image.Image | np.ndarray, cfg: ModelConfig) -> np.ndarray:
    """Multi-image crop (docs/reference.md 4): pad to square with PAD_COLOR, then resize to S.

    The image is centred at floor((L - short) / 2). Returns uint8[1, S, S, 3].
    """
    image = to_rgb(image)
    s = cfg.vision.image_size
    h, w = image.height, image.width
    if h != w:
        side = max(h, w)
        square = np.empty((side, side, 3), np.uint8)
        square[:] = PAD_COLOR
        top, left = (side - h) // 2, (side - w) // 2
        square[top : top + h, left : left + w] = np.asarray(image)
        image = Image.fromarray(square)
    return _resize(image, s, s)[None]


def video_frames(frames: np.ndarray, cfg: ModelConfig) -> np.ndarray:
    """Per-frame bicubic resize straight to SxS (docs/reference.md 5.2).

    frames: uint8[F, H, W, 3] (or a sequence of PIL images). Returns uint8[F, S, S, 3].
    """
    s = cfg.vision.image_size
    if len(frames) == 0:
        raise ValueError("video has no frames")
    return np.stack([_resize(to_rgb(f), s, s) for f in frames])


def normalize(pixels: np.ndarray) -> np.ndarray:
    """uint8[..., 3] -> float32[..., 3] = (x/255 - mean)/std, channels-last."""
    x = np.asarray(pixels, np.float64) / 255.0
    mean, std = np.asarray(IMAGE_MEAN), np.asarray(IMAGE_STD)
    return ((x - mean) / std).astype(np.float32)


def preprocess(kind: str, image: Any, cfg: ModelConfig) -> tuple[np.ndarray, VisualItem]:
    """Dispatch on the item kind. Returns (crops uint8[n, S, S, 3], VisualItem).

    kind: "anyres" | "square" | "pad" take one image (PIL or uint8[H, W, C]);
    "video" takes frames uint8[F, H, W, 3] or a sequence of PIL images.
    """
    if kind == "anyres":
        crops, size_hw = anyres_crops(image, cfg)
        return crops, VisualItem("anyres", image_size=size_hw)
    if kind == "square":
        return square_crop(image, cfg), VisualItem("square")
    if kind == "pad":
        return pad_crop(image, cfg), VisualItem("pad")
    if kind == "video":
        frames = video_frames(image, cfg)
        return frames, VisualItem("video", num_frames=len(frames))
    raise ValueError(f"unknown visual item kind {kind!r}")
