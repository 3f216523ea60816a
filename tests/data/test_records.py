"""Record -> Sample: kinds, token counts, video frames, bad-input policy."""

import ast
import functools
import json
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from data_pipelines import chat, media, sources
from data_pipelines.array_record_build import build_array_record
from data_pipelines.loader import ProcessFn, Skipped
from data_pipelines.records import RecordOptions, process_record
from data_pipelines.sample import BadSample, Reason
from data_pipelines.tokenizer import build_qwen2_tokenizer
from data_pipelines.video import write_video
from lov_jax import config, visual_layout
from lov_jax.testing.tokenizers import qwen2_token_ids

IMG, VID, PAD = 151646, 151647, 151643


def _conv(question="<image>\nWhat is this?", answer="A cat."):
    return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]


@pytest.fixture(scope="module")
def tok():
    return build_qwen2_tokenizer()


@pytest.fixture(scope="module")
def cfg():
    return config.tiny(token_ids=qwen2_token_ids())


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


def _policy(tok, cfg, on_error, options=None):
    options = options or RecordOptions()
    return ProcessFn(functools.partial(process_record, cfg=cfg, tokenizer=tok, options=options),
                     on_error)  # fmt: skip


def test_bad_input_skip_policy(data, tok, cfg):
    _, src = data
    out = [_policy(tok, cfg, "skip")(src[i]) for i in range(len(src))]
    assert [s.id for s in out if not isinstance(s, Skipped)] == [
        "single", "single_list", "multi", "text", "video", "frames"
    ]  # fmt: skip
    skipped = {src[i]["id"]: s for i, s in enumerate(out) if isinstance(s, Skipped)}
    assert {k: s.reason for k, s in skipped.items()} == BAD
    for rid, s in skipped.items():
        assert isinstance(s.reason, Reason) and f"'{rid}'" in s.message


@pytest.mark.parametrize("rid", sorted(BAD))
def test_bad_input_raise_policy(data, tok, cfg, rid):
    """Policy `raise` raises the same BadSample, naming the record and its file[index]."""
    recs, src = data
    with pytest.raises(BadSample) as e:
        _policy(tok, cfg, "raise")(recs[rid])
    msg = str(e.value)
    assert e.value.reason == BAD[rid] and msg.startswith(f"{BAD[rid]}: record '{rid}'")
    index = [src[i]["id"] for i in range(len(src))].index(rid)
    assert f"data.json[{index}])" in msg, msg


def test_budgets(data, tok, cfg):
    recs, _ = data
    s = process_record(recs["multi"], cfg, tok)
    reasons = []
    for rec, opts in [
        (recs["multi"], RecordOptions(max_tokens=s.num_tokens)),
        (recs["multi"], RecordOptions(max_tokens=s.num_tokens - 1)),
        (recs["multi"], RecordOptions(max_crops=2)),
        (recs["video"], RecordOptions(max_crops=2)),
    ]:
        out = _policy(tok, cfg, "skip", opts)(rec)
        reasons.append(out.reason if isinstance(out, Skipped) else None)
    assert reasons == [None, "too_long_tokens", "too_many_crops", "too_many_crops"]


def test_reason_names_are_one_closed_set():
    """Every reason named in data_pipelines/ and lov_jax/ is a `sample.Reason`: literal first
    arguments of BadSample / Skipped / BadRecord / count_skip, `"reason": ...` values and
    Reason.X attributes; an unknown name is refused at construction."""
    root = Path(__file__).resolve().parents[2]
    names, seen = {r.value for r in Reason}, []
    for path in [*root.joinpath("data_pipelines").rglob("*.py"),
                 *root.joinpath("lov_jax").rglob("*.py")]:  # fmt: skip
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call):
                fn = (
                    node.func.attr
                    if isinstance(node.func, ast.Attribute)
                    else getattr(node.func, "id", None)
                )
                args = node.args[2:3] if fn == "BadRecord" else node.args[:1]
                if fn in ("BadSample", "Skipped", "BadRecord", "count_skip"):
                    seen += [(path.name, a.value) for a in args if isinstance(a, ast.Constant)]
            elif isinstance(node, ast.Dict):
                for k, v in zip(node.keys, node.values, strict=True):
                    if isinstance(k, ast.Constant) and k.value == "reason":
                        if isinstance(v, ast.Constant):
                            seen.append((path.name, v.value))
            elif (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                  and node.value.id == "Reason"):  # fmt: skip
                assert hasattr(Reason, node.attr), f"{path.name}: Reason.{node.attr}"
    assert [(f, r) for f, r in seen if r not in names] == []
    with pytest.raises(ValueError):
        BadSample("too_long", "an old name")


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


def test_data_stats_command_counts_skip_reasons(data, tok, tmp_path, capsys):
    """`lov-jax data stats` on the bad-record json: every reason on its own line."""
    from data_pipelines.sources import SOURCE_KEY
    from data_pipelines.tokenizer import save_hf_tokenizer_files
    from lov_jax import cli

    recs, _ = data
    path = Path(recs["single"][SOURCE_KEY])
    save_hf_tokenizer_files(tmp_path, tok)
    argv = ["data", "stats", str(path), "--image-folder", str(path.parent / "images"),
            "--video-folder", str(path.parent / "videos"), "--tokenizer", str(tmp_path),
            "--preset", "tiny", "-L", "8192", "-N", "12"]  # fmt: skip
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert f"skipped {len(BAD)}" in out
    for reason in set(BAD.values()):
        assert f"  {reason}: {list(BAD.values()).count(reason)}" in out, out
