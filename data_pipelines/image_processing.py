"""HF-compatible image/video preprocessing on the host (numpy + Pillow), channels-last.

Pixel-exact with transformers' PIL-backend image processors (docs/reference.md 2, 4.1,
5.2; docs/reference_family.md A.5, A.7.1):
  "anyres"       LlavaOnevisionImageProcessorPil and LlavaNextImageProcessorPil (the same
                 steps: best pinpoint, aspect-keeping bicubic resize, black padding, SxS
                 grid crops after a base image resized straight to SxS)
  "pad"          expand2square with the mean colour, then resize to SxS: OneVision's
                 multi-image crops, the original LLaVA-1.5 `image_aspect_ratio=pad`
                 (= LlavaImageProcessorPil(do_pad=True))
  "center_crop"  CLIPImageProcessorPil: shortest edge to S (bicubic) + center crop SxS
                 (llava-hf LLaVA-1.5)
  "square"       direct bicubic resize to SxS (stage 1; video frames alike)
`image_kind` picks the kind of every image of a prompt or record from the config.

Crops stay uint8 until `normalize`, so the host can ship uint8 pixels and the device
normalises the same way (mean / std are the tower's: `VisionConfig.image_mean/_std`).
Layout deviation from HF: crops are uint8[n, S, S, 3] (channels-last), HF's pixel_values
are float32[n, 3, S, S].
"""

from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image

from lov_jax.config import ModelConfig, VisionConfig
from lov_jax.visual_layout import KINDS, VisualItem, select_best_resolution


def pad_color(vision: VisionConfig) -> tuple[int, ...]:
    """Pad-to-square background, as HF and the original: int(m * 255) per channel mean."""
    return tuple(int(m * 255) for m in vision.image_mean)


PAD_COLOR = pad_color(VisionConfig())  # SigLIP (OneVision): (127, 127, 127)
# PIL modes whose samples exceed 8 bits: PIL's (and so HF's) RGB conversion clips them.
_WIDE_MODES = ("I", "F", "I;16", "I;16L", "I;16B", "I;16N")


def _array_to_rgb(image: np.ndarray) -> Image.Image:
    """uint8[H, W] / [H, W, 1|3|4] -> RGB, as HF's numpy `convert_to_rgb` (alpha blended
    onto white in float64, then np.round)."""
    if image.dtype != np.uint8:
        raise ValueError(f"image array has dtype {image.dtype}: expected uint8[H, W, C]")
    if image.ndim == 2:
        image = image[..., None]
    if image.ndim != 3 or image.shape[-1] not in (1, 3, 4):
        raise ValueError(f"image array of shape {image.shape}: expected [H, W] or [H, W, 1|3|4]")
    if image.shape[-1] == 1:
        image = np.repeat(image, 3, axis=-1)
    elif image.shape[-1] == 4:
        alpha = image[..., 3:4] / 255
        image = np.round(alpha * image[..., :3] + (1 - alpha) * 255).astype(np.uint8)
    return Image.fromarray(np.ascontiguousarray(image))


def to_rgb(image: Image.Image | np.ndarray) -> Image.Image:
    """RGB PIL image. Transparency is composited onto white, as HF's `convert_to_rgb`.

    (The original LLaVA-NeXT code calls `.convert("RGB")`, which drops alpha instead;
    the two differ only on transparent pixels.) A zero-size image and 16-bit / 32-bit /
    float images are a ValueError: PIL's RGB conversion, which HF uses, would clip every
    sample above 255 to white.
    """
    if isinstance(image, np.ndarray):
        if 0 in image.shape[:2]:
            raise ValueError(f"image array of shape {image.shape} is empty")
        return _array_to_rgb(image)
    if image.width == 0 or image.height == 0:
        raise ValueError(f"image has zero size {image.width}x{image.height} (W x H)")
    if image.mode in _WIDE_MODES:
        raise ValueError(
            f"image mode {image.mode!r} has samples wider than 8 bits: convert it to 8-bit "
            "RGB first (PIL's and HF's RGB conversion would clip them at 255)"
        )
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


def center_crop(image: Image.Image | np.ndarray, cfg: ModelConfig) -> np.ndarray:
    """llava-hf LLaVA-1.5 (docs/reference_family.md A.5.1): `CLIPImageProcessor` with
    shortest_edge = crop = S. Returns uint8[1, S, S, 3].

    HF `get_resize_output_image_size(default_to_square=False)`: the short side becomes S,
    the long side int(S * long / short) (truncated); bicubic; then the SxS window at
    ((H' - S) // 2, (W' - S) // 2). A non-square image loses the ends of its long side.
    """
    image = to_rgb(image)
    s = cfg.vision.image_size
    h, w = image.height, image.width
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(s * long / short)
    new_h, new_w = (new_long, s) if w <= h else (s, new_long)
    resized = _resize(image, new_h, new_w)
    top, left = (new_h - s) // 2, (new_w - s) // 2
    return np.ascontiguousarray(resized[top : top + s, left : left + s])[None]


def pad_crop(image: Image.Image | np.ndarray, cfg: ModelConfig) -> np.ndarray:
    """Pad to square with `pad_color`, then resize to S (docs/reference.md 4; the original
    LLaVA-1.5 `expand2square` + CLIP processor, docs/reference_family.md A.5.2, where the
    shortest-edge resize of a square is this resize and the center crop a no-op).

    The image is centred at floor((L - short) / 2). Returns uint8[1, S, S, 3].
    """
    image = to_rgb(image)
    s = cfg.vision.image_size
    h, w = image.height, image.width
    if h != w:
        side = max(h, w)
        square = np.empty((side, side, 3), np.uint8)
        square[:] = pad_color(cfg.vision)
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


def normalize(pixels: np.ndarray, vision: VisionConfig | None = None) -> np.ndarray:
    """uint8[..., 3] -> float32[..., 3] = (x/255 - mean)/std, channels-last.

    mean / std are `vision`'s (None: the default SigLIP tower's 0.5 / 0.5)."""
    vision = VisionConfig() if vision is None else vision
    x = np.asarray(pixels, np.float64) / 255.0
    mean, std = np.asarray(vision.image_mean), np.asarray(vision.image_std)
    return ((x - mean) / std).astype(np.float32)


def image_kind(cfg: ModelConfig, num_images: int, *, plain: bool = False) -> str:
    """The item kind of each image of a prompt / record with `num_images` images.

    llava            cfg.vision_aspect_ratio ("center_crop" = llava-hf, "pad" = original)
    llava_mini       the same (its CLIPImageProcessor: "center_crop"; "pad")
    llava_next       "anyres" for every image (HF LlavaNextProcessor; NeXT-Video too)
    llava_onevision  "anyres" for a lone image, else "pad" (HF LlavaOnevisionProcessor)
    A `plain` (stage-1 pretraining) sample takes the original's default `square` aspect,
    i.e. its image processor applied directly: "center_crop" for the CLIP-processor
    families (LLaVA-1.5's pretrain.sh passes no image_aspect_ratio), "square" for OneVision.
    """
    if num_images < 0:
        raise ValueError(f"num_images {num_images} < 0")
    if cfg.architecture in ("llava", "llava_next", "llava_next_video", "llava_mini"):
        if plain:
            return "center_crop"
        return cfg.vision_aspect_ratio if cfg.architecture in ("llava", "llava_mini") else "anyres"
    if plain:
        return "square"
    return "anyres" if num_images == 1 else "pad"


_IMAGE_CROPS = {"square": square_crop, "pad": pad_crop, "center_crop": center_crop}


def preprocess(kind: str, image: Any, cfg: ModelConfig) -> tuple[np.ndarray, VisualItem]:
    """Dispatch on the item kind. Returns (crops uint8[n, S, S, 3], VisualItem).

    kind: "anyres" | "square" | "pad" | "center_crop" take one image (PIL or
    uint8[H, W, C]); "video" takes frames uint8[F, H, W, 3] or a sequence of PIL images.
    """
    if kind == "anyres":
        crops, size_hw = anyres_crops(image, cfg)
        return crops, VisualItem("anyres", image_size=size_hw)
    if kind in _IMAGE_CROPS:
        return _IMAGE_CROPS[kind](image, cfg), VisualItem(kind)
    if kind == "video":
        frames = video_frames(image, cfg)
        return frames, VisualItem("video", num_frames=len(frames))
    raise ValueError(f"unknown visual item kind {kind!r}; choose from {KINDS}")
