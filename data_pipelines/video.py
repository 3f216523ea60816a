"""Video decoding with PyAV and frame sampling."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def sample_frame_indices(total: int, num_frames: int) -> np.ndarray:
    """Uniformly spaced indices incl. first and last (LLaVA-OV inference tutorial)."""
    if total <= 0:
        raise ValueError("video has no frames")
    return np.linspace(0, total - 1, min(num_frames, total), dtype=int)


def read_video(path: str | Path, num_frames: int = 8) -> np.ndarray:
    """Decode `path` and return uint8[F, H, W, 3] RGB frames sampled uniformly."""
    import av

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"video not found: {path}")
    try:
        with av.open(str(path)) as container:
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    except (av.error.FFmpegError, IndexError) as err:
        raise ValueError(f"cannot decode video {path}: {err}") from err
    if not frames:
        raise ValueError(f"video {path} decoded to zero frames")
    return np.stack([frames[i] for i in sample_frame_indices(len(frames), num_frames)])


def write_video(path: str | Path, frames: np.ndarray, fps: int = 4) -> None:
    """Encode uint8[F, H, W, 3] frames to mp4 (h264 if available, else mpeg4)."""
    import av

    with av.open(str(path), mode="w") as container:
        codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
        stream = container.add_stream(codec, rate=fps)
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = "yuv420p"
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
