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


# ---- training-time sampling (docs/reference.md 5.1, orig `process_video_with_decord`) --------


def training_frame_indices(
    total: int,
    native_fps: float | None,
    *,
    fps: float = 1.0,
    frames_upbound: int = 32,
    force_sample: bool = False,
) -> np.ndarray:
    """Orig training rule: every round(native_fps / fps)-th frame (1 fps by default); if that
    is more than `frames_upbound` (or `force_sample`), linspace(0, total-1, frames_upbound).

    `native_fps=None` (a folder of frames: no timing) keeps every frame before the cap.
    With `force_sample` and total < frames_upbound, indices repeat (as orig).
    """
    if total <= 0:
        raise ValueError("video has no frames")
    step = 1
    if native_fps and fps > 0:
        # Python round, as orig; guard step 0 for clips slower than fps / 2.
        step = max(1, round(native_fps / fps))
    idx = np.arange(0, total, step)
    if frames_upbound > 0 and (len(idx) > frames_upbound or force_sample):
        idx = np.linspace(0, total - 1, frames_upbound, dtype=int)
    return idx


def probe_video(src) -> tuple[int, float | None]:
    """(frame count, average fps) of a video file path or binary file object; (0, None)
    when there is no video stream. The count comes from the container header, else from
    demuxing packets (no decode).
    """
    import av

    with av.open(src if not isinstance(src, Path) else str(src)) as container:
        if not container.streams.video:
            return 0, None
        stream = container.streams.video[0]
        total = stream.frames
        rate = stream.average_rate or stream.guessed_rate
        if not total:
            total = sum(1 for packet in container.demux(stream) if packet.size)
    return int(total), (float(rate) if rate else None)


def decode_frames(src, indices) -> tuple[list[np.ndarray | None], int]:
    """Decode only the frames at `indices` (sorted or not, repeats allowed).

    Returns (frames in `indices` order, None where the stream ended before that index;
    the number of frames decoded). Stops decoding after the last wanted index.
    """
    import av

    want: dict[int, list[int]] = {}
    for out_pos, i in enumerate(indices):
        want.setdefault(int(i), []).append(out_pos)
    out: list[np.ndarray | None] = [None] * len(indices)
    last = max(want) if want else -1
    n = 0
    with av.open(src if not isinstance(src, Path) else str(src)) as container:
        for n, frame in enumerate(container.decode(video=0), start=1):
            i = n - 1
            if i in want:
                array = frame.to_ndarray(format="rgb24")
                for out_pos in want[i]:
                    out[out_pos] = array
            if i >= last:
                break
    return out, n
