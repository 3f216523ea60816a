"""Frame decoding figures: seeking decode (data_pipelines.video.decode_frames: seek to the
keyframe before each sampled frame, decode forward to it) vs decoding every frame and
keeping the samples, on a long generated mp4.

    .venv/bin/python benchmarks/video_decode.py [--minutes 3] [--fps 30] [--size 96x128]
        [--gop 60] [--frames 8,32,64] [--repeats 3]

The clip is written once (cached under --workdir): --minutes of --size frames at --fps,
h264 (or mpeg4) with a keyframe every --gop frames, moving noise so frames differ. For each
sample count F, indices are lmms-eval's linspace(0, total-1, F) (LLaVA-Video's
frames_upbound sampling is the same at these lengths). Printed per F: wall seconds (best of
--repeats), sampled frames/s, frames the codec decoded, and the speed-up. The baseline
decodes every frame in order and converts only the samples to RGB. Both return the arrays
of a decode-everything pass (checked).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np

from data_pipelines import video


def _clip(path: Path, minutes: float, fps: int, hw: tuple[int, int], gop: int) -> Path:
    if path.exists():
        return path
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (hw[0], hw[1] * 2, 3), dtype=np.uint8)
    n = int(minutes * 60 * fps)

    def frames():
        for i in range(n):
            off = (3 * i) % hw[1]
            yield np.ascontiguousarray(base[:, off : off + hw[1]])

    tmp = path.with_suffix(".tmp.mp4")
    video.write_video(tmp, frames(), fps=fps, gop=gop)
    os.replace(tmp, path)
    return path


def _sequential(path: Path, idx) -> list[np.ndarray]:
    """The baseline: decode every frame in order, convert only the sampled ones."""
    import av

    want = {int(i) for i in idx}
    kept = {}
    with av.open(str(path)) as container:
        for i, frame in enumerate(container.decode(video=0)):
            if i in want:
                kept[i] = frame.to_ndarray(format="rgb24")
    return [kept[int(i)] for i in idx]


def _best(fn, repeats: int):
    best, out = float("inf"), None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, default=3.0)
    p.add_argument("--fps", type=int, default=30)
    p.add_argument("--size", default="96x128", help="HxW of each frame")
    p.add_argument("--gop", type=int, default=60)
    p.add_argument("--frames", default="8,32,64")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--workdir", default="/tmp/lov_jax_video_bench")
    a = p.parse_args()
    hw = tuple(int(x) for x in a.size.split("x"))
    Path(a.workdir).mkdir(parents=True, exist_ok=True)
    name = f"clip_{a.minutes}m_{a.fps}fps_{hw[0]}x{hw[1]}_g{a.gop}.mp4"
    path = _clip(Path(a.workdir) / name, a.minutes, a.fps, hw, a.gop)
    index = video.frame_index(path)
    total = len(index.pts)
    print(f"clip {path}: {total} frames ({total / a.fps:.0f} s at {a.fps} fps), {hw[0]}x{hw[1]},"
          f" keyframe every {a.gop} ({len(index.keyframes)} keyframes), "
          f"{path.stat().st_size / 1e6:.1f} MB; best of {a.repeats}")  # fmt: skip
    every = video.decode_all_frames(path)  # the reference arrays
    header = f"{'F':>4} | {'seek s':>7} {'frames/s':>9} {'decoded':>8} | {'full s':>7} "
    print(header + f"{'frames/s':>9} {'decoded':>8} | speed-up")
    for f in (int(x) for x in a.frames.split(",")):
        idx = video.lmms_eval_frame_indices(total, f)
        stats: dict = {}

        def seek(idx=idx, stats=stats):
            return video.decode_frames(path, idx, index, stats=stats)[0]

        t_seek, got = _best(seek, a.repeats)
        t_all, full = _best(lambda idx=idx: _sequential(path, idx), a.repeats)
        for g, h, i in zip(got, full, idx, strict=True):
            assert np.array_equal(g, every[i]) and np.array_equal(h, every[i])
        print(f"{f:>4} | {t_seek:>7.3f} {f / t_seek:>9.1f} {stats['decoded']:>8} | "
              f"{t_all:>7.2f} {f / t_all:>9.1f} {total:>8} | {t_all / t_seek:>6.1f}x")  # fmt: skip


if __name__ == "__main__":
    main()
