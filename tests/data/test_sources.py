"""Record sources: json/jsonl, yaml strategies, parquet, ArrayRecord build + read, TFDS."""

import io
import json
import math
import os

import numpy as np
import pytest
from PIL import Image

from data_pipelines import media, sources
from data_pipelines.array_record_build import build_array_record
from data_pipelines.sample import BadSample
from data_pipelines.video import training_frame_indices, write_video


def _png(color, size=(6, 5)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def _records(n, prefix="r"):
    return [
        {
            "id": f"{prefix}{i}",
            "image": f"img{i}.png",
            "conversations": [
                {"from": "human", "value": f"<image>\nq{i}"},
                {"from": "gpt", "value": f"a{i}"},
            ],
        }
        for i in range(n)
    ]


def _ids(src):
    return [src[i]["id"] for i in range(len(src))]


def test_json_and_jsonl(tmp_path):
    recs = _records(5)
    (tmp_path / "a.json").write_text(json.dumps(recs[:3]))
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps(r) for r in recs[3:]) + "\n")
    a = sources.JsonSource(tmp_path / "a.json", image_folder="/imgs")
    assert len(a) == 3 and _ids(a) == ["r0", "r1", "r2"]
    assert a[1]["image"] == "/imgs/img1.png"
    assert a[1][sources.SOURCE_KEY].endswith("a.json") and a[1][sources.INDEX_KEY] == 1
    b = sources.JsonSource(str(tmp_path / "b.jsonl"))
    assert _ids(b) == ["r3", "r4"] and b[0]["image"] == "img3.png"
    (tmp_path / "c.json").write_text(json.dumps(recs[3:]))
    both = sources.JsonSource(str(tmp_path / "{a,c}.json"))
    assert _ids(both) == [r["id"] for r in recs]
    assert both[4][sources.INDEX_KEY] == 1  # position within c.json


def test_sampling_strategies():
    n = 10
    assert sources.apply_sampling_strategy(n, "all").tolist() == list(range(10))
    assert sources.apply_sampling_strategy(n, "first:3").tolist() == [0, 1, 2]
    assert sources.apply_sampling_strategy(n, "end:2").tolist() == [8, 9]
    assert sources.apply_sampling_strategy(n, "first:25%").tolist() == [0, 1, 2]  # ceil(2.5)
    assert sources.apply_sampling_strategy(n, "end:10%").tolist() == [9]
    r = sources.apply_sampling_strategy(n, "random:4", seed=3)
    assert (
        len(set(r.tolist())) == 4
        and r.tolist() == sources.apply_sampling_strategy(n, "random:4", seed=3).tolist()
    )
    assert r.tolist() != sources.apply_sampling_strategy(n, "random:4", seed=4).tolist()
    assert len(sources.apply_sampling_strategy(n, "random:50%")) == math.ceil(5)
    with pytest.raises(ValueError):
        sources.apply_sampling_strategy(n, "middle:3")


def test_yaml_mixture(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps(_records(10, "a")))
    (tmp_path / "b.json").write_text(json.dumps(_records(4, "b")))
    (tmp_path / "mix.yaml").write_text(
        f"datasets:\n"
        f"  - json_path: {tmp_path}/a.json\n    sampling_strategy: first:30%\n"
        f"  - json_path: {tmp_path}/b.json\n    sampling_strategy: end:1\n"
        f"  - json_path: {tmp_path}/a.json\n    sampling_strategy: random:2\n"
    )
    mix = sources.load_yaml_mixture(tmp_path / "mix.yaml", image_folder="/i", seed=7)
    assert mix.weights is None
    src = sources.open_source(tmp_path / "mix.yaml", image_folder="/i", seed=7)
    ids = _ids(src)
    assert ids[:4] == ["a0", "a1", "a2", "b3"] and len(ids) == 6
    assert ids[4:] == _ids(sources.load_yaml_mixture(tmp_path / "mix.yaml", seed=7).sources[2])
    assert src[0]["image"] == "/i/img0.png"

    (tmp_path / "w.yaml").write_text(
        f"datasets:\n"
        f"  - json_path: {tmp_path}/a.json\n    weight: 3\n"
        f"  - json_path: {tmp_path}/b.json\n    weight: 1\n    image_folder: /other\n"
    )
    mix = sources.load_yaml_mixture(tmp_path / "w.yaml")
    assert mix.weights == [3.0, 1.0]
    w = mix.weighted(num_records=2000, seed=1)
    ids = _ids(w)
    frac_a = np.mean([i.startswith("a") for i in ids])
    assert 0.7 < frac_a < 0.8
    # every record of the small source is used before any repeats
    assert sorted(ids[: ids.index("b0") + 1]).count("b0") == 1
    bs = [i for i in ids if i.startswith("b")]
    assert sorted(bs[:4]) == ["b0", "b1", "b2", "b3"]
    assert w[ids.index("b0")]["image"] == "/other/img0.png"
    assert _ids(mix.weighted(num_records=50, seed=1)) == ids[:50]


def test_parquet_embedded_bytes(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    n = 7
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    conv_type = pa.list_(pa.struct([("from", pa.string()), ("value", pa.string())]))
    table = pa.table(
        {
            "id": [f"p{i}" for i in range(n)],
            "image": pa.array(
                [
                    None if i == 3 else {"bytes": _png((i, 0, 0)), "path": f"{i}.png"}
                    for i in range(n)
                ],
                image_type,
            ),
            "conversations": pa.array(
                [[{"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "a"}]] * n,
                conv_type,
            ),
            "data_source": ["x"] * n,
        }
    )
    pq.write_table(table, tmp_path / "part0.parquet", row_group_size=3)
    pq.write_table(table.slice(0, 2), tmp_path / "part1.parquet")
    src = sources.open_source(tmp_path)
    assert len(src) == n + 2
    r = src[5]
    assert r["id"] == "p5" and r["image"]["path"] == "5.png" and r["data_source"] == "x"
    assert np.asarray(media.load_image(r["image"]))[0, 0].tolist() == [5, 0, 0]
    assert "image" not in src[3]
    assert src[n + 1]["id"] == "p1" and src[n + 1][sources.INDEX_KEY] == 1
    assert src[n + 1][sources.SOURCE_KEY].endswith("part1.parquet")
    assert r["conversations"][0] == {"from": "human", "value": "<image>\nq"}

    # binary (not struct) image column
    pq.write_table(
        pa.table(
            {"id": ["b"], "image": [_png((9, 9, 9))], "conversations": table["conversations"][:1]}
        ),
        tmp_path / "bin.parquet",
    )
    rb = sources.ParquetSource(tmp_path / "bin.parquet")[0]
    assert np.asarray(media.load_image(rb["image"]))[0, 0].tolist() == [9, 9, 9]


def test_array_record_build_roundtrip(tmp_path):
    img_dir, vid_dir = tmp_path / "images", tmp_path / "videos"
    img_dir.mkdir()
    vid_dir.mkdir()
    for i in range(4):
        (img_dir / f"img{i}.png").write_bytes(_png((10 * i, 0, 0)))
    write_video(vid_dir / "v.mp4", np.zeros((3, 16, 16, 3), np.uint8), fps=2)
    (vid_dir / "frames").mkdir()
    for k in range(3):
        (vid_dir / "frames" / f"{k:03d}.png").write_bytes(_png((k, k, k)))
    recs = _records(4)
    recs[2]["image"] = ["img2.png", "img3.png"]
    recs.append({"id": "v", "video": "v.mp4", "conversations": recs[0]["conversations"]})
    recs.append({"id": "f", "video": "frames", "conversations": recs[0]["conversations"]})
    recs.append({"id": "t", "conversations": [{"from": "human", "value": "hi"}]})
    recs.append({"id": "m", "image": "nope.png", "conversations": recs[0]["conversations"]})
    (tmp_path / "d.json").write_text(json.dumps(recs))
    src = sources.JsonSource(
        tmp_path / "d.json", image_folder=str(img_dir), video_folder=str(vid_dir)
    )
    report = build_array_record(src, tmp_path / "ar", name="d", num_shards=3)
    assert report.num_records == len(recs) and len(report.files) == 3 and report.missing_media == 1
    assert len(sources.open_source(report.files[0].replace("-00000-of-00003", "*"))) == len(recs)
    back = sources.ArrayRecordSource(tmp_path / "ar")
    assert len(back) == len(recs)
    for i in range(len(recs)):
        orig, got = src[i], back[i]
        assert got["id"] == orig["id"] and got["conversations"] == orig["conversations"]
        assert got[sources.SOURCE_KEY] == orig[sources.SOURCE_KEY]
        assert got[sources.INDEX_KEY] == i
    assert back[0]["image"]["bytes"] == (img_dir / "img0.png").read_bytes()
    assert [x["path"] for x in back[2]["image"]] == [
        str(img_dir / "img2.png"),
        str(img_dir / "img3.png"),
    ]
    assert back[4]["video"]["bytes"] == (vid_dir / "v.mp4").read_bytes()
    assert len(back[5]["video"]["frames"]) == 3
    assert back[7]["image"] == str(img_dir / "nope.png")
    # media decode identically from the embedded bytes
    for i in (0, 2):
        a, b = src[i]["image"], back[i]["image"]
        a, b = (a, b) if isinstance(a, list) else ([a], [b])
        for x, y in zip(a, b, strict=True):
            np.testing.assert_array_equal(
                np.asarray(media.load_image(x)), np.asarray(media.load_image(y))
            )
    np.testing.assert_array_equal(
        media.load_video(src[4]["video"]), media.load_video(back[4]["video"])
    )
    np.testing.assert_array_equal(
        media.load_video(src[5]["video"]), media.load_video(back[5]["video"])
    )


def test_tfds_data_source_without_tensorflow(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")

    class TinyLlava(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(
                builder=self,
                features=tfds.features.FeaturesDict(
                    {
                        "id": tfds.features.Text(),
                        "conversations": tfds.features.Text(),
                        "image": tfds.features.Tensor(shape=(), dtype=np.object_),
                    }
                ),
            )

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            for i in range(4):
                conv = [{"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": f"a{i}"}]
                yield (
                    i,
                    {"id": f"t{i}", "conversations": json.dumps(conv), "image": _png((i, 1, 2))},
                )

    TinyLlava(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
    src = sources.TfdsSource("tiny_llava", split="train", data_dir=str(tmp_path))
    assert len(src) == 4
    got = sorted((src[i] for i in range(4)), key=lambda r: r["id"])
    for i, r in enumerate(got):
        assert r["id"] == f"t{i}" and r["conversations"][1]["value"] == f"a{i}"
        assert np.asarray(media.load_image(r["image"]))[0, 0].tolist() == [i, 1, 2]


# ---- media -------------------------------------------------------------------------------


def test_frame_sampling_rule():
    # 1 fps of a 30 fps clip: every 30th frame; capped by linspace when over the bound
    assert training_frame_indices(95, 30.0).tolist() == [0, 30, 60, 90]
    assert training_frame_indices(95, 29.97).tolist() == [0, 30, 60, 90]
    idx = training_frame_indices(3000, 30.0, frames_upbound=32)
    assert idx.tolist() == np.linspace(0, 2999, 32, dtype=int).tolist()
    assert training_frame_indices(10, 4.0, force_sample=True, frames_upbound=4).tolist() == [
        0,
        3,
        6,
        9,
    ]
    assert training_frame_indices(5, 0.2).tolist() == [0, 1, 2, 3, 4]  # slower than 1 fps
    assert training_frame_indices(40, None, frames_upbound=0).tolist() == list(range(40))


def test_video_formats_and_folder(tmp_path):
    frames = np.stack([np.full((16, 24, 3), 20 * k, np.uint8) for k in range(10)])
    write_video(tmp_path / "v.mp4", frames, fps=4)  # 2.5 s at 4 fps -> step 4 -> frames 0, 4, 8
    v = media.load_video(str(tmp_path / "v.mp4"))
    assert v.shape == (3, 16, 24, 3)
    np.testing.assert_allclose(v[:, 8, 12, 0], [0, 80, 160], atol=12)
    opts = media.VideoOptions(fps=2.0, frames_upbound=3)  # step 2 -> 5 frames -> linspace 3
    v = media.load_video((tmp_path / "v.mp4").read_bytes(), opts)
    np.testing.assert_allclose(v[:, 8, 12, 0], [0, 80, 180], atol=12)  # frames 0, 4, 9

    import av

    with av.open(str(tmp_path / "v.gif"), mode="w") as c:
        s = c.add_stream("gif", rate=4)
        s.height, s.width, s.pix_fmt = 16, 24, "rgb8"
        for f in frames:
            c.mux(s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
        c.mux(s.encode())
    assert media.load_video(str(tmp_path / "v.gif")).shape == (3, 16, 24, 3)

    folder = tmp_path / "frames"
    folder.mkdir()
    for k in range(5):
        Image.fromarray(frames[k]).save(folder / f"{k:02d}.png")
    (folder / "notes.txt").write_text("ignored")
    v = media.load_video(str(folder), media.VideoOptions(frames_upbound=3))
    assert v[:, 0, 0, 0].tolist() == [0, 40, 80]  # linspace(0, 4, 3) = 0, 2, 4


def test_media_errors(tmp_path):
    with pytest.raises(BadSample) as e:
        media.load_image(str(tmp_path / "missing.png"))
    assert e.value.reason == "missing_image" and "missing.png" in str(e.value)
    (tmp_path / "bad.jpg").write_bytes(b"not an image at all")
    with pytest.raises(BadSample) as e:
        media.load_image(str(tmp_path / "bad.jpg"))
    assert e.value.reason == "corrupt_image" and "bad.jpg" in str(e.value)
    with pytest.raises(BadSample) as e:
        media.load_image(12)
    assert e.value.reason == "malformed_record"
    (tmp_path / "bad.mp4").write_bytes(b"\x00" * 100)
    with pytest.raises(BadSample) as e:
        media.load_video(str(tmp_path / "bad.mp4"))
    assert e.value.reason == "corrupt_video" and "bad.mp4" in str(e.value)
    with pytest.raises(BadSample) as e:
        media.load_video(str(tmp_path / "none.mp4"))
    assert e.value.reason == "missing_video"
    os.mkdir(tmp_path / "empty")
    with pytest.raises(BadSample) as e:
        media.load_video(str(tmp_path / "empty"))
    assert e.value.reason == "empty_video"


def test_data_build_command_round_trips(tmp_path):
    """`lov-jax data build` writes shards whose records read back with media embedded."""
    from data_pipelines.sources import ArrayRecordSource
    from lov_jax import cli

    (tmp_path / "img").mkdir()
    Image.new("RGB", (40, 30), (200, 10, 10)).save(tmp_path / "img" / "a.png")
    turns = [{"from": "human", "value": "<image>\nColour?"}, {"from": "gpt", "value": "red"}]
    recs = [{"id": "r0", "image": "a.png", "conversations": turns}]
    (tmp_path / "d.json").write_text(json.dumps(recs))
    out = tmp_path / "shards"
    argv = ["data", "build", str(tmp_path / "d.json"), "--out", str(out),
            "--image-folder", str(tmp_path / "img")]  # fmt: skip
    assert cli.main(argv) == 0
    back = ArrayRecordSource(sorted(str(p) for p in out.iterdir()))
    assert len(back) == 1 and back[0]["id"] == "r0"
    assert back[0]["image"]["bytes"] == (tmp_path / "img" / "a.png").read_bytes()
