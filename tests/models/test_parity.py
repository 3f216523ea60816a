"""Parity with HF `LlavaOnevisionForConditionalGeneration` (PyTorch, CPU, fp32).

Tiny random HF models are saved with `save_pretrained`, loaded through our
converter, and compared tower by tower, then end to end, at max-abs-diff 1e-4.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import LlavaOnevisionForConditionalGeneration

from lov_jax.convert.safetensors_io import load_hf_checkpoint
from lov_jax.models.decoder import Decoder
from lov_jax.models.llava_onevision import LlavaOnevision
from lov_jax.models.projector import MultiModalProjector
from lov_jax.models.siglip import SiglipVisionTower
from lov_jax.testing.hf_checkpoints import (
    hf_logits,
    make_tiny_hf,
    multi_image_sample,
    our_batch,
    single_image_sample,
    text_sample,
    to_hf_pixels,
    video_sample,
)

ATOL = 1e-4

# (H, W) chosen to hit: odd padding, unpad along H, unpad along W, the anyres_max_9
# downsample (ratio > 1.1), a 1xK grid, and an exact-fit square.
IMAGE_SIZES = [(480, 640), (640, 479), (301, 997), (1080, 1920), (100, 3000), (384, 384)]


class Loaded:
    def __init__(self, hf_dir):
        self.hf = LlavaOnevisionForConditionalGeneration.from_pretrained(hf_dir).eval()
        self.cfg, params = load_hf_checkpoint(hf_dir)
        self.params = jax.tree.map(jnp.asarray, params)
        self.model = LlavaOnevision(self.cfg)
        self._logits = jax.jit(
            lambda p, b: self.model.apply({"params": p}, **b)  # noqa: B023
        )

    def logits(self, batch) -> np.ndarray:
        return np.asarray(self._logits(self.params, jax.tree.map(jnp.asarray, batch)))


@pytest.fixture(scope="module")
def tied(tmp_path_factory):
    return Loaded(make_tiny_hf(tmp_path_factory.mktemp("tied"), tie_word_embeddings=True))


@pytest.fixture(scope="module")
def untied_gqa4(tmp_path_factory):
    # GQA ratio 4 (8 query heads over 2 kv heads) and a separate lm_head.
    hf_dir = make_tiny_hf(
        tmp_path_factory.mktemp("untied"), tie_word_embeddings=False, num_heads=8,
        num_kv_heads=2, seed=1,
    )  # fmt: skip
    return Loaded(hf_dir)


def _check(ours: np.ndarray, ref: np.ndarray):
    assert ours.shape == ref.shape
    diff = float(np.max(np.abs(ours - ref)))
    assert diff <= ATOL, f"max-abs-diff {diff:.3g} > {ATOL}"
    assert np.mean(ours.argmax(-1) == ref.argmax(-1)) == 1.0


# ---- towers ---------------------------------------------------------------------------


def test_siglip_tower_parity(tied):
    rng = np.random.default_rng(0)
    crops = rng.integers(0, 256, (2, 384, 384, 3), dtype=np.uint8)
    with torch.no_grad():
        out = tied.hf.model.vision_tower(
            torch.from_numpy(to_hf_pixels(crops)), output_hidden_states=True
        )
    ref = out.hidden_states[-1].numpy()  # pre post_layernorm
    tower = SiglipVisionTower(tied.cfg.vision)
    ours = tower.apply({"params": tied.params["vision_tower"]}, jnp.asarray(crops))
    _check(np.asarray(ours), ref)
    # post_layernorm must NOT be applied: the two differ on this random model.
    assert np.max(np.abs(out.last_hidden_state.numpy() - ref)) > 10 * ATOL


def test_projector_parity(tied):
    x = np.random.default_rng(1).normal(size=(3, 729, tied.cfg.vision.hidden_size))
    x = x.astype(np.float32)
    with torch.no_grad():
        ref = tied.hf.model.multi_modal_projector(torch.from_numpy(x)).numpy()
    proj = MultiModalProjector(tied.cfg.text.hidden_size)
    ours = proj.apply({"params": tied.params["multi_modal_projector"]}, jnp.asarray(x))
    _check(np.asarray(ours), ref)


@pytest.mark.parametrize("fixture", ["tied", "untied_gqa4"])
def test_qwen2_parity(fixture, request):
    loaded = request.getfixturevalue(fixture)
    cfg = loaded.cfg.text
    ids = np.random.default_rng(2).integers(0, 151643, (2, 37))
    with torch.no_grad():
        ref = loaded.hf.model.language_model(input_ids=torch.from_numpy(ids)).last_hidden_state
        ref_logits = loaded.hf.lm_head(ref).numpy()
    lm = Decoder(cfg)
    variables = {"params": loaded.params["language_model"]}
    positions = np.broadcast_to(np.arange(37), (2, 37))
    ours = lm.apply(variables, jnp.asarray(ids), jnp.asarray(positions), jnp.ones((2, 37)))
    _check(np.asarray(ours), ref_logits)


# ---- end to end -----------------------------------------------------------------------


@pytest.mark.parametrize("size", IMAGE_SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_single_image_parity(tied, size):
    sample = single_image_sample(*size, tied.cfg)
    batch = our_batch([sample], tied.cfg, length=len(sample.tokens), num_crops=len(sample.crops))
    _check(tied.logits(batch)[0], hf_logits(tied.hf, sample))


def test_multi_image_parity(untied_gqa4):
    cfg = untied_gqa4.cfg
    sample = multi_image_sample([(300, 500), (640, 480), (384, 384)], cfg)
    assert len(sample.tokens) > 3 * 730
    batch = our_batch([sample], cfg, length=len(sample.tokens), num_crops=3)
    _check(untied_gqa4.logits(batch)[0], hf_logits(untied_gqa4.hf, sample))


def test_video_parity(untied_gqa4):
    cfg = untied_gqa4.cfg
    sample = video_sample(4, cfg)
    batch = our_batch([sample], cfg, length=len(sample.tokens), num_crops=4)
    _check(untied_gqa4.logits(batch)[0], hf_logits(untied_gqa4.hf, sample))


@pytest.mark.parametrize("fixture", ["tied", "untied_gqa4"])
def test_text_only_parity(fixture, request):
    loaded = request.getfixturevalue(fixture)
    sample = text_sample()
    batch = our_batch([sample], loaded.cfg, length=len(sample.tokens), num_crops=0)
    _check(loaded.logits(batch)[0], hf_logits(loaded.hf, sample))


def test_padded_batch_and_packed_row_match_unpacked_hf(tied):
    """Right-padded rows and a packed row (3 segments) both equal per-sample HF logits."""
    cfg = tied.cfg
    samples = [single_image_sample(500, 300, cfg, seed=3), text_sample(), video_sample(2, cfg)]
    refs = [hf_logits(tied.hf, s) for s in samples]
    total_tokens = sum(len(s.tokens) for s in samples)
    total_crops = sum(len(s.crops) for s in samples)

    padded = our_batch(samples, cfg, length=total_tokens + 5, num_crops=total_crops)
    logits = tied.logits(padded)
    for row, (s, ref) in enumerate(zip(samples, refs, strict=True)):
        _check(logits[row, : len(s.tokens)], ref)

    packed = our_batch(samples, cfg, length=total_tokens + 7, num_crops=total_crops + 1, pack=True)
    logits = tied.logits(packed)[0]
    start = 0
    for s, ref in zip(samples, refs, strict=True):
        _check(logits[start : start + len(s.tokens)], ref)
        start += len(s.tokens)
