"""Video frame geometry: pooled sizes, SlowFast strides, and the device-side window pool.

../shared/REFERENCE_VIDEO_POST.md 1.2 and 2.2-2.4. A frame's P x P features (P patches
per side, no CLS) become tokens in one of two ways (`ModelConfig.video`, a VideoConfig):

  bilinear          LLaVA-Video `get_2dPool` / HF OneVision `apply_pooling`: torch
                    bilinear (align_corners=False, no antialias) to ceil(P/s) x ceil(P/s),
                    after the projector. Host-computed: 4 taps per token into the crop
                    rows of the feature bank (lov_jax/visual_layout.py).
  average / max     s x s windows, stride s, floor(P/s) per side (torch AvgPool2d /
                    MaxPool2d, ceil_mode=False): HF `LlavaNextVideoPooler` before the
                    projector, `get_2dPool` after it. A max is no weighted sum, so the
                    device pools every crop slot once per stride (`pool_frames`) into
                    bank rows of their own (lov_jax/batch.py `pooled_start`); a token
                    is then a plain copy tap of one of those rows.

SlowFast (`faster`, LLaVA-Video's `add_faster_video` as `encode_multimodals` designs it;
that call is commented out on LLaVA-NeXT main, so no released checkpoint uses it): frame
i is slow (stride s) when i % faster_stride == 0, else fast (stride 2s).
"""

from __future__ import annotations

import math

from lov_jax.config import ModelConfig, VideoConfig


def pooled_side(patches: int, stride: int, mode: str) -> int:
    """Side of a P x P frame pooled at `stride`: bilinear ceil(P/s), average / max floor."""
    side = math.ceil(patches / stride) if mode == "bilinear" else patches // stride
    if side < 1:
        raise ValueError(f"a {patches}x{patches} frame pooled {mode} at stride {stride} is empty")
    return side


def frame_strides(video: VideoConfig, num_frames: int) -> list[int]:
    """The pool stride of each frame: all `pool_stride`, or SlowFast's slow / fast."""
    s = video.pool_stride
    if not video.faster:
        return [s] * num_frames
    return [s if i % video.faster_stride == 0 else 2 * s for i in range(num_frames)]


def device_strides(cfg: ModelConfig) -> tuple[int, ...]:
    """Strides the device pools every crop slot at (average / max; bilinear: none)."""
    v = cfg.video
    if v.pool_mode == "bilinear":
        return ()
    return (v.pool_stride, 2 * v.pool_stride) if v.faster else (v.pool_stride,)


def frame_tokens(cfg: ModelConfig, stride: int) -> int:
    """Tokens of one frame pooled at `stride`, newlines and faster_token included."""
    v = cfg.video
    side = pooled_side(cfg.vision.patches_per_side, stride, v.pool_mode)
    n = side * side
    if v.newline == "grid":
        n += side
    elif v.newline == "frame":
        n += 1
    return n + int(v.faster)


def video_tokens(cfg: ModelConfig, num_frames: int) -> int:
    """Placeholder count of a video of `num_frames` frames (REFERENCE_VIDEO_POST.md 2.7)."""
    n = sum(frame_tokens(cfg, s) for s in frame_strides(cfg.video, num_frames))
    return n + int(cfg.video.newline == "one_token")


def pool_frames(x, patches: int, stride: int, mode: str):
    """Window pool of frames: x float[M, P*P, D] (row-major patches) -> float[M, h*h, D],
    h = floor(P/s), as torch Avg/MaxPool2d(s, s) (the last P % s rows / cols dropped).

    Works on numpy and jax arrays alike (reshape + mean / max)."""
    m, n, d = x.shape
    if n != patches * patches:
        raise ValueError(f"pool_frames: {n} features per frame are not {patches}x{patches}")
    h = pooled_side(patches, stride, mode)
    grid = x.reshape(m, patches, patches, d)[:, : h * stride, : h * stride]
    win = grid.reshape(m, h, stride, h, stride, d)
    out = win.mean(axis=(2, 4)) if mode == "average" else win.max(axis=(2, 4))
    return out.reshape(m, h * h, d)
