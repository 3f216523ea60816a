"""Video decoding with PyAV and frame sampling."""

from __future__ import annotations

import bisect
import dataclasses
import itertools
from pathlib import Path

import numpy as np


def read_video(path: str | Path, num_frames: int = 8) -> np.ndarray:
    """Decode `path` and return uint8[num_frames, H, W, 3] RGB frames sampled as lmms-eval
    samples them (`lmms_eval_frame_indices`: uniform, first and last included, frames of a
    clip shorter than `num_frames` repeated), decoding only the GOPs that hold them."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"video not found: {path}")
    try:
        index = frame_index(path)
        if not index.pts:
            raise ValueError("no video frames")
        frames, _ = decode_frames(path, lmms_eval_frame_indices(len(index.pts), num_frames), index)
    except Exception as err:  # PyAV's FFmpegError, a short stream, a file that is no video
        raise ValueError(f"cannot decode video {path}: {err}") from err
    if any(f is None for f in frames):
        raise ValueError(f"cannot decode video {path}: the stream ends before its last packet")
    return np.stack(frames)


def lmms_eval_frame_indices(total: int, max_frames_num: int) -> np.ndarray:
    """lmms-eval's `llava_onevision` / `llava_vid` default: linspace(0, total-1,
    max_frames_num) cast to int, always `max_frames_num` of them (repeats on a short clip).
    (`llava_vid` with `force_sample` or a clip longer than max_frames_num seconds is
    `training_frame_indices(total, fps, frames_upbound=max_frames_num)`.)"""
    if total <= 0:
        raise ValueError("video has no frames")
    return np.linspace(0, total - 1, max_frames_num, dtype=int)


def write_video(path: str | Path, frames, fps: int = 4, gop: int | None = None) -> None:
    """Encode uint8[F, H, W, 3] frames (an array or an iterable of arrays) to mp4 (h264 if
    available, else mpeg4); `gop`: frames per keyframe interval (None: the codec's)."""
    import av

    frames = iter(frames)
    first = next(frames, None)
    if first is None:
        raise ValueError(f"write_video {path}: no frames")
    with av.open(str(path), mode="w") as container:
        codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
        stream = container.add_stream(codec, rate=fps)
        stream.height, stream.width = first.shape[:2]
        stream.pix_fmt = "yuv420p"
        if gop is not None:
            stream.codec_context.gop_size = gop
            if codec == "libx264":
                stream.options = {"keyint": str(gop), "min-keyint": str(gop), "scenecut": "0"}
        frames = itertools.chain([first], frames)
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
    return training_sample(total, native_fps, fps=fps, frames_upbound=frames_upbound,
                           force_sample=force_sample)[0]  # fmt: skip


def training_sample(
    total: int, native_fps: float | None, *, fps: float, frames_upbound: int, force_sample: bool
) -> tuple[np.ndarray, bool]:
    """(`training_frame_indices`, whether the linspace branch chose them): `frame_times`
    needs to know which of orig's two time formulas applies."""
    if total <= 0:
        raise ValueError("video has no frames")
    step = 1
    if native_fps and fps > 0:
        # Python round, as orig; guard step 0 for clips slower than fps / 2.
        step = max(1, round(native_fps / fps))
    idx = np.arange(0, total, step)
    if frames_upbound > 0 and (len(idx) > frames_upbound or force_sample):
        return np.linspace(0, total - 1, frames_upbound, dtype=int), True
    return idx, False


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


@dataclasses.dataclass(frozen=True)
class FrameIndex:
    """Where every frame of a video stream is, from demuxing its packets (no decode).

    pts: presentation time stamps, ascending: frame i of the video is the i-th (this holds
    for variable frame rates too). keyframes: the pts of keyframe packets, ascending.
    seekable: False when packets carry no timestamps (a raw .h264 stream): then `pts` is
    0..n-1 (packet order) and frames are decoded in order, without seeking.
    """

    pts: tuple[int, ...]
    keyframes: tuple[int, ...]
    seekable: bool = True


def frame_index(src) -> FrameIndex:
    import av

    pts, keys, untimed = [], [], 0
    with av.open(src if not isinstance(src, Path) else str(src)) as container:
        if not container.streams.video:
            return FrameIndex((), ())
        for packet in container.demux(container.streams.video[0]):
            if packet.size == 0:  # the flush packet
                continue
            if packet.pts is None:
                untimed += 1
                continue
            pts.append(packet.pts)
            if packet.is_keyframe:
                keys.append(packet.pts)
    if untimed:
        return FrameIndex(tuple(range(len(pts) + untimed)), (), seekable=False)
    return FrameIndex(tuple(sorted(pts)), tuple(sorted(keys)))


def decode_frames(
    src, indices, index: FrameIndex | None = None, stats: dict | None = None
) -> tuple[list[np.ndarray | None], int]:
    """Decode only the frames at `indices` (sorted or not, repeats allowed), with seeking.

    Frames are found by presentation time (`FrameIndex`): for each wanted frame the decoder
    seeks to the keyframe before it, unless it is already decoding that GOP, and decodes
    forward to it. Returns (frames in `indices` order, None where a frame does not decode;
    the number of frames in the stream). Decoding every frame gives the same arrays.
    `stats`, when given, gets "decoded" (frames the codec produced) and "seeks".
    """
    import av

    if index is None:
        index = frame_index(src)
        if hasattr(src, "seek"):  # a file object: read it again from the start
            src.seek(0)
    n = len(index.pts)
    out: list[np.ndarray | None] = [None] * len(indices)
    want: dict[int, list[int]] = {}
    for out_pos, i in enumerate(indices):
        if 0 <= int(i) < n:
            want.setdefault(index.pts[int(i)], []).append(out_pos)
    decoded = seeks = 0
    if not want:
        return out, n
    if not index.seekable:  # frame i is the i-th decoded; stop after the last wanted
        with av.open(src if not isinstance(src, Path) else str(src)) as container:
            for i, frame in enumerate(container.decode(video=0)):
                decoded += 1
                if i in want:
                    array = frame.to_ndarray(format="rgb24")
                    for out_pos in want[i]:
                        out[out_pos] = array
                if i >= max(want):
                    break
        n = max(n, decoded)
        if stats is not None:
            stats.update(decoded=decoded, seeks=0)
        return out, n
    with av.open(src if not isinstance(src, Path) else str(src)) as container:
        stream = container.streams.video[0]
        frames, last = None, None  # the live decode iterator and the last pts it gave
        for target in sorted(want):
            key = index.keyframes[max(0, bisect.bisect_right(index.keyframes, target) - 1)]
            if frames is None or last is None or last >= target or last < key:
                container.seek(key, stream=stream, backward=True, any_frame=False)
                frames, last, seeks = container.decode(stream), None, seeks + 1
            for frame in frames:
                decoded += 1
                if frame.pts is None:
                    continue
                last = frame.pts
                if last >= target:
                    break
            if last == target:
                array = frame.to_ndarray(format="rgb24")
                for out_pos in want[target]:
                    out[out_pos] = array
            else:  # the stream ended early or skipped this frame
                frames, last = None, None
    if stats is not None:
        stats.update(decoded=decoded, seeks=seeks)
    return out, n


def decode_all_frames(src) -> list[np.ndarray]:
    """Every frame, decoded in order (the reference `decode_frames` equals; benchmarks)."""
    import av

    with av.open(src if not isinstance(src, Path) else str(src)) as container:
        return [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]


# ---- LLaVA-Video's time instruction (orig train.py `_get_item`, add_time_instruction) ------


def frame_times(
    indices, total: int, native_fps: float | None, *, fps: float = 1.0, resampled: bool
) -> tuple[float, str]:
    """(video_time, frame_time) as orig `process_video_with_decord` writes them:
    video_time = total / native_fps; frame_time = ",".join(f"{t:.2f}s"), t = i / native_fps
    for linspace-resampled indices, else i / step with step = round(native_fps / fps)
    (orig's own formula: seconds only at fps 1)."""
    if not native_fps:
        raise ValueError("the time instruction needs the video's frame rate")
    step = max(1, round(native_fps / fps)) if fps > 0 else 1
    times = [int(i) / (native_fps if resampled else step) for i in indices]
    return total / native_fps, ",".join(f"{t:.2f}s" for t in times)


def time_instruction(video_time: float, num_frames: int, frame_time: str) -> str:
    """The exact orig text (no space before "Please")."""
    return (
        f"The video lasts for {video_time:.2f} seconds, and {num_frames} frames are uniformly "
        f"sampled from it. These frames are located at {frame_time}.Please answer the "
        "following questions related to this video."
    )


def with_time_instruction(first_turn: str, instruction: str, placeholder: str) -> str:
    """Orig: the first human turn becomes `<image>\\n{instruction}\\n{turn without <image>}`."""
    return f"{placeholder}\n{instruction}\n{first_turn.replace(placeholder, '')}"
