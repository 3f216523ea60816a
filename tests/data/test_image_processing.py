"""Host preprocessing vs `transformers.LlavaOnevisionImageProcessorPil` (pixel equality)."""

from __future__ import annotations

import numpy as np
import pytest
import skimage.data
from PIL import Image
from transformers import LlavaOnevisionImageProcessorPil
from transformers.image_transforms import resize as hf_resize
from transformers.image_utils import ChannelDimension, PILImageResampling

from data_pipelines.image_processing import (
    PAD_COLOR,
    anyres_crops,
    normalize,
    pad_crop,
    preprocess,
    square_crop,
    video_frames,
)
from lov_jax.config import tiny
from lov_jax.testing.tokenizers import qwen2_token_ids
from lov_jax.visual_layout import VisualItem, num_crops

CFG = tiny(token_ids=qwen2_token_ids())
S = CFG.vision.image_size
ATOL = 1e-6


@pytest.fixture(scope="module")
def hf_proc():
    # Offline equivalent of the hub preprocessor_config.json (SigLIP mean/std 0.5).
    return LlavaOnevisionImageProcessorPil(
        image_mean=[0.5] * 3,
        image_std=[0.5] * 3,
        size={"height": S, "width": S},
        image_grid_pinpoints=[list(p) for p in CFG.image_grid_pinpoints],
        do_pad=True,
        resample=PILImageResampling.BICUBIC,
    )


def _random_image(h: int, w: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def _hf_channels_last(pixel_values: np.ndarray) -> np.ndarray:
    return np.asarray(pixel_values).transpose(0, 2, 3, 1)


RANDOM_SIZES = [
    (480, 640),
    (899, 1024),
    (1080, 1920),
    (100, 3000),
    (3000, 100),
    (37, 1001),
    (385, 383),
    (2304, 2304),
    (1, 1),
    (501, 333),
]


@pytest.mark.parametrize("size", RANDOM_SIZES)
def test_anyres_crops_match_hf_random(hf_proc, size):
    img = _random_image(*size, seed=size[0] * 7 + size[1])
    _check_anyres(hf_proc, img)


@pytest.mark.parametrize(
    "name,crop",
    [("astronaut", None), ("astronaut", (40, 500, 10, 300)), ("coffee", None), ("camera", None)],
)
def test_anyres_crops_match_hf_real(hf_proc, name, crop):
    arr = getattr(skimage.data, name)()
    if crop is not None:
        y0, y1, x0, x1 = crop
        arr = arr[y0:y1, x0:x1]
    img = Image.fromarray(arr)  # camera is grayscale "L": exercises the RGB conversion
    _check_anyres(hf_proc, img)


def _check_anyres(hf_proc, img: Image.Image):
    crops, size_hw = anyres_crops(img, CFG)
    out = hf_proc([img], return_tensors="np")
    assert tuple(out["image_sizes"][0]) == size_hw == (img.height, img.width)
    n = num_crops(VisualItem("anyres", image_size=size_hw), CFG)
    assert crops.shape == (n, S, S, 3) and crops.dtype == np.uint8
    hf = _hf_channels_last(out["pixel_values"][0])
    assert hf.shape[0] == n  # a single image: no batch padding
    np.testing.assert_allclose(normalize(crops), hf, rtol=0, atol=ATOL)


def test_anyres_batch_padding_is_dropped(hf_proc):
    """do_pad=True pads the crop axis to the batch max; our crops equal the [:n] slice."""
    imgs = [_random_image(480, 640, 1), _random_image(2000, 2100, 2)]
    out = hf_proc(imgs, return_tensors="np")
    for i, img in enumerate(imgs):
        crops, _ = anyres_crops(img, CFG)
        hf = _hf_channels_last(out["pixel_values"][i])
        np.testing.assert_allclose(normalize(crops), hf[: len(crops)], rtol=0, atol=ATOL)
        assert np.all(hf[len(crops) :] == 0)


def test_multi_image_pad_crops_match_hf(hf_proc):
    imgs = [
        _random_image(300, 500, 3),  # landscape
        _random_image(501, 300, 4),  # portrait, odd slack
        _random_image(256, 256, 5),  # square: no padding
        Image.fromarray(skimage.data.chelsea()),
    ]
    out = hf_proc([imgs], return_tensors="np")  # nested list -> batch_num_images [4]
    assert list(out["batch_num_images"]) == [4]
    assert out["pixel_values"].shape == (4, 1, 3, S, S)
    for i, img in enumerate(imgs):
        ours = pad_crop(img, CFG)
        assert ours.shape == (1, S, S, 3) and ours.dtype == np.uint8
        hf = _hf_channels_last(out["pixel_values"][i])
        np.testing.assert_allclose(normalize(ours), hf, rtol=0, atol=ATOL)


def test_pad_crop_background():
    img = Image.fromarray(np.full((100, 400, 3), 255, np.uint8))
    crop = pad_crop(img, CFG)[0]
    assert tuple(crop[0, S // 2]) == PAD_COLOR == (127, 127, 127)
    assert tuple(crop[S // 2, S // 2]) == (255, 255, 255)


def test_square_crop_and_video_frames_are_direct_bicubic(hf_proc):
    rng = np.random.default_rng(6)
    frames = rng.integers(0, 256, (3, 240, 320, 3), dtype=np.uint8)
    ours = video_frames(frames, CFG)
    assert ours.shape == (3, S, S, 3) and ours.dtype == np.uint8
    for f, o in zip(frames, ours, strict=True):
        ref = hf_resize(f, (S, S), resample=PILImageResampling.BICUBIC,
                        input_data_format=ChannelDimension.LAST)  # fmt: skip
        np.testing.assert_array_equal(o, ref)
        np.testing.assert_array_equal(square_crop(Image.fromarray(f), CFG)[0], ref)
    # A square image's multi-image crop is the same direct resize (pad is a no-op).
    sq = _random_image(300, 300, 7)
    out = hf_proc([[sq, sq]], return_tensors="np")
    hf = _hf_channels_last(out["pixel_values"][0])
    np.testing.assert_allclose(normalize(square_crop(sq, CFG)), hf, rtol=0, atol=ATOL)


def test_rgba_composited_on_white_like_hf(hf_proc):
    rng = np.random.default_rng(8)
    rgba = rng.integers(0, 256, (200, 300, 4), dtype=np.uint8)
    img = Image.fromarray(rgba, mode="RGBA")
    crops, _ = anyres_crops(img, CFG)
    hf = _hf_channels_last(hf_proc([img], return_tensors="np")["pixel_values"][0])
    np.testing.assert_allclose(normalize(crops), hf, rtol=0, atol=ATOL)


def test_normalize_range_and_dtype():
    x = np.array([[0, 255, 127]], np.uint8)
    y = normalize(x)
    assert y.dtype == np.float32
    np.testing.assert_allclose(y, [[-1.0, 1.0, 127 / 127.5 - 1]], atol=1e-7)


def test_preprocess_dispatch():
    img = _random_image(480, 640, 9)
    crops, item = preprocess("anyres", img, CFG)
    assert item == VisualItem("anyres", image_size=(480, 640)) and len(crops) == 5
    for kind in ("square", "pad"):
        crops, item = preprocess(kind, img, CFG)
        assert item == VisualItem(kind) and crops.shape == (1, S, S, 3)
    frames = np.zeros((4, 64, 48, 3), np.uint8)
    crops, item = preprocess("video", frames, CFG)
    assert item == VisualItem("video", num_frames=4) and crops.shape == (4, S, S, 3)
    with pytest.raises(ValueError, match="kind"):
        preprocess("tiles", img, CFG)
