"""LLaVA-1.5 / LLaVA-NeXT preprocessing vs HF: token counts, pixels, and feature packing.

References (transformers, read at their source): `LlavaProcessor` / `LlavaNextProcessor`
token counts, `CLIPImageProcessorPil`, `LlavaImageProcessorPil(do_pad=True)`,
`LlavaNextImageProcessorPil`, and `LlavaNextModel.pack_image_features` on a tiny random
model; the original LLaVA-1.5 `expand2square` (haotian-liu/LLaVA llava/mm_utils.py).
"""

from __future__ import annotations

import itertools
import types

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import LlavaNextConfig, LlavaNextProcessor, LlavaProcessor
from transformers.models.llava_next import modeling_llava_next as hf_next

from data_pipelines.hf_processor import load_hf_processor, save_processor_configs
from data_pipelines.image_processing import (
    anyres_crops,
    center_crop,
    image_kind,
    normalize,
    pad_color,
    pad_crop,
)
from lov_jax.config import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    ModelConfig,
    TextConfig,
    VisionConfig,
)
from lov_jax.inference import prompting
from lov_jax.testing.tokenizers import save_tokenizer, small_bpe
from lov_jax.token_ids import TokenIds
from lov_jax.visual_layout import (
    VisualItem,
    num_crops,
    num_tokens,
    place_taps,
    row_layout,
    select_best_resolution,
)

NEXT_PINPOINTS = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))
# A tiny tower's pinpoint set: 56px crops (4x4 patches), grids up to 3x4, not symmetric.
TINY_PINPOINTS = ((56, 112), (112, 56), (112, 112), (168, 56), (56, 168), (168, 224))


def clip_vision(image_size: int = 336, feature_select: str = "default") -> VisionConfig:
    return VisionConfig(
        kind="clip", hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
        patch_size=14, image_size=image_size, layer_norm_eps=1e-5,
        feature_select=feature_select, hidden_act="quick_gelu",
        image_mean=OPENAI_CLIP_MEAN, image_std=OPENAI_CLIP_STD,
    )  # fmt: skip


TEXT = TextConfig(
    kind="llama", vocab_size=1000, hidden_size=16, intermediate_size=32, num_layers=1,
    num_heads=2, num_kv_heads=1, head_dim=8, attention_bias=False,
)  # fmt: skip


def next_cfg(image_size: int = 336, pinpoints=NEXT_PINPOINTS) -> ModelConfig:
    return ModelConfig(
        vision=clip_vision(image_size), text=TEXT, architecture="llava_next",
        vision_aspect_ratio="anyres", image_grid_pinpoints=pinpoints,
    )  # fmt: skip


def llava_cfg(aspect: str = "center_crop", feature_select: str = "default") -> ModelConfig:
    return ModelConfig(
        vision=clip_vision(feature_select=feature_select), text=TEXT, architecture="llava",
        vision_aspect_ratio=aspect,
    )  # fmt: skip


NEXT = next_cfg()
TINY_NEXT = next_cfg(56, TINY_PINPOINTS)

# (H, W): tiny, <= one crop (HF and the original pick transposed grids there), each
# pinpoint's aspect, extreme ratios, odd slack, and the A.7.3 worked examples.
SIDES = (1, 2, 7, 55, 200, 335, 336, 337, 503, 672, 899, 1000, 1920, 5000)
SIZES = sorted(set(itertools.product(SIDES, SIDES)) | {(316, 503), (768, 1024), (100, 3000)})


def _hf_processor_ns(cls, cfg: ModelConfig, strategy: str = "default"):
    """HF's counting methods, unbound, on a namespace holding the processor's fields."""
    ns = types.SimpleNamespace(
        patch_size=cfg.vision.patch_size, num_additional_image_tokens=1,
        vision_feature_select_strategy=strategy,
        image_processor=types.SimpleNamespace(
            image_grid_pinpoints=[list(p) for p in cfg.image_grid_pinpoints]
        ),
    )  # fmt: skip
    for name in ("_get_unpadded_features", "_get_number_of_features"):
        if hasattr(cls, name):
            setattr(ns, name, getattr(cls, name).__get__(ns))
    return ns


def _hf_next_count(ns, size_hw, side: int) -> int:
    n = ns._get_number_of_features(*size_hw, side, side)
    return n - int(ns.vision_feature_select_strategy == "default")


# ---- token counts ------------------------------------------------------------------------


@pytest.mark.parametrize("cfg", [NEXT, TINY_NEXT], ids=["default_pinpoints", "tiny"])
def test_next_token_counts_equal_hf_processor(cfg):
    ns = _hf_processor_ns(LlavaNextProcessor, cfg)
    side = cfg.vision.image_size
    assert len(SIZES) >= 30
    for size in SIZES:
        item = VisualItem("anyres", image_size=size)
        assert num_tokens(item, cfg) == _hf_next_count(ns, size, side), size
        want_crops = hf_next.image_size_to_num_patches(
            list(size), [list(p) for p in cfg.image_grid_pinpoints], side
        )
        assert num_crops(item, cfg) == want_crops, size


def test_next_worked_examples():
    """docs/reference_family.md A.7.3 (counted there with a tiny HF model)."""
    table = {(899, 1024): 2634, (480, 640): 2340, (1080, 1920): 1948, (1000, 1000): 2928,
             (336, 336): 1176, (503, 316): 1526, (100, 3000): 722, (2000, 500): 1944}  # fmt: skip
    for size, want in table.items():
        assert num_tokens(VisualItem("anyres", image_size=size), NEXT) == want, size


def test_next_has_no_downsample():
    """OneVision's anyres_max_9 would shrink the 2x2 grid of 1000x1000; NeXT keeps 48x48."""
    assert num_tokens(VisualItem("anyres", image_size=(1000, 1000)), NEXT) == 576 + 48 * 49


def _rounding_sizes(cfg: ModelConfig, sides) -> list[tuple[int, int]]:
    """Sizes whose unpad target x is within 1e-7 below an integer: HF's int(round(x, 7))
    keeps a row or column that int(x) (the original code) would cut."""
    p, out = cfg.vision.patches_per_side, []
    for h, w in itertools.product(sides, sides):
        best_h, best_w = select_best_resolution((h, w), cfg.image_grid_pinpoints)
        cur_h, cur_w = best_h // cfg.vision.image_size * p, best_w // cfg.vision.image_size * p
        x = h * (cur_w / w) if w / h > cur_w / cur_h else w * (cur_h / h)
        if int(round(x, 7)) != int(x):
            out.append((h, w))
    return out


def test_unpad_rounding_cases_equal_hf():
    ns = _hf_processor_ns(LlavaNextProcessor, NEXT)
    found = _rounding_sizes(NEXT, range(1, 1500, 7))
    assert len(found) >= 5, found
    for size in found:
        assert num_tokens(VisualItem("anyres", image_size=size), NEXT) == _hf_next_count(
            ns, size, 336
        ), size


@pytest.mark.parametrize("strategy,want", [("default", 576), ("full", 577)])
def test_llava_token_counts_equal_hf_processor(strategy, want):
    ns = types.SimpleNamespace(
        patch_size=14, num_additional_image_tokens=1, vision_feature_select_strategy=strategy,
        image_processor=types.SimpleNamespace(crop_size={"height": 336, "width": 336}),
        _merge_kwargs=lambda **kw: {"images_kwargs": {}},
    )  # fmt: skip
    hf = LlavaProcessor._get_num_multimodal_tokens(ns, image_sizes=[(480, 640), (3, 5000)])
    assert hf.num_image_tokens == [want, want]
    for aspect in ("center_crop", "pad"):
        cfg = llava_cfg(aspect, feature_select=strategy)
        for kind in ("center_crop", "pad"):
            assert num_tokens(VisualItem(kind), cfg) == want
            assert num_crops(VisualItem(kind), cfg) == 1


# ---- packing vs HF's model ---------------------------------------------------------------


def _hf_next_model(cfg: ModelConfig, hidden: int = 8) -> hf_next.LlavaNextModel:
    torch.manual_seed(0)
    v = cfg.vision
    hf_cfg = LlavaNextConfig(
        vision_config={
            "model_type": "clip_vision_model", "hidden_size": v.hidden_size,
            "intermediate_size": v.intermediate_size, "num_hidden_layers": 1,
            "num_attention_heads": v.num_heads, "image_size": v.image_size,
            "patch_size": v.patch_size,
        },
        text_config={
            "model_type": "llama", "vocab_size": 64, "hidden_size": hidden,
            "intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
            "num_key_value_heads": 1,
        },
        image_grid_pinpoints=[list(p) for p in cfg.image_grid_pinpoints],
        vision_feature_select_strategy="default", vision_feature_layer=-2,
    )  # fmt: skip
    return hf_next.LlavaNextModel(hf_cfg).eval()


# The last three are unpad-rounding cases (_rounding_sizes): HF's round(., 7) keeps a row.
PACK_SIZES = [(899, 1024), (480, 640), (640, 480), (200, 300), (300, 200), (336, 336),
              (1, 1), (2, 5000), (5000, 2), (503, 316), (1000, 1000), (337, 1007),
              (309, 309), (792, 1408), (1408, 792)]  # fmt: skip


@pytest.mark.parametrize("cfg", [NEXT, TINY_NEXT], ids=["default_pinpoints", "tiny"])
def test_next_gather_equals_hf_pack_image_features(cfg):
    """Random per-crop features through HF's pack_image_features (all images of a prompt
    at once, as its forward does) == the 4-tap gather over one bank of all crops."""
    model = _hf_next_model(cfg)
    width = model.image_newline.shape[0]
    f = cfg.vision.num_features
    items = [VisualItem("anyres", image_size=s) for s in PACK_SIZES]
    crops = [num_crops(it, cfg) for it in items]
    rng = np.random.default_rng(1)
    feats = rng.standard_normal((sum(crops), f, width))
    newline = model.image_newline.detach().double().numpy()
    with torch.no_grad():
        split = torch.split(torch.from_numpy(feats), crops)
        out, lens = model.pack_image_features(
            list(split), torch.tensor(PACK_SIZES), "default", image_newline=model.image_newline
        )
    hf = torch.cat(out).double().numpy()
    assert lens.tolist() == [num_tokens(it, cfg) for it in items]

    # The row has 3 spare (zero) crop slots: the newline / zero rows move with N.
    slots = sum(crops) + 3
    bank = np.zeros((slots * f + 2, width))  # lov_jax.batch bank rows
    bank[: sum(crops) * f] = feats.reshape(-1, width)
    bank[slots * f] = newline
    idx, w = row_layout(items, cfg, slots)
    ours = np.einsum("tk,tkc->tc", w.astype(np.float64), bank[idx])
    np.testing.assert_allclose(ours, hf, rtol=0, atol=1e-12)


def test_next_single_crop_branch_equals_hf():
    """docs/reference_family.md A.7.4: a one-crop image is its features + one newline."""
    model = _hf_next_model(NEXT)
    width, f = model.image_newline.shape[0], NEXT.vision.num_features
    feats = torch.randn(1, f, width, dtype=torch.float64)
    with torch.no_grad():
        out, lens = model.pack_image_features(
            [feats], torch.tensor([[300, 400]]), "default", image_newline=model.image_newline
        )
    item = VisualItem("pad")
    assert lens.tolist() == [num_tokens(item, NEXT)] == [f + 1]
    bank = np.concatenate([feats[0].numpy(), model.image_newline.detach().double()[None]])
    bank = np.concatenate([bank, np.zeros((1, width))])
    idx, w = row_layout([item], NEXT, 1)
    ours = np.einsum("tk,tkc->tc", w.astype(np.float64), bank[idx])
    np.testing.assert_allclose(ours, out[0].numpy(), rtol=0, atol=0)


@pytest.mark.parametrize("feature_select", ["default", "full"])
def test_llava_layout_is_one_copy_per_feature(feature_select):
    """LlavaModel scatters each image's F features in order: no newline, stride F."""
    cfg = llava_cfg("pad", feature_select)
    f = cfg.vision.num_features
    items = [VisualItem("pad"), VisualItem("center_crop"), VisualItem("pad")]
    idx, w = row_layout(items, cfg, 4, crop_offset=1)
    assert idx.shape == (3 * f, 4)
    np.testing.assert_array_equal(idx[:, 0], np.arange(f, 4 * f))
    np.testing.assert_array_equal(w, np.tile([1.0, 0, 0, 0], (3 * f, 1)))


def test_family_layout_errors():
    full_next = NEXT.replace(vision=clip_vision(feature_select="full"))
    with pytest.raises(ValueError, match="one feature per patch.*577"):
        num_tokens(VisualItem("anyres", image_size=(480, 640)), full_next)
    with pytest.raises(ValueError, match="anyres architecture.*'llava'"):
        num_tokens(VisualItem("anyres", image_size=(480, 640)), llava_cfg())


def test_place_taps_llava_stride():
    """Text taps point at the zero row N*F + 1 of an F=577 bank."""
    ids = TokenIds(pad=0, eos=(2,), image=5, bos=1)
    cfg = llava_cfg("center_crop", "full").replace(token_ids=ids)
    tokens = np.array([1, 7] + [5] * 577 + [8], np.int32)
    vis_idx, vis_w = place_taps(tokens, [VisualItem("center_crop")], cfg, num_crop_slots=2)
    assert vis_idx[0, 0] == 2 * 577 + 1 and vis_w[0].sum() == 0
    np.testing.assert_array_equal(vis_idx[2:-1, 0], np.arange(577))


# ---- pixels ------------------------------------------------------------------------------


def _random_image(h: int, w: int, seed: int, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4, "L": 1, "LA": 2}[mode]
    arr = rng.integers(0, 256, (h, w, channels), dtype=np.uint8)
    return Image.fromarray(arr[..., 0] if channels == 1 else arr, mode=mode)


def _hf_clip(**kw):
    from transformers import CLIPImageProcessorPil

    return CLIPImageProcessorPil(
        size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336},
        image_mean=list(OPENAI_CLIP_MEAN), image_std=list(OPENAI_CLIP_STD), **kw,
    )  # fmt: skip


def _channels_last(pixel_values) -> np.ndarray:
    return np.asarray(pixel_values).transpose(0, 2, 3, 1)


def expand2square(pil_img, background_color):
    """Verbatim from haotian-liu/LLaVA llava/mm_utils.py (LLaVA-1.5 image_aspect_ratio=pad)."""
    width, height = pil_img.size
    if width == height:
        return pil_img
    elif width > height:
        result = Image.new(pil_img.mode, (width, width), background_color)
        result.paste(pil_img, (0, (width - height) // 2))
        return result
    else:
        result = Image.new(pil_img.mode, (height, height), background_color)
        result.paste(pil_img, ((height - width) // 2, 0))
        return result


PIXEL_SIZES = [(480, 640), (640, 480), (336, 336), (337, 335), (1, 1), (20, 700), (700, 20),
               (501, 333), (1080, 1920), (100, 101)]  # fmt: skip
LLAVA = llava_cfg("center_crop")
LLAVA_PAD = llava_cfg("pad")


@pytest.mark.parametrize("size", PIXEL_SIZES)
def test_center_crop_equals_clip_image_processor(size):
    img = _random_image(*size, seed=size[0] * 31 + size[1])
    ours = center_crop(img, LLAVA)
    assert ours.shape == (1, 336, 336, 3) and ours.dtype == np.uint8
    raw = _hf_clip(do_rescale=False, do_normalize=False)([img], return_tensors="np")
    np.testing.assert_array_equal(ours, _channels_last(raw["pixel_values"]))
    hf = _hf_clip()([img], return_tensors="np")["pixel_values"]
    np.testing.assert_allclose(normalize(ours, LLAVA.vision), _channels_last(hf), atol=1e-6)


@pytest.mark.parametrize("size", PIXEL_SIZES)
def test_pad_equals_original_expand2square(size):
    img = _random_image(*size, seed=size[0] * 17 + size[1])
    ours = pad_crop(img, LLAVA_PAD)
    mean = _hf_clip().image_mean
    ref = expand2square(img, tuple(int(x * 255) for x in mean))
    raw = _hf_clip(do_rescale=False, do_normalize=False)([ref], return_tensors="np")
    np.testing.assert_array_equal(ours, _channels_last(raw["pixel_values"]))
    assert pad_color(LLAVA_PAD.vision) == (122, 116, 104)


def _save_processor(tmp_path_factory, cfg: ModelConfig, name: str):
    out = tmp_path_factory.mktemp(name)
    save_tokenizer(SPEC, out)
    save_processor_configs(out, cfg)
    return load_hf_processor(out)


SPEC = small_bpe(700)


@pytest.fixture(scope="module")
def processors(tmp_path_factory):
    """AutoProcessor-loaded processors of the files hf_processor writes, per config."""
    cfgs = {"center_crop": LLAVA, "pad": LLAVA_PAD, "next": NEXT,
            "full": llava_cfg("center_crop", "full")}  # fmt: skip
    ids = SPEC.token_ids
    return {k: (c.replace(token_ids=ids), _save_processor(tmp_path_factory, c, k))
            for k, c in cfgs.items()}  # fmt: skip


def test_processor_classes(processors):
    names = {k: (type(p).__name__, type(p.image_processor).__name__)
             for k, (_, p) in processors.items()}  # fmt: skip
    assert names == {
        "center_crop": ("LlavaProcessor", "CLIPImageProcessorPil"),
        "pad": ("LlavaProcessor", "LlavaImageProcessorPil"),
        "next": ("LlavaNextProcessor", "LlavaNextImageProcessorPil"),
        "full": ("LlavaProcessor", "CLIPImageProcessorPil"),
    }


@pytest.mark.parametrize("key", ["center_crop", "pad", "next", "full"])
def test_prompt_equals_hf_processor(processors, key):
    """Our prompt path (image_kind -> preprocess -> expanded ids) == HF's processor on the
    exported files: the ids (placeholder runs included) and the pixels of every crop."""
    cfg, proc = processors[key]
    sizes = [(480, 640), (200, 300)] if key != "next" else [(480, 640), (200, 300), (5, 900)]
    images = [_random_image(h, w, seed=i) for i, (h, w) in enumerate(sizes)]
    text = "USER: " + "<image>\n" * len(images) + "Compare them. ASSISTANT:"
    hf = proc(text=text, images=images, return_tensors="np")
    ids = SPEC.tokenizer.encode(text, add_special_tokens=False).ids
    ours = prompting.encode_ids(cfg, ids, images, [])
    np.testing.assert_array_equal(np.asarray(ours.tokens), hf["input_ids"][0])
    kind = image_kind(cfg, len(images))
    assert [it.kind for it in ours.items] == [kind] * len(images)
    pv = np.asarray(hf["pixel_values"])
    hf_crops = [pv[i, :n] for i, n in enumerate(num_crops(it, cfg) for it in ours.items)]
    hf_crops = np.concatenate(hf_crops) if pv.ndim == 5 else pv
    np.testing.assert_allclose(
        normalize(ours.crops, cfg.vision), _channels_last(hf_crops), rtol=0, atol=1e-6
    )


def test_exported_next_processor_counts_every_size(processors):
    """The written files (pinpoints, patch_size, CLS count, strategy) make HF's own
    processor count what the layout counts, on the whole size grid."""
    cfg, proc = processors["next"]
    hf = proc._get_num_multimodal_tokens(image_sizes=SIZES).num_image_tokens
    assert hf == [num_tokens(VisualItem("anyres", image_size=s), cfg) for s in SIZES]


@pytest.mark.parametrize("size", [(40, 70), (56, 56), (1, 300), (300, 1), (120, 170), (55, 57)])
def test_next_crops_equal_hf_tiny_pinpoints(size):
    """NeXT crops at a 56px tower over the odd pinpoint set (3x4 grids, black padding)."""
    from transformers import LlavaNextImageProcessorPil

    img = _random_image(*size, seed=size[0] + 5 * size[1])
    hf_proc = LlavaNextImageProcessorPil(
        size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56},
        image_grid_pinpoints=[list(p) for p in TINY_PINPOINTS], do_rescale=False,
        do_normalize=False,
    )  # fmt: skip
    out = hf_proc([img], return_tensors="np")
    crops, size_hw = anyres_crops(img, TINY_NEXT)
    assert tuple(out["image_sizes"][0]) == size_hw
    assert len(crops) == num_crops(VisualItem("anyres", image_size=size_hw), TINY_NEXT)
    np.testing.assert_array_equal(crops, _channels_last(out["pixel_values"][0]))


def test_image_kinds_per_architecture():
    from lov_jax.config import tiny

    assert [image_kind(NEXT, n) for n in (1, 3)] == ["anyres", "anyres"]
    assert [image_kind(LLAVA_PAD, n) for n in (1, 3)] == ["pad", "pad"]
    assert [image_kind(LLAVA, n) for n in (1, 3)] == ["center_crop"] * 2
    assert image_kind(LLAVA_PAD, 1, plain=True) == "center_crop"
    assert [image_kind(tiny(), n) for n in (1, 2)] == ["anyres", "pad"]
    assert image_kind(tiny(), 1, plain=True) == "square"


# ---- bad input ---------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA"])
def test_modes_convert_as_hf(mode):
    img = _random_image(300, 200, seed=3, mode=mode)
    raw = _hf_clip(do_rescale=False, do_normalize=False)([img], return_tensors="np")
    np.testing.assert_array_equal(center_crop(img, LLAVA), _channels_last(raw["pixel_values"]))


@pytest.mark.parametrize("channels", [1, 4])
def test_arrays_convert_as_hf(channels):
    """numpy input takes HF's numpy convert_to_rgb (alpha blended in float, rounded)."""
    arr = np.random.default_rng(4).integers(0, 256, (300, 200, channels), dtype=np.uint8)
    raw = _hf_clip(do_rescale=False, do_normalize=False)([arr], return_tensors="np")
    np.testing.assert_array_equal(center_crop(arr, LLAVA), _channels_last(raw["pixel_values"]))


def test_bad_images_are_clear_errors(tmp_path):
    from data_pipelines import media
    from data_pipelines.sample import BadSample

    with pytest.raises(ValueError, match="zero size 0x5"):
        center_crop(Image.new("RGB", (0, 5)), LLAVA)
    with pytest.raises(ValueError, match="empty"):
        anyres_crops(np.zeros((0, 4, 3), np.uint8), NEXT)
    wide = Image.fromarray(np.full((20, 30), 4000, np.uint16))
    with pytest.raises(ValueError, match="'I;16' has samples wider than 8 bits"):
        pad_crop(wide, LLAVA_PAD)
    with pytest.raises(ValueError, match="dtype float32"):
        center_crop(np.zeros((8, 8, 3), np.float32), LLAVA)
    with pytest.raises(ValueError, match=r"shape \(8, 8, 2\)"):
        center_crop(np.zeros((8, 8, 2), np.uint8), LLAVA)
    path = tmp_path / "deep.png"
    wide.save(path)
    with pytest.raises(BadSample, match="deep.png.*wider than 8 bits") as err:
        media.load_image(str(path), "rec7")
    assert err.value.reason == "corrupt_image" and "rec7" in str(err.value)


def test_prompt_image_file_with_alpha_as_hf(tmp_path):
    """An RGBA file given by path is composited onto white, as HF's processor does."""
    img = _random_image(120, 90, seed=11, mode="RGBA")
    path = tmp_path / "alpha.png"
    img.save(path)
    ours = center_crop(prompting.load_image(path), LLAVA)
    with Image.open(path) as im:
        raw = _hf_clip(do_rescale=False, do_normalize=False)([im], return_tensors="np")
    np.testing.assert_array_equal(ours, _channels_last(raw["pixel_values"]))


def test_synthetic_records_follow_the_architecture():
    """`lov-jax data stats` on a NeXT / LLaVA-1.5 config counts their items, not OV's."""
    from data_pipelines import stats

    multi = {"kind": "multi", "image_sizes": [(480, 640), (200, 300)], "num_frames": 0}
    assert [it.kind for it in stats.record_items(multi, NEXT)] == ["anyres", "anyres"]
    assert [it.kind for it in stats.record_items(multi, LLAVA_PAD)] == ["pad", "pad"]
    records = [dict(multi, id="m", text_tokens=10, seed=0)]
    want = 10 + 2340 + 1464  # A.7.3 / A.7.5 counts of the two images
    assert stats.record_sizes(records, NEXT).tolist() == [[want, 5 + 3, 10]]
    assert stats.record_sizes(records, LLAVA_PAD).tolist() == [[10 + 2 * 576, 2, 10]]
