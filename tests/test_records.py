"""Record -> Sample: kinds, token counts, video frames, bad-input policy."""

import json

import av
import numpy as np
import pytest
from PIL import Image

from data_pipelines import chat, media, sources
from data_pipelines.array_record_build import build_array_record
from data_pipelines.records import BadRecordError, RecordOptions, SkipCounter, process_record
from data_pipelines.tokenizer import build_qwen2_tokenizer
from data_pipelines.video import write_video
from lov_jax import config, visual_layout

IMG, VID, PAD = 151646, 151647, 151643


def _conv(question="<image>\nWhat is this?", answer="A cat."):
    return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]


@pytest.fixture(scope="module")
def tok():
    return build_qwen2_tokenizer()


@pytest.fixture(scope="module")
def cfg():
    return config.tiny()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A json with every kind of record (and broken ones), media made on the fly."""
    root = tmp_path_factory.mktemp("data")
    img, vid = root / "images", root / "videos"
    img.mkdir()
    vid.mkdir()
    rng = np.random.default_rng(0)
    for name, (h, w) in {"a.png": (30, 50), "b.jpg": (40, 20), "c.png": (17, 17)}.items():
        Image.fromarray(rng.integers(0, 255, (h, w, 3), np.uint8)).save(img / name)
    (img / "corrupt.jpg").write_bytes(b"\xff\xd8 definitely not a jpeg")
    write_video(vid / "clip.mp4", rng.integers(0, 255, (10, 32, 48, 3), np.uint8), fps=4)
    (vid / "corrupt.mp4").write_bytes(b"\x00" * 64)
    with av.open(str(vid / "zero.mp4"), mode="w") as c:  # a container with no frames
        s = c.add_stream("mpeg4", rate=4)
        s.height, s.width, s.pix_fmt = 16, 16, "yuv420p"
        c.start_encoding()
    (vid / "frames").mkdir()
    for k in range(4):
        Image.fromarray(np.full((12, 12, 3), k, np.uint8)).save(vid / "frames" / f"{k}.png")
    (vid / "empty").mkdir()
    recs = {
        "single": {"image": "a.png", "conversations": _conv()},
        "single_list": {"image": ["b.jpg"], "conversations": _conv("Describe <image>")},
        "multi": {
            "image": ["a.png", "b.jpg", "c.png"],
            "conversations": _conv("<image>\n<image>\nCompare to <image>."),
        },
        "text": {"conversations": _conv("Hello?", "Hi.")},
        "video": {"video": "clip.mp4", "conversations": _conv("<image>\nWhat happens?")},
        "frames": {"video": "frames", "conversations": _conv("<image>\nWhat happens?")},
        "missing": {"image": "nope.png", "conversations": _conv()},
        "corrupt": {"image": "corrupt.jpg", "conversations": _conv()},
        "bad_video": {"video": "corrupt.mp4", "conversations": _conv()},
        "zero_video": {"video": "zero.mp4", "conversations": _conv()},
        "empty_frames": {"video": "empty", "conversations": _conv()},
        "mismatch": {"image": ["a.png", "b.jpg"], "conversations": _conv()},
        "no_placeholder": {"image": "a.png", "conversations": _conv("What is this?")},
        "stray_placeholder": {"conversations": _conv()},
        "bad_type": {"image": 5, "conversations": _conv()},
        "bad_conv": {"image": "a.png", "conversations": "<image>\nhi"},
    }
    path = root / "data.json"
    path.write_text(json.dumps([{"id": k, **v} for k, v in recs.items()]))
    src = sources.JsonSource(path, image_folder=str(img), video_folder=str(vid))
    return {src[i]["id"]: src[i] for i in range(len(src))}, src


def _text_len(record, tok):
    opts = chat.ChatOptions()
    turns = chat.normalize_turns(record["conversations"])
    turns = [(r, chat.move_image_to_front(t)) for r, t in turns]
    return len(chat.tokenize_conversation(turns, tok, opts)[0])


def _check_sample(s, cfg):
    visual = np.isin(s.tokens, (IMG, VID))
    assert s.targets.tolist() == s.tokens[1:].tolist() + [PAD]
    assert not (s.loss_mask.astype(bool) & np.isin(s.targets, (IMG, VID))).any()
    assert s.loss_mask[-1] == 0
    assert int(visual.sum()) == sum(visual_layout.num_tokens(i, cfg) for i in s.items)
    assert len(s.crops) == sum(visual_layout.num_crops(i, cfg) for i in s.items)
    assert s.crops.dtype == np.uint8 and s.crops.shape[1:] == (384, 384, 3)


def test_kinds_and_token_counts(data, tok, cfg):
    recs, _ = data
    s = process_record(recs["single"], cfg, tok)
    _check_sample(s, cfg)
    assert [i.kind for i in s.items] == ["anyres"] and s.items[0].image_size == (30, 50)
    n_vis = visual_layout.num_tokens(s.items[0], cfg)
    assert s.num_tokens == n_vis + _text_len(recs["single"], tok) - 1
    assert s.id == "single" and s.source.endswith("data.json")
    # the visual run sits where <image> was: system(11) + "<|im_start|>user\n"(3)
    assert s.tokens[14 : 14 + n_vis].tolist() == [IMG] * n_vis and s.tokens[14 + n_vis] == 198

    s = process_record(recs["single_list"], cfg, tok)  # "Describe <image>" moved to front
    assert [i.kind for i in s.items] == ["anyres"] and s.items[0].image_size == (40, 20)
    assert s.tokens[13] == 198 and s.tokens[14] == IMG

    s = process_record(recs["multi"], cfg, tok)
    _check_sample(s, cfg)
    assert [i.kind for i in s.items] == ["pad"] * 3 and len(s.crops) == 3
    assert int((s.tokens == IMG).sum()) == 3 * 730
    assert s.num_tokens == 3 * 730 + _text_len(recs["multi"], tok) - 3

    s = process_record(recs["text"], cfg, tok)
    _check_sample(s, cfg)
    assert s.items == [] and s.crops.shape == (0, 384, 384, 3)
    assert s.num_tokens == _text_len(recs["text"], tok)


def test_plain_template_square(data, tok, cfg):
    recs, _ = data
    opts = RecordOptions(chat=chat.ChatOptions(template="plain"))
    s = process_record(recs["single"], cfg, tok, opts)
    assert [i.kind for i in s.items] == ["square"] and len(s.crops) == 1
    assert s.tokens[:729].tolist() == [IMG] * 729
    assert s.tokens[729:].tolist() == [32, 8251, 624]  # "A cat.\n"
    assert s.loss_mask.tolist() == [0] * 728 + [1, 1, 1, 0]


def test_llava_next_mask_after_expansion(data, tok, cfg):
    recs, _ = data
    opts = RecordOptions(chat=chat.ChatOptions(loss_mask="llava_next"))
    s = process_record(recs["single"], cfg, tok, opts)
    n_vis = visual_layout.num_tokens(s.items[0], cfg)
    # only the last visual position is trained (it predicts the "\n" after <image>)
    assert s.loss_mask[14 : 14 + n_vis].tolist() == [0] * (n_vis - 1) + [1]
    assert s.loss_mask[13] == 0  # the "\n" before the run predicts an image token


def test_video_frames(data, tok, cfg):
    recs, _ = data
    # 10 frames at 4 fps: 1 fps -> every 4th frame -> 0, 4, 8 -> F = 3
    s = process_record(recs["video"], cfg, tok)
    _check_sample(s, cfg)
    assert [(i.kind, i.num_frames) for i in s.items] == [("video", 3)]
    assert int((s.tokens == VID).sum()) == 196 * 3 + 1 and not (s.tokens == IMG).any()
    assert len(s.crops) == 3
    opts = RecordOptions(video=media.VideoOptions(frames_upbound=2))
    s = process_record(recs["video"], cfg, tok, opts)
    assert s.items[0].num_frames == 2 and int((s.tokens == VID).sum()) == 196 * 2 + 1
    s = process_record(recs["frames"], cfg, tok)  # a folder keeps every frame up to the cap
    assert s.items[0].num_frames == 4 and int((s.tokens == VID).sum()) == 196 * 4 + 1
    assert s.crops[:, 0, 0, 0].tolist() == [0, 1, 2, 3]


BAD = {
    "missing": "missing_image",
    "corrupt": "corrupt_image",
    "bad_video": "corrupt_video",
    "zero_video": "empty_video",
    "empty_frames": "empty_video",
    "mismatch": "placeholder_mismatch",
    "no_placeholder": "placeholder_mismatch",
    "stray_placeholder": "placeholder_mismatch",
    "bad_type": "malformed_record",
    "bad_conv": "malformed_record",
}


def test_bad_input_skip_policy(data, tok, cfg):
    _, src = data
    counter = SkipCounter("skip")
    kept = [counter.process(src[i], cfg, tok) for i in range(len(src))]
    assert [s.id for s in kept if s is not None] == [
        "single", "single_list", "multi", "text", "video", "frames"
    ]  # fmt: skip
    want: dict[str, int] = {}
    for reason in BAD.values():
        want[reason] = want.get(reason, 0) + 1
    assert dict(counter.counts) == want
    assert counter.stats()["seen"] == len(src) and counter.skipped == len(BAD)
    other = SkipCounter()
    other.merge(counter.stats())
    assert other.counts == counter.counts and other.seen == counter.seen


@pytest.mark.parametrize("rid", sorted(BAD))
def test_bad_input_raise_policy(data, tok, cfg, rid):
    recs, _ = data
    with pytest.raises(BadRecordError) as e:
        SkipCounter("raise").process(recs[rid], cfg, tok)
    msg = str(e.value)
    assert e.value.reason == BAD[rid]
    assert f"'{rid}'" in msg and "data.json" in msg, msg


def test_budgets(data, tok, cfg):
    recs, _ = data
    s = process_record(recs["multi"], cfg, tok)
    counter = SkipCounter()
    assert (
        counter.process(recs["multi"], cfg, tok, RecordOptions(max_tokens=s.num_tokens)) is not None
    )
    assert (
        counter.process(recs["multi"], cfg, tok, RecordOptions(max_tokens=s.num_tokens - 1)) is None
    )
    assert counter.process(recs["multi"], cfg, tok, RecordOptions(max_crops=2)) is None
    assert counter.process(recs["video"], cfg, tok, RecordOptions(max_crops=2)) is None
    assert dict(counter.counts) == {"too_long": 3}


def test_array_record_samples_identical(data, tok, cfg, tmp_path):
    _, src = data
    keep = [i for i in range(len(src)) if src[i]["id"] in ("single", "multi", "video", "frames")]
    sub = sources.SubsetSource(src, keep)
    build_array_record(sub, tmp_path, name="d")
    back = sources.ArrayRecordSource(tmp_path)
    for i in range(len(sub)):
        a, b = process_record(sub[i], cfg, tok), process_record(back[i], cfg, tok)
        assert a.id == b.id and a.items == b.items
        for f in ("tokens", "targets", "loss_mask", "crops"):
            np.testing.assert_array_equal(getattr(a, f), getattr(b, f))
