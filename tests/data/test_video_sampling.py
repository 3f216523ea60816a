"""Video frame sampling and decoding (data_pipelines/video.py; ../shared/
REFERENCE_VIDEO_POST.md 2.5-2.6): seeking decode equals decoding every frame (several GOP
sizes, a variable frame rate, repeats, any order) while decoding fewer frames; LLaVA-Video's
frames_upbound / force_sample / time instruction text; lmms-eval's uniform max_frames_num;
bad files (missing, not a video, truncated, no frames) give one error naming the file.
Every mp4 is made here."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest

from data_pipelines import media
from data_pipelines import video as V
from data_pipelines.sample import BadSample


def _frames(n: int, h: int = 30, w: int = 46, seed: int = 0) -> np.ndarray:
    """Noise plus a moving bar, so neighbouring frames differ."""
    rng = np.random.default_rng(seed)
    out = rng.integers(0, 256, (n, h, w, 3), dtype=np.uint8)
    for i in range(n):
        out[i, :, (3 * i) % w] = 255
    return out


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    d = tmp_path_factory.mktemp("clips")
    out = {}
    for name, n, fps, gop in (("gop5", 61, 10, 5), ("gop16", 70, 25, 16), ("onegop", 23, 4, None)):
        V.write_video(d / f"{name}.mp4", _frames(n, seed=n), fps=fps, gop=gop)
        out[name] = (d / f"{name}.mp4", n, fps)
    out["vfr"] = (_write_vfr(d / "vfr.mp4"), 30, None)
    out["raw_h264"] = (_write_raw(d / "raw.h264"), 20, None)
    return out


def _write_raw(path):
    """A raw h264 stream: packets without timestamps (decoded in order, no seeking)."""
    import av

    frames = _frames(20, seed=3)
    with av.open(str(path), mode="w", format="h264") as container:
        stream = container.add_stream("libx264", rate=10)
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = "yuv420p"
        for f in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
        container.mux(stream.encode())
    return path


def _write_vfr(path):
    """30 frames whose gaps alternate 40 / 120 ms (a variable frame rate)."""
    import av

    frames = _frames(30, seed=7)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264" if "libx264" in av.codecs_available else "mpeg4")
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = "yuv420p"
        stream.time_base = stream.codec_context.time_base = Fraction(1, 1000)
        stream.codec_context.gop_size = 6
        t = 0
        for i, f in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(f, format="rgb24")
            frame.pts, frame.time_base = t, Fraction(1, 1000)
            t += 40 if i % 2 else 120
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return path


@pytest.mark.parametrize("name", ["gop5", "gop16", "onegop", "vfr", "raw_h264"])
def test_seeking_decode_equals_decoding_every_frame(clips, name):
    path, n, _ = clips[name]
    every = V.decode_all_frames(path)
    index = V.frame_index(path)
    assert len(every) == len(index.pts) == n
    rng = np.random.default_rng(n)
    for want in ([n - 1, 0, 3, 3, n // 2, n - 1], rng.integers(0, n, 9), np.arange(n),
                 V.lmms_eval_frame_indices(n, 8)):  # fmt: skip
        stats = {}
        got, total = V.decode_frames(path, want, stats=stats)
        assert total == n
        for g, i in zip(got, want, strict=True):
            np.testing.assert_array_equal(g, every[i])
    # only the needed GOPs: 2 late frames of a many-GOP clip decode a fraction of it
    if name in ("gop5", "gop16"):
        stats = {}
        V.decode_frames(path, [n - 2, n - 1], stats=stats)
        assert stats["decoded"] <= 20 < n and stats["seeks"] == 1


def test_past_the_end_indices_are_none_and_bytes_decode_alike(clips):
    import io

    path, n, _ = clips["gop5"]
    got, total = V.decode_frames(path, [n, 2, n + 5])
    assert total == n and got[0] is None and got[2] is None and got[1] is not None
    from_bytes, _ = V.decode_frames(io.BytesIO(path.read_bytes()), [2, 40])
    np.testing.assert_array_equal(from_bytes[0], got[1])
    np.testing.assert_array_equal(from_bytes[1], V.decode_all_frames(path)[40])


def test_read_video_samples_as_lmms_eval(clips):
    """generate / eval / serve read lmms-eval's frames: uniform, and a clip shorter than
    asked repeats frames (always num_frames, so the token count is the model's)."""
    for name, frames in (("gop16", 6), ("onegop", 64)):
        path, n, _ = clips[name]
        every = V.decode_all_frames(path)
        got = V.read_video(path, frames)
        want = np.linspace(0, n - 1, frames, dtype=int)
        np.testing.assert_array_equal(got, np.stack([every[i] for i in want]))
    assert clips["onegop"][1] == 23 < 64  # the short clip: frames repeat


def test_lmms_eval_uniform_max_frames_num():
    """lmms-eval's llava_onevision load_video: linspace(0, total-1, max_frames_num, int),
    first and last frame included, repeats when the clip is shorter."""
    np.testing.assert_array_equal(V.lmms_eval_frame_indices(300, 4), [0, 99, 199, 299])
    short = V.lmms_eval_frame_indices(5, 8)
    assert short.tolist() == [0, 0, 1, 1, 2, 2, 3, 4]
    assert len(V.lmms_eval_frame_indices(7001, 64)) == 64
    with pytest.raises(ValueError, match="no frames"):
        V.lmms_eval_frame_indices(0, 8)


def test_llava_video_sampling_and_time_instruction_text():
    """Reference 2.5 / 2.6 by hand: a 95-frame 10 fps clip."""
    # 1 fps: step 10 -> 10 frames, under the cap: times are i / step
    idx = V.training_frame_indices(95, 10.0, frames_upbound=64)
    assert idx.tolist() == list(range(0, 95, 10))
    vt, ft = V.frame_times(idx, 95, 10.0, resampled=False)
    assert vt == 9.5 and ft == ",".join(f"{i}.00s" for i in range(10))
    # force_sample: exactly frames_upbound frames by linspace, times i / native fps
    idx = V.training_frame_indices(95, 10.0, frames_upbound=4, force_sample=True)
    assert idx.tolist() == [0, 31, 62, 94]
    vt, ft = V.frame_times(idx, 95, 10.0, resampled=True)
    assert ft == "0.00s,3.10s,6.20s,9.40s"
    text = V.time_instruction(vt, len(idx), ft)
    assert text == (
        "The video lasts for 9.50 seconds, and 4 frames are uniformly sampled from it. "
        "These frames are located at 0.00s,3.10s,6.20s,9.40s.Please answer the following "
        "questions related to this video."
    )
    # orig: `<image>\n{instruction}\n{value.replace('<image>', '')}`
    assert V.with_time_instruction("<image>\nWhat moves?", "T.", "<image>") == (
        "<image>\nT.\n\nWhat moves?"
    )
    # a short clip with force_sample repeats frames (orig's linspace int cast)
    assert V.training_frame_indices(3, 10.0, frames_upbound=5, force_sample=True).tolist() == [
        0, 0, 1, 1, 2,
    ]  # fmt: skip
    with pytest.raises(ValueError, match="frame rate"):
        V.frame_times([0], 3, None, resampled=True)


def _bad_files(tmp_path, clips):
    good = clips["gop5"][0].read_bytes()
    out = {"not_a_video": tmp_path / "notes.mp4", "truncated": tmp_path / "cut.mp4",
           "no_frames": tmp_path / "empty.mp4", "missing": tmp_path / "nowhere.mp4"}  # fmt: skip
    out["not_a_video"].write_text("this is not a video\n" * 20)
    out["truncated"].write_bytes(good[: len(good) // 3])
    _write_audio_only(out["no_frames"])
    return out


def _write_audio_only(path):
    """An mp4 with a sound track and no video stream: zero frames."""
    import av

    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("aac", rate=8000)
        for i in range(4):
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp",
                                               layout="mono")  # fmt: skip
            frame.sample_rate, frame.pts = 8000, i * 1024
            container.mux(stream.encode(frame))
        container.mux(stream.encode())


def test_bad_files_give_one_error_naming_the_file(tmp_path, clips):
    for kind, path in _bad_files(tmp_path, clips).items():
        err_type = FileNotFoundError if kind == "missing" else ValueError
        with pytest.raises(err_type, match=str(path.name)):
            V.read_video(path, 8)
        with pytest.raises(BadSample, match=str(path.name)) as err:
            media.load_video(str(path), media.VideoOptions(frames_upbound=8), record_id="r7")
        want = {"missing": "missing_video", "no_frames": "empty_video"}.get(kind)
        assert err.value.reason in ((want,) if want else ("corrupt_video", "empty_video"))
        assert "r7" in str(err.value)
