"""Visual layout vs HF: token counts (processor) and the 4-tap gather (model packing)."""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch
from transformers import LlavaOnevisionConfig, LlavaOnevisionProcessor
from transformers.models.llava_onevision import modeling_llava_onevision as hf_mod

from lov_jax.config import ov_0_5b, tiny
from lov_jax.testing.tokenizers import qwen2_token_ids
from lov_jax.visual_layout import (
    VisualItem,
    _anyres_geometry,
    anyres_grid,
    bilinear_taps_1d,
    item_taps,
    num_crops,
    num_tokens,
    place_taps,
    row_layout,
    select_best_resolution,
)

CFG = tiny(token_ids=qwen2_token_ids())
P = CFG.vision.patches_per_side
NP = P * P
C = 8  # feature width of the random banks

# (H, W) chosen to hit every branch; test_pack_sizes_cover_branches checks the coverage.
PACK_SIZES = [
    (480, 640),  # unpad rows, 2x2 grid
    (640, 480),  # unpad cols
    (899, 1024),  # HF test image
    (500, 640),  # odd (cur - new): kept size new + 1
    (1080, 1920),  # downsample after unpad
    (2304, 2304),  # 6x6 grid, downsample without unpad
    (1500, 2000),  # downsample
    (100, 3000),  # 1x6 grid
    (3000, 100),  # 6x1 grid
    (384, 384),  # 1x1 grid
    (1000, 1000),  # 3x3, square
    (333, 777),
    (777, 333),
    (1, 1),
    (20, 4000),
]


# ---- helpers ---------------------------------------------------------------------------


def _hf_config() -> LlavaOnevisionConfig:
    return LlavaOnevisionConfig(
        vision_config={
            "model_type": "siglip_vision_model", "hidden_size": 32, "intermediate_size": 64,
            "num_hidden_layers": 1, "num_attention_heads": 4, "image_size": 384,
            "patch_size": 14, "vision_use_head": False,
        },
        text_config={
            "model_type": "qwen2", "vocab_size": 152000, "hidden_size": C,
            "intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
            "num_key_value_heads": 1,
        },
        image_grid_pinpoints=[list(p) for p in CFG.image_grid_pinpoints],
        vision_feature_select_strategy="full", vision_feature_layer=-1,
        vision_aspect_ratio="anyres_max_9",
    )  # fmt: skip


# HF's own methods only read `self.config`, so they run unbound on a namespace.
HF_SELF = types.SimpleNamespace(config=_hf_config())


def _hf_pack(feats: list[torch.Tensor], sizes: list[tuple[int, int]], newline: torch.Tensor):
    out, lens = hf_mod.LlavaOnevisionModel.pack_image_features(
        HF_SELF, feats, torch.tensor(sizes), image_newline=newline,
        vision_aspect_ratio="anyres_max_9",
    )  # fmt: skip
    return torch.cat(out).numpy(), lens.tolist()


def _hf_processor_ns():
    ns = types.SimpleNamespace(
        num_image_tokens=NP, vision_feature_select_strategy="full",
        vision_aspect_ratio=CFG.vision_aspect_ratio, image_token="<image>", video_token="<video>",
        image_processor=types.SimpleNamespace(
            image_grid_pinpoints=[list(p) for p in CFG.image_grid_pinpoints]
        ),
    )  # fmt: skip
    for name in ("_get_unpadded_features", "_get_number_of_features"):
        setattr(ns, name, getattr(LlavaOnevisionProcessor, name).__get__(ns))
    return ns


def _bank(rng, num_slots: int) -> np.ndarray:
    """float64[num_slots*729 + 2, C]: features, then newline, then the zero row."""
    feats = rng.standard_normal((num_slots * NP + 1, C))
    return np.concatenate([feats, np.zeros((1, C))])


def _gather(bank: np.ndarray, idx: np.ndarray, w: np.ndarray) -> np.ndarray:
    return np.einsum("tk,tkc->tc", w.astype(np.float64), bank[idx])


# ---- token counts ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "size,tokens,crops",
    [
        ((480, 640), 2929, 5),
        ((1080, 1920), 7269, 16),
        ((899, 1024), 6551, 10),
        ((384, 384), 1485, 2),
        ((1000, 1000), 7371, 10),
        ((2304, 2304), 7371, 37),
        ((100, 3000), 1544, 7),
    ],
)
def test_worked_examples(size, tokens, crops):
    for cfg in (CFG, ov_0_5b()):
        item = VisualItem("anyres", image_size=size)
        assert num_tokens(item, cfg) == tokens
        assert num_crops(item, cfg) == crops


def test_multi_image_square_video_counts():
    assert num_tokens(VisualItem("pad"), CFG) == 730
    assert num_tokens(VisualItem("square"), CFG) == 729
    assert num_crops(VisualItem("pad"), CFG) == num_crops(VisualItem("square"), CFG) == 1
    for f in (1, 8, 32):
        item = VisualItem("video", num_frames=f)
        assert num_tokens(item, CFG) == 196 * f + 1
        assert num_crops(item, CFG) == f
    assert num_tokens(VisualItem("video", num_frames=8), CFG) == 1569
    assert num_tokens(VisualItem("video", num_frames=32), CFG) == 6273


def test_visual_item_validation():
    with pytest.raises(ValueError, match="image_size"):
        VisualItem("anyres")
    with pytest.raises(ValueError, match="kind"):
        VisualItem("tiles")
    with pytest.raises(ValueError, match="num_frames"):
        VisualItem("video", num_frames=0)


def test_counts_match_hf_processor():
    """Our counts equal the real processor methods (`_get_number_of_features`,
    `replace_image_token`, `replace_video_token`) on many random sizes."""
    from transformers.image_processing_utils import select_best_resolution as hf_sbr

    ns = _hf_processor_ns()
    pinpoints = [list(p) for p in CFG.image_grid_pinpoints]
    rng = np.random.default_rng(0)
    sizes = [tuple(int(v) for v in s) for s in rng.integers(20, 4001, size=(200, 2))]
    sizes += [(1, 1), (1, 4000), (4000, 1), (20, 4000), (384, 385), (768, 767)] + PACK_SIZES
    for h, w in sizes:
        item = VisualItem("anyres", image_size=(h, w))
        assert select_best_resolution((h, w), CFG.image_grid_pinpoints) == hf_sbr([h, w], pinpoints)
        assert num_tokens(item, CFG) == ns._get_number_of_features(h, w, 384, 384), (h, w)
        n_hf = hf_mod.image_size_to_num_patches([h, w], pinpoints, 384)
        assert num_crops(item, CFG) == n_hf, (h, w)
        assert anyres_grid((h, w), CFG) == hf_mod.get_anyres_image_grid_shape(
            [h, w], pinpoints, 384
        )

    # Multi-image (batch_num_images > 1) and single-image paths of replace_image_token.
    inputs = {
        "batch_num_images": [2, 1],
        "image_sizes": [[300, 500], [500, 301], [480, 640]],
        "pixel_values": [np.zeros((1, 3, 384, 384))],
    }
    got = [
        len(LlavaOnevisionProcessor.replace_image_token(ns, inputs, i)) // len("<image>")
        for i in range(3)
    ]
    want = [num_tokens(VisualItem("pad"), CFG)] * 2
    want += [num_tokens(VisualItem("anyres", (480, 640)), CFG)]
    assert got == want == [730, 730, 2929]
    for f in (1, 3, 16):
        vids = {"pixel_values_videos": [[None] * f]}
        n = len(LlavaOnevisionProcessor.replace_video_token(ns, vids, 0)) // len("<video>")
        assert n == num_tokens(VisualItem("video", num_frames=f), CFG)


# ---- bilinear taps -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "n_in,n_out", [(27, 14), (81, 60), (135, 108), (162, 81), (75, 60), (5, 3), (7, 7), (3, 8)]
)
def test_bilinear_taps_1d_matches_torch(n_in, n_out):
    x = torch.randn(1, 1, 1, n_in, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    ref = torch.nn.functional.interpolate(x, size=(1, n_out), mode="bilinear", align_corners=False)
    i0, i1, w0, w1 = bilinear_taps_1d(n_in, n_out)
    assert w0.dtype == w1.dtype == np.float32 and i0.shape == (n_out,)
    assert np.all((0 <= i0) & (i0 <= i1) & (i1 < n_in))
    v = x.numpy()[0, 0, 0]
    got = w0.astype(np.float64) * v[i0] + w1.astype(np.float64) * v[i1]
    np.testing.assert_allclose(got, ref.numpy()[0, 0, 0], rtol=0, atol=1e-6)


# ---- gather vs HF model packing ------------------------------------------------------------


def test_pack_sizes_cover_branches():
    flags = set()
    for size in PACK_SIZES:
        g = _anyres_geometry(size, CFG)
        (gh, gw), (r0, r1), (c0, c1) = g.grid, g.rows, g.cols
        kept = (r1 - r0, c1 - c0)
        flags.add("unpad_h" if r0 else "unpad_w" if c0 else "no_unpad")
        if g.out != kept:
            flags.add("downsample")
        if 1 in (gh, gw) and gh != gw:
            flags.add("1xK")
        if size[0] == size[1]:
            flags.add("square")
    # Odd padding: (cur - new) is odd, so the kept size is new + 1 (docs/reference.md 3.3).
    odd = False
    for h, w in PACK_SIZES:
        gh, gw = anyres_grid((h, w), CFG)
        ch, cw = gh * P, gw * P
        if w / h > cw / ch:
            odd |= (ch - int(round(h * (cw / w), 7))) % 2 == 1
        else:
            odd |= (cw - int(round(w * (ch / h), 7))) % 2 == 1
    assert odd
    assert {"unpad_h", "unpad_w", "no_unpad", "downsample", "1xK", "square"} <= flags
    assert len(PACK_SIZES) >= 12


@pytest.mark.parametrize("size", PACK_SIZES)
def test_anyres_gather_matches_hf_pack(size):
    rng = np.random.default_rng(hash(size) % 2**32)
    item = VisualItem("anyres", image_size=size)
    n = num_crops(item, CFG)
    offset, slots = 2, n + 3  # not at slot 0, spare slots after it
    bank = _bank(rng, slots)
    feat = torch.from_numpy(bank[offset * NP : (offset + n) * NP].reshape(n, NP, C))
    ref, lens = _hf_pack([feat], [size], torch.from_numpy(bank[slots * NP]))
    idx, w = item_taps(item, CFG, crop_offset=offset, newline_index=slots * NP)
    assert idx.dtype == np.int32 and w.dtype == np.float32
    assert lens == [idx.shape[0]] == [num_tokens(item, CFG)]
    assert idx.min() >= offset * NP and idx.max() <= slots * NP
    np.testing.assert_allclose(_gather(bank, idx, w), ref, rtol=0, atol=1e-6)


def test_video_gather_matches_hf_apply_pooling():
    rng = np.random.default_rng(1)
    frames, offset, slots = 3, 1, 5
    bank = _bank(rng, slots)
    feat = torch.from_numpy(bank[offset * NP : (offset + frames) * NP].reshape(frames, NP, C))
    pooled = hf_mod.LlavaOnevisionModel.apply_pooling(HF_SELF, feat)  # [F, 196, C]
    # get_video_features: flatten frames, then one newline for the whole video.
    ref = np.concatenate([pooled.reshape(-1, C).numpy(), bank[slots * NP][None]])
    item = VisualItem("video", num_frames=frames)
    idx, w = item_taps(item, CFG, crop_offset=offset, newline_index=slots * NP)
    assert idx.shape[0] == num_tokens(item, CFG) == ref.shape[0]
    np.testing.assert_allclose(_gather(bank, idx, w), ref, rtol=0, atol=1e-6)


def test_row_layout_mixed_items_match_hf():
    """anyres + two multi-image crops + square + video in one bank, HF packed per item."""
    rng = np.random.default_rng(2)
    items = [
        VisualItem("anyres", image_size=(1080, 1920)),
        VisualItem("pad"),
        VisualItem("pad"),
        VisualItem("square"),
        VisualItem("video", num_frames=2),
    ]
    slots = sum(num_crops(it, CFG) for it in items) + 1
    bank = _bank(rng, slots)
    newline = torch.from_numpy(bank[slots * NP])
    idx, w = row_layout(items, CFG, num_crop_slots=slots)
    refs, off = [], 0
    for it in items:
        n = num_crops(it, CFG)
        feat = torch.from_numpy(bank[off * NP : (off + n) * NP].reshape(n, NP, C))
        if it.kind == "anyres":
            refs.append(_hf_pack([feat], [it.image_size], newline)[0])
        elif it.kind == "pad":  # HF single-crop branch (batch_num_images > 1)
            refs.append(_hf_pack([feat], [(300, 500)], newline)[0])
        elif it.kind == "square":
            refs.append(feat[0].numpy())
        else:
            pooled = hf_mod.LlavaOnevisionModel.apply_pooling(HF_SELF, feat).reshape(-1, C)
            refs.append(np.concatenate([pooled.numpy(), newline[None].numpy()]))
        off += n
    ref = np.concatenate(refs)
    assert idx.shape == (sum(num_tokens(it, CFG) for it in items), 4)
    np.testing.assert_allclose(_gather(bank, idx, w), ref, rtol=0, atol=1e-6)


def test_hf_get_image_features_end_to_end():
    """Real HF get_image_features (tiny random model, fp32) on a multi-image sample and a
    single image: our taps over the features it packs reproduce its output."""
    from transformers import LlavaOnevisionModel

    from data_pipelines.image_processing import anyres_crops, normalize, pad_crop

    torch.manual_seed(0)
    model = LlavaOnevisionModel(_hf_config()).eval()
    rng = np.random.default_rng(3)
    imgs = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in [(300, 500), (480, 640)]]
    single, size = anyres_crops(imgs[1], CFG)
    pads = [pad_crop(im, CFG) for im in imgs]
    # HF layout: samples [[img0, img1], [img1]] -> batch_num_images [2, 1].
    crops = [pads[0], pads[1], single]
    items = [VisualItem("pad"), VisualItem("pad"), VisualItem("anyres", image_size=size)]
    n_max = max(len(c) for c in crops)
    pv = np.zeros((3, n_max, 3, 384, 384), np.float32)
    for i, c in enumerate(crops):
        pv[i, : len(c)] = normalize(c).transpose(0, 3, 1, 2)
    captured = {}
    orig_pack = model.pack_image_features

    def spy(image_features, *args, **kw):
        captured["feats"] = [f.detach().clone() for f in image_features]
        return orig_pack(image_features, *args, **kw)

    model.pack_image_features = spy
    with torch.no_grad():
        out = model.get_image_features(
            pixel_values=torch.from_numpy(pv),
            image_sizes=torch.tensor([[300, 500], [480, 640], list(size)]),
            vision_feature_layer=-1, vision_feature_select_strategy="full",
            vision_aspect_ratio="anyres_max_9", batch_num_images=torch.tensor([2, 1]),
        )  # fmt: skip
    ref = torch.cat(out.pooler_output).numpy().astype(np.float64)
    feats = torch.cat(captured["feats"]).reshape(-1, model.config.text_config.hidden_size)
    slots = feats.shape[0] // NP
    assert slots == sum(num_crops(it, CFG) for it in items) == 2 + len(single)
    bank = np.concatenate(
        [feats.numpy(), model.image_newline.detach().numpy()[None], np.zeros((1, feats.shape[1]))]
    ).astype(np.float64)
    idx, w = row_layout(items, CFG, num_crop_slots=slots)
    assert idx.shape[0] == ref.shape[0] == 730 * 2 + 2929
    np.testing.assert_allclose(_gather(bank, idx, w), ref, rtol=0, atol=1e-5)


# ---- row layout / placement ----------------------------------------------------------------


def test_row_layout_too_many_crops():
    items = [VisualItem("anyres", image_size=(480, 640)), VisualItem("pad")]
    with pytest.raises(ValueError, match="crop slots"):
        row_layout(items, CFG, num_crop_slots=5)
    row_layout(items, CFG, num_crop_slots=6)
    with pytest.raises(ValueError, match="crop slots"):
        row_layout(items, CFG, num_crop_slots=6, crop_offset=1)


def _tokens(*parts):
    """Build a token row from (id, count) parts."""
    return np.concatenate([np.full(n, t, np.int32) for t, n in parts])


def test_place_taps_assigns_runs_and_zeroes_text():
    img, vid = CFG.ids.image, CFG.ids.video
    items = [VisualItem("pad"), VisualItem("pad"), VisualItem("video", num_frames=2)]
    # two adjacent multi-image runs (no text between them) then a video
    toks = _tokens((7, 5), (img, 730), (img, 730), (9, 3), (vid, 393), (11, 4))
    slots = 6
    vis_idx, vis_w = place_taps(toks, items, CFG, num_crop_slots=slots)
    assert vis_idx.shape == (len(toks), 4) and vis_idx.dtype == np.int32
    assert vis_w.dtype == np.float32
    text = (toks != img) & (toks != vid)
    assert np.all(vis_w[text] == 0) and np.all(vis_idx[text] == slots * NP + 1)
    idx, w = row_layout(items, CFG, num_crop_slots=slots)
    np.testing.assert_array_equal(vis_idx[~text], idx)
    np.testing.assert_array_equal(vis_w[~text], w)
    # second pad item reads crop slot 1; the video closes with the newline row
    assert vis_idx[5 + 730, 0] == NP and vis_idx[5 + 730 + 729, 0] == slots * NP
    assert vis_idx[-5, 0] == slots * NP and vis_w[-5, 0] == 1


def test_place_taps_errors():
    img, vid = CFG.ids.image, CFG.ids.video
    items = [VisualItem("pad"), VisualItem("video", num_frames=1)]
    with pytest.raises(ValueError, match="placeholder count mismatch.*729 image"):
        place_taps(_tokens((1, 2), (img, 729), (vid, 197)), items, CFG, num_crop_slots=4)
    with pytest.raises(ValueError, match="placeholder count mismatch.*196 video"):
        place_taps(_tokens((1, 2), (img, 730), (vid, 196)), items, CFG, num_crop_slots=4)
    with pytest.raises(ValueError, match="item order"):
        place_taps(_tokens((vid, 197), (img, 730)), items, CFG, num_crop_slots=4)
    with pytest.raises(ValueError, match="not contiguous"):
        place_taps(_tokens((img, 700), (5, 1), (img, 30), (vid, 197)), items, CFG, 4)
    with pytest.raises(ValueError, match="crop slots"):
        place_taps(_tokens((img, 730), (vid, 197)), items, CFG, num_crop_slots=1)
    vis_idx, vis_w = place_taps(_tokens((1, 9)), [], CFG, num_crop_slots=2)
    assert np.all(vis_w == 0) and np.all(vis_idx == 2 * NP + 1)
