"""Video layouts (lov_jax/video_pool.py, visual_layout._video_taps) vs the reference.

The reference is LLaVA-NeXT's `get_2dPool`, `add_token_per_grid`, `add_token_per_frame`
and the `mm_newline_position` / `add_faster_video` branches of
`prepare_inputs_labels_for_multimodal` (../shared/REFERENCE_VIDEO_POST.md 2.2-2.4),
transcribed below in torch; the counts are the reference's worked examples (1.5, 2.7).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lov_jax import architectures, batch, video_pool
from lov_jax.config import VideoConfig, tiny, tiny_llava_next_video
from lov_jax.models import llava_onevision
from lov_jax.testing.tokenizers import qwen2_token_ids
from lov_jax.token_ids import TokenIds
from lov_jax.visual_layout import VisualItem, num_crops, num_tokens, row_layout

IDS = qwen2_token_ids()
VICUNA_IDS = TokenIds(pad=0, eos=(2,), image=32001, video=32000, bos=1)


def _cfg(image_size: int = 384, **video) -> object:
    base = tiny(token_ids=IDS)
    vision = dataclasses.replace(base.vision, image_size=image_size)
    return base.replace(vision=vision, video=VideoConfig(**video))


# ---- the reference, transcribed (LLaVA-NeXT llava/model/llava_arch.py) ------------------


def ref_2dpool(feat: torch.Tensor, side: int, stride: int, mode: str) -> torch.Tensor:
    """get_2dPool(image_feature [F, P*P, D], stride)."""
    num_frames, _, num_dim = feat.shape
    x = feat.view(num_frames, side, side, -1).permute(0, 3, 1, 2).contiguous()
    if mode == "average":
        x = F.avg_pool2d(x, stride)
    elif mode == "max":
        x = F.max_pool2d(x, stride)
    else:
        h, w = x.shape[2:]
        x = F.interpolate(x, size=[math.ceil(h / stride), math.ceil(w / stride)], mode="bilinear")
    return x.permute(0, 2, 3, 1).reshape(num_frames, -1, num_dim)


def ref_grid(feat: torch.Tensor, newline: torch.Tensor, faster: bool) -> torch.Tensor:
    """add_token_per_grid: [F, h*h, D] -> [F*h*(h+1), D], or [F, h*(h+1), D] (faster)."""
    resize_h = int(math.sqrt(feat.shape[1]))
    num_frames, feature_dim = feat.shape[0], feat.shape[-1]
    x = feat.view(num_frames, 1, resize_h, resize_h, -1).permute(4, 0, 2, 1, 3).contiguous()
    x = x.flatten(1, 2).flatten(2, 3)
    x = torch.cat((x, newline[:, None, None].expand(*x.shape[:-1], 1)), dim=-1)
    if faster:
        x = x.view(feature_dim, num_frames, resize_h, -1).permute(1, 2, 3, 0).contiguous()
        return x.flatten(1, 2)
    return x.flatten(1, 2).transpose(0, 1)


def ref_frame(feat: torch.Tensor, newline: torch.Tensor) -> torch.Tensor:
    """add_token_per_frame: [F, h*h, D] -> [F, h*h + 1, D]."""
    x = feat.permute(2, 0, 1).contiguous()
    x = torch.cat((x, newline[:, None, None].expand(*x.shape[:-1], 1)), dim=-1)
    return x.permute(1, 2, 0).contiguous()


def ref_video(feat, side, v: VideoConfig, newline, faster_token) -> torch.Tensor:
    """The video branch: encode_multimodals' pools (as designed), then the newline mode."""
    x = ref_2dpool(feat, side, v.pool_stride, v.pool_mode)
    if v.newline == "grid":
        x = ref_grid(x, newline, v.faster)
        if v.faster:
            fast = ref_grid(ref_2dpool(feat, side, 2 * v.pool_stride, v.pool_mode), newline, True)
            x = torch.cat([
                torch.cat((x[i] if i % v.faster_stride == 0 else fast[i], faster_token[None]))
                for i in range(x.shape[0])
            ])  # fmt: skip
        return x
    if v.newline == "frame":
        return ref_frame(x, newline).flatten(0, 1)
    x = x.flatten(0, 1)
    return torch.cat((x, newline[None])) if v.newline == "one_token" else x


# ---- counts ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "mode,newline,want",
    [
        ("bilinear", "grid", 13440), ("bilinear", "frame", 12608),
        ("bilinear", "one_token", 12545), ("bilinear", "no_token", 12544),
        ("average", "grid", 11648), ("average", "frame", 10880),
        ("max", "one_token", 10817), ("max", "no_token", 10816),
    ],
)  # fmt: skip
def test_llava_video_counts_64_frames(mode, newline, want):
    """REFERENCE_VIDEO_POST.md 2.7: 64 SigLIP-384 frames (27x27) pooled at stride 2."""
    cfg = _cfg(pool_mode=mode, newline=newline)
    item = VisualItem("video", num_frames=64)
    assert num_tokens(item, cfg) == want
    assert num_crops(item, cfg) == 64
    assert row_layout([item], cfg, 64)[0].shape == (want, 4)


@pytest.mark.parametrize("mode,want", [("bilinear", 4726), ("average", 3732)])
def test_slowfast_counts(mode, want):
    """2.7: add_faster_video, grid, faster_token_stride 10: frames 0, 10, .., 60 slow."""
    cfg = _cfg(pool_mode=mode, newline="grid", faster=True)
    assert video_pool.frame_strides(cfg.video, 64).count(2) == 7
    assert num_tokens(VisualItem("video", num_frames=64), cfg) == want


@pytest.mark.parametrize(
    "stride,frames,want", [(2, 8, 1152), (2, 32, 4608), (4, 8, 8 * 36), (3, 1, 64)]
)
def test_next_video_counts(stride, frames, want):
    """1.5: CLIP-L/14-336 (24x24) frames, average pooled, no newline: 144 per frame."""
    cfg = tiny_llava_next_video(token_ids=VICUNA_IDS)
    cfg = cfg.replace(video=dataclasses.replace(cfg.video, pool_stride=stride))
    assert num_tokens(VisualItem("video", num_frames=frames), cfg) == want


def test_odd_side_rounding():
    """27x27: average / max floor to 13, bilinear ceils to 14; stride 4: 6 and 7."""
    for mode, s, side in [("average", 2, 13), ("max", 2, 13), ("bilinear", 2, 14),
                          ("average", 4, 6), ("bilinear", 4, 7)]:  # fmt: skip
        assert video_pool.pooled_side(27, s, mode) == side
        assert _cfg(pool_mode=mode, pool_stride=s).video_pool_size == side


# ---- layout vs the reference -------------------------------------------------------------

CASES = [
    dict(pool_mode="bilinear", newline="one_token"),
    dict(pool_mode="bilinear", newline="grid", pool_stride=3),
    dict(pool_mode="average", newline="frame"),
    dict(pool_mode="max", newline="grid"),
    dict(pool_mode="max", newline="no_token", pool_stride=3),
    dict(pool_mode="average", newline="one_token", pool_stride=1),
    dict(pool_mode="bilinear", newline="grid", faster=True, faster_stride=2),
    dict(pool_mode="max", newline="grid", faster=True, faster_stride=3),
    dict(pool_mode="average", newline="grid", faster=True, faster_stride=1, pool_stride=1),
]


def _bank(cfg, slots, frames_at, x, newline, faster_token):
    """A row's bank as lov_jax/batch.py lays it out, the pooled sections by torch."""
    v, p, nf = cfg.video, cfg.vision.patches_per_side, cfg.vision.num_features
    d = x.shape[-1]
    crops = torch.zeros(slots, nf, d, dtype=torch.float64)
    crops[frames_at : frames_at + len(x)] = x
    rows = [crops.reshape(-1, d), newline[None], torch.zeros(1, d, dtype=torch.float64)]
    if v.faster:
        assert batch.faster_row(slots, cfg) == slots * nf + 2
        rows.append(faster_token[None])
    for s in video_pool.device_strides(cfg):
        assert batch.pooled_start(slots, cfg, s) == sum(len(r) for r in rows)
        rows.append(ref_2dpool(crops, p, s, v.pool_mode).reshape(-1, d))
    bank = torch.cat(rows).numpy()
    assert len(bank) == batch.bank_size(slots, cfg)
    return bank


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c.values())))
@pytest.mark.parametrize("image_size", [70, 84])  # 5x5 (odd) and 6x6 patches
def test_video_layout_matches_reference(case, image_size):
    cfg = _cfg(image_size, **case)
    p, frames, d = cfg.vision.patches_per_side, 5, 3
    gen = torch.Generator().manual_seed(image_size + len(case))
    x = torch.randn(frames, p * p, d, generator=gen, dtype=torch.float64)
    newline, faster = torch.randn(2, d, generator=gen, dtype=torch.float64)
    want = ref_video(x, p, cfg.video, newline, faster).numpy()

    # a one-crop image first (video frames from slot 1), two spare slots after
    items = [VisualItem("square"), VisualItem("video", num_frames=frames)]
    slots = 1 + frames + 2
    bank = _bank(cfg, slots, 1, x, newline, faster)
    idx, w = row_layout(items, cfg, slots)
    nf = cfg.vision.num_features
    got = np.einsum("tk,tkd->td", w.astype(np.float64), bank[idx])[nf:]
    assert got.shape == want.shape == (num_tokens(items[1], cfg), d)
    np.testing.assert_allclose(got, want, atol=1e-6)


def test_pool_frames_matches_torch():
    """The device pool (numpy and jax alike) = torch avg_pool2d / max_pool2d, floor."""
    rng = np.random.default_rng(3)
    for p, s in [(5, 2), (6, 3), (7, 4)]:
        x = rng.standard_normal((3, p * p, 4)).astype(np.float32)
        for mode in ("average", "max"):
            want = ref_2dpool(torch.from_numpy(x), p, s, mode).numpy()
            for arr in (x, jnp.asarray(x)):
                got = np.asarray(video_pool.pool_frames(arr, p, s, mode))
                np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_model_bank_after_projector_matches_reference():
    """OneVision-style model, LLaVA-Video average pool after the projector, grid + SlowFast:
    its merged video embeddings = the reference on its own projected features."""
    ids = TokenIds(pad=0, eos=(1,), image=5, video=6)
    base = _cfg(56, pool_mode="average", newline="grid", faster=True, faster_stride=2)
    text = dataclasses.replace(base.text, vocab_size=64, num_layers=1)
    cfg = base.replace(text=text, token_ids=ids)
    model = llava_onevision.LlavaOnevision(cfg)
    rng = np.random.default_rng(1)  # random params, no init compile (slow on CPU)
    params = jax.tree.map(
        lambda a: (0.3 * rng.standard_normal(a.shape)).astype(np.float32),
        llava_onevision.abstract_params(cfg, boxed=False),
    )
    frames, p = 3, cfg.vision.patches_per_side
    pixels = np.random.default_rng(0).integers(0, 256, (1, frames, 56, 56, 3), np.uint8)
    item = VisualItem("video", num_frames=frames)
    n = num_tokens(item, cfg)
    tokens = np.full((1, n + 2), ids.video, np.int32)
    tokens[0, [0, -1]] = 2
    idx, w = row_layout([item], cfg, frames)
    vis_idx = np.full((1, n + 2, 4), batch.zero_row(frames, cfg.vision.num_features), np.int32)
    vis_w = np.zeros((1, n + 2, 4), np.float32)
    vis_idx[0, 1:-1], vis_w[0, 1:-1] = idx, w

    def both(m, *args):
        return m.embed_inputs(*args), m.encode_crops(args[1])[0]

    run = jax.jit(lambda prm, *a: model.apply({"params": prm}, *a, method=both))
    got, feats = run(params, tokens, pixels, vis_idx, vis_w)
    x = torch.from_numpy(np.asarray(feats, np.float64)).reshape(frames, p * p, -1)
    nl, ft = (torch.from_numpy(np.asarray(params[k], np.float64))
              for k in ("image_newline", "faster_token"))  # fmt: skip
    want = ref_video(x, p, cfg.video, nl, ft).numpy()
    np.testing.assert_allclose(np.asarray(got)[0, 1:-1], want, atol=1e-5)


# ---- config ------------------------------------------------------------------------------


def test_video_config_validation():
    for bad, match in [
        (dict(pool_mode="conv"), "pool_mode"),
        (dict(newline="row"), "newline"),
        (dict(pool_stride=0), "pool_stride"),
        (dict(pool_mode="bilinear", pool_before_projector=True), "bilinear"),
        (dict(faster=True, newline="frame"), "grid"),
    ]:
        with pytest.raises(ValueError, match=match):
            VideoConfig(**bad)
    with pytest.raises(ValueError, match="empty"):
        _ = _cfg(56, pool_mode="average", pool_stride=5).video_pool_size


def test_video_config_round_trip():
    """OneVision with LLaVA-Video settings writes its video keys and reads them back;
    HF's own OneVision config gives OneVision's video; bad values name the key."""
    for video in (VideoConfig(), VideoConfig(pool_mode="max", newline="grid", faster=True,
                                             pool_stride=3, faster_stride=4)):  # fmt: skip
        cfg = tiny(token_ids=IDS, video=video)
        hf = cfg.to_hf_config()
        assert ("mm_newline_position" in hf) == (video != VideoConfig())
        assert architectures.from_hf_config(hf).video == video
        orig = architectures.to_original_config(cfg)
        assert orig["mm_newline_position"] == video.newline
        assert architectures._video_config(orig, "llava_onevision", "x") == video
    hf = tiny(token_ids=IDS).to_hf_config()
    with pytest.raises(ValueError, match="mm_spatial_pool_mode"):
        architectures.from_hf_config({**hf, "mm_spatial_pool_mode": "conv"}, source="c.json")
    with pytest.raises(ValueError, match="c.json: mm_spatial_pool_stride"):
        architectures.from_hf_config({**hf, "mm_spatial_pool_stride": "2"}, source="c.json")
    # the original main branch pools at 2 whatever mm_spatial_pool_stride says (no SlowFast)
    orig = architectures.to_original_config(tiny(token_ids=IDS))
    assert architectures._video_config({**orig, "mm_spatial_pool_stride": 4},
                                       "llava_onevision", "x").pool_stride == 2  # fmt: skip


def test_faster_token_converts_both_ways():
    """SlowFast's faster_token: `model.faster_token` in the lmms-lab layout, and back."""
    from lov_jax.convert.hf_keys import flatten, hf_to_params, params_to_hf

    base = tiny(token_ids=TokenIds(pad=0, eos=(1,), image=5, video=6))
    cfg = base.replace(text=dataclasses.replace(base.text, vocab_size=64, num_layers=1),
                       video=VideoConfig(newline="grid", faster=True))  # fmt: skip
    rng = np.random.default_rng(2)
    params = jax.tree.map(lambda a: rng.standard_normal(a.shape).astype(np.float32),
                          llava_onevision.abstract_params(cfg, boxed=False))  # fmt: skip
    for layout, key in (("lmms_lab", "model.faster_token"), ("hf", "faster_token")):
        tensors = params_to_hf(params, cfg, layout=layout)
        np.testing.assert_array_equal(tensors[key], params["faster_token"])
        back, want = flatten(hf_to_params(tensors, cfg)), flatten(params)
        assert sorted(back) == sorted(want)
        for k in want:
            np.testing.assert_array_equal(back[k], want[k], err_msg=k)
