"""Media decoding for records: images (path / bytes / {bytes, path}) and videos.

Every failure is a `BadSample` whose message names the file and the record, so the
caller's bad-input policy (loader `on_error`) can drop or raise. Reasons:
  missing_image, corrupt_image, missing_video, corrupt_video, empty_video, malformed_record.

Media references as they appear in records (after `sources` resolved relative paths):
  image: str | Path (file), bytes, {"bytes": bytes | None, "path": str | None}
         (the parquet / ArrayRecord layout), PIL.Image, uint8[H, W, C].
  video: str | Path (an mp4/webm/gif/... file or a folder of frame images), bytes,
         {"bytes": ..., "path": ...}, {"frames": [image refs], "path": ...}
         (a frame folder embedded by `array_record_build`), or a list of image refs.
"""

from __future__ import annotations

import dataclasses
import io
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from data_pipelines import video as video_lib
from data_pipelines.image_processing import to_rgb
from data_pipelines.sample import BadSample

FRAME_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


@dataclasses.dataclass(frozen=True)
class VideoOptions:
    """Frame sampling (docs/reference.md 5.1, orig training defaults).

    fps:             target sampling rate; every round(native_fps / fps)-th frame.
    frames_upbound:  cap; above it (or with `force_sample`) frames are
                     linspace(0, total-1, frames_upbound). <= 0 disables the cap.
    frame_folder_fps: assumed rate of a folder of frames; None keeps every frame
                     before the cap (a folder carries no timing).
    add_time_instruction: prepend LLaVA-Video's time instruction to the turn holding the
                     video placeholder (data_pipelines/video.py `time_instruction`).
    """

    fps: float = 1.0
    frames_upbound: int = 32
    force_sample: bool = False
    frame_folder_fps: float | None = None
    add_time_instruction: bool = False


@dataclasses.dataclass(frozen=True)
class VideoSample:
    """Sampled frames uint8[F, H, W, 3], their indices in the video, its frame count and
    average rate (None: unknown), and whether the indices came from linspace (the cap)."""

    frames: np.ndarray
    indices: np.ndarray
    total: int
    native_fps: float | None
    resampled: bool

    def time_instruction(self, fps: float, name: str = "") -> str:
        """LLaVA-Video's instruction text for this sample (orig `_get_item`)."""
        if not self.native_fps:
            raise BadSample(
                "malformed_record",
                f"video {name}: the time instruction needs a frame rate (a frame folder: "
                "set VideoOptions.frame_folder_fps)",
            )
        video_time, frame_time = video_lib.frame_times(
            self.indices, self.total, self.native_fps, fps=fps, resampled=self.resampled
        )
        return video_lib.time_instruction(video_time, len(self.indices), frame_time)


def _where(record_id: str) -> str:
    return f" (record {record_id!r})" if record_id else ""


def media_name(ref: Any) -> str:
    """A short human name for a media reference (for error messages and stats)."""
    if isinstance(ref, (str, Path)):
        return str(ref)
    if isinstance(ref, dict):
        return str(ref.get("path") or "<embedded bytes>")
    if isinstance(ref, (bytes, bytearray, memoryview)):
        return "<embedded bytes>"
    return f"<{type(ref).__name__}>"


# ---- images ----------------------------------------------------------------------------


def load_image(ref: Any, record_id: str = "") -> Image.Image:
    """Decode one image reference to an RGB PIL image (fully loaded).

    An image that decodes but cannot become RGB as HF does (zero size, 16-bit or float
    samples, an array that is not uint8[H, W(, 1|3|4)]) is `corrupt_image` /
    `malformed_record` with the reason `image_processing.to_rgb` gives."""
    if isinstance(ref, (Image.Image, np.ndarray)):
        reason = "corrupt_image" if isinstance(ref, Image.Image) else "malformed_record"
        try:
            return to_rgb(ref)
        except ValueError as err:
            raise BadSample(reason, f"{media_name(ref)}{_where(record_id)}: {err}") from err
    name = media_name(ref)
    if isinstance(ref, dict):
        if ref.get("bytes") is not None:
            ref = ref["bytes"]
        elif ref.get("path"):
            ref = ref["path"]
        else:
            raise BadSample(
                "missing_image", f"image entry has neither bytes nor path{_where(record_id)}"
            )
    if isinstance(ref, (bytes, bytearray, memoryview)):
        fileobj = io.BytesIO(bytes(ref))
    elif isinstance(ref, (str, Path)):
        if not os.path.isfile(ref):
            raise BadSample("missing_image", f"image file {name} not found{_where(record_id)}")
        fileobj = ref
    else:
        raise BadSample(
            "malformed_record", f"image field of type {type(ref).__name__}{_where(record_id)}"
        )
    try:
        with Image.open(fileobj) as image:
            image.load()
            return to_rgb(image)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise BadSample(
            "corrupt_image", f"cannot decode image {name}{_where(record_id)}: {err}"
        ) from err


# ---- videos ----------------------------------------------------------------------------


def _frame_refs(ref: Any) -> tuple[list[Any], str] | None:
    """The frame list of a frame-folder video reference, else None."""
    if isinstance(ref, (str, Path)) and os.path.isdir(ref):
        files = sorted(f for f in os.listdir(ref) if f.lower().endswith(FRAME_EXTENSIONS))
        return [os.path.join(ref, f) for f in files], str(ref)
    if isinstance(ref, dict) and ref.get("frames") is not None:
        return list(ref["frames"]), media_name(ref)
    if isinstance(ref, (list, tuple)):
        return list(ref), "<frame list>"
    return None


def load_video(ref: Any, options: VideoOptions = VideoOptions(), record_id: str = "") -> np.ndarray:
    """Decode and sample a video reference -> uint8[F, H, W, 3] RGB, F >= 1."""
    return load_video_sample(ref, options, record_id).frames


def load_video_sample(
    ref: Any, options: VideoOptions = VideoOptions(), record_id: str = ""
) -> VideoSample:
    """`load_video` with the sampling's indices and timing (`VideoSample`)."""
    frames = _frame_refs(ref)
    if frames is not None:
        refs, name = frames
        if not refs:
            raise BadSample("empty_video", f"video {name} has no frames{_where(record_id)}")
        idx, resampled = video_lib.training_sample(
            len(refs),
            options.frame_folder_fps,
            fps=options.fps,
            frames_upbound=options.frames_upbound,
            force_sample=options.force_sample,
        )
        try:
            images = [np.asarray(load_image(refs[i], record_id)) for i in idx]
        except BadSample as err:
            raise BadSample("corrupt_video", f"video {name}: {err}") from err
        if len({im.shape for im in images}) > 1:
            raise BadSample(
                "corrupt_video", f"video {name}: frames differ in size{_where(record_id)}"
            )
        return VideoSample(np.stack(images), idx, len(refs), options.frame_folder_fps, resampled)

    name = media_name(ref)
    if isinstance(ref, dict):
        ref = ref.get("bytes") if ref.get("bytes") is not None else ref.get("path")
    if isinstance(ref, (bytes, bytearray, memoryview)):
        data = bytes(ref)

        def opener():
            return io.BytesIO(data)
    elif isinstance(ref, (str, Path)):
        if not os.path.exists(ref):
            raise BadSample("missing_video", f"video file {name} not found{_where(record_id)}")

        def opener():
            return str(ref)
    else:
        raise BadSample(
            "malformed_record", f"video field of type {type(ref).__name__}{_where(record_id)}"
        )
    return _decode_sampled(opener, options, name, record_id)


def _decode_sampled(opener, options: VideoOptions, name: str, record_id: str) -> VideoSample:
    import av

    try:
        total, native_fps = video_lib.probe_video(opener())
        if total <= 0:
            raise BadSample("empty_video", f"video {name} has zero frames{_where(record_id)}")
        for _ in range(2):
            idx, resampled = video_lib.training_sample(
                total,
                native_fps,
                fps=options.fps,
                frames_upbound=options.frames_upbound,
                force_sample=options.force_sample,
            )
            frames, decoded = video_lib.decode_frames(opener(), idx)
            if all(f is not None for f in frames):
                return VideoSample(np.stack(frames), idx, total, native_fps, resampled)
            # The header overstated the frame count: resample over what really decodes.
            total = decoded
            if total <= 0:
                break
    except (av.error.FFmpegError, IndexError, ValueError, OSError) as err:
        raise BadSample(
            "corrupt_video", f"cannot decode video {name}{_where(record_id)}: {err}"
        ) from err
    raise BadSample("empty_video", f"video {name} decoded to zero frames{_where(record_id)}")


def read_bytes(path: str | Path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def embed_media(ref: Any) -> Any:
    """Replace file references by their bytes ({bytes, path}; a frame folder becomes
    {frames: [{bytes, path}, ...], path}); other references are returned unchanged.

    Missing files are left as paths, so loading reports them as it would have.
    """
    if isinstance(ref, (str, Path)):
        if os.path.isdir(ref):
            refs, name = _frame_refs(ref)
            return {"frames": [embed_media(r) for r in refs], "path": name}
        if os.path.isfile(ref):
            return {"bytes": read_bytes(ref), "path": str(ref)}
    if isinstance(ref, Sequence) and not isinstance(ref, (str, bytes, bytearray)):
        return [embed_media(r) for r in ref]
    return ref
