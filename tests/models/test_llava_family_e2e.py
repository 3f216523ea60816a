"""End-to-end parity of the LLaVA-1.5 / NeXT model with HF (PyTorch, CPU, fp32):
`LlavaForConditionalGeneration` (CLIP + Vicuna-style Llama) and
`LlavaNextForConditionalGeneration` (CLIP + Mistral with a 64-token window, far shorter
than the prompts; CLIP + Llama-3-style GQA), tiny random checkpoints saved with
`save_pretrained` and loaded through our converter, on several aspect ratios and on
multi-turn prompts with an image per turn. Max-abs-diff 1e-4 on every position, for the
logits and for the LLM's input embeddings (the merged visual features: O(1) values, so the
vision path is checked at full strength even where a tiny LLM's logits are small)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tokenizers

from lov_jax.convert.safetensors_io import load_hf_checkpoint
from lov_jax.models.llava_onevision import LlavaOnevision
from lov_jax.testing.hf_checkpoints import (
    chat_frame,
    hf_embeds_and_logits,
    make_tiny_llava_hf,
    multi_turn_sample,
    our_batch,
    single_image_sample,
)

ATOL = 1e-4
# The tiny projector's outputs are ~0.07 (HF's N(0, 0.02) init): 1e-5 is 1e-4 relative.
EMBED_ATOL = 1e-5


class Loaded:
    """An HF checkpoint and ours from it. Our batches have one fixed shape per model
    (`length` tokens, `crops` slots; the rest padding), so each model compiles once."""

    def __init__(self, hf_dir, length: int, crops: int):
        self.length, self.crops = length, crops
        from lov_jax.architectures import hf_class

        self.cfg, params = load_hf_checkpoint(hf_dir)
        self.hf = hf_class(self.cfg.architecture).from_pretrained(hf_dir).eval()
        self.params = jax.tree.map(jnp.asarray, params)
        self.frame = chat_frame(tokenizers.Tokenizer.from_file(str(hf_dir / "tokenizer.json")))
        model = LlavaOnevision(self.cfg)
        self._logits = jax.jit(lambda p, b: model.apply({"params": p}, **b))
        keys = ("tokens", "pixels", "vis_idx", "vis_w")
        self._embeds = jax.jit(
            lambda p, b: model.apply({"params": p}, *(b[k] for k in keys), method="embed_inputs")
        )

    def sample(self, h, w, seed=0, kind=None):
        return single_image_sample(h, w, self.cfg, seed, frame=self.frame, kind=kind)

    def check(self, sample):
        """Our logits and input embeddings == HF's; returns our embeddings."""
        n = len(sample.tokens)
        assert n <= self.length and len(sample.crops) <= self.crops
        batch = jax.tree.map(jnp.asarray, our_batch([sample], self.cfg, self.length, self.crops))
        hf_embeds, ref = hf_embeds_and_logits(self.hf, sample)
        ours = np.asarray(self._embeds(self.params, batch))[0, :n]
        logits = np.asarray(self._logits(self.params, batch))[0, :n]
        for what, a, b, atol in (("embeds", ours, hf_embeds, EMBED_ATOL),
                                 ("logits", logits, ref, ATOL)):  # fmt: skip
            assert a.shape == b.shape, (what, a.shape, b.shape)
            diff = float(np.max(np.abs(a - b)))
            assert diff <= atol, f"{what}: max-abs-diff {diff:.3g} > {atol}"
        return ours


@pytest.fixture(scope="module")
def llava15(tmp_path_factory):
    d = make_tiny_llava_hf(tmp_path_factory.mktemp("llava15"), llm="vicuna")
    return Loaded(d, length=1280, crops=2)


@pytest.fixture(scope="module")
def next_mistral(tmp_path_factory):
    d = make_tiny_llava_hf(
        tmp_path_factory.mktemp("next_mistral"), architecture="llava_next", llm="mistral",
        sliding_window=64, seed=1,
    )  # fmt: skip
    return Loaded(d, length=2432, crops=5)


@pytest.fixture(scope="module")
def next_llama3(tmp_path_factory):
    d = make_tiny_llava_hf(
        tmp_path_factory.mktemp("next_llama3"), architecture="llava_next", llm="llama3", seed=2
    )
    return Loaded(d, length=3968, crops=8)


def test_llava15_loads_as_the_family_it_is(llava15):
    cfg = llava15.cfg
    assert (cfg.architecture, cfg.vision.kind, cfg.text.kind) == ("llava", "clip", "llama")
    assert cfg.vision.num_layers == 2 and cfg.vision.num_features == 576  # -2 of 3 layers
    assert not cfg.has_image_newline and "image_newline" not in llava15.params


@pytest.mark.parametrize("size, kind", [((336, 336), None), ((300, 517), None),
                                        ((300, 517), "pad")])  # fmt: skip
def test_llava15_parity(llava15, size, kind):
    sample = llava15.sample(*size, kind=kind)
    assert (sample.tokens == llava15.cfg.ids.image).sum() == 576
    ours = llava15.check(sample)
    visual = sample.tokens == llava15.cfg.ids.image
    assert np.abs(ours[visual]).mean() > 100 * EMBED_ATOL  # real features, not zeros


def test_llava15_multi_turn_parity(llava15):
    llava15.check(multi_turn_sample([(336, 336), (200, 400)], llava15.cfg, frame=llava15.frame))


# (H, W): unpad along H, unpad along W, a 1x3 grid (4 crops), a small image (HF's 1x2)
NEXT_SIZES = [(480, 640), (640, 479), (100, 900), (200, 300)]


@pytest.mark.parametrize("size", NEXT_SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_next_mistral_parity(next_mistral, size):
    cfg = next_mistral.cfg
    assert (cfg.text.kind, cfg.text.sliding_window, cfg.vision_aspect_ratio) == (
        "mistral", 64, "anyres",
    )  # fmt: skip
    sample = next_mistral.sample(*size)
    assert len(sample.tokens) > 10 * cfg.text.sliding_window
    next_mistral.check(sample)


@pytest.mark.parametrize("size", [(1000, 300)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_next_llama3_parity(next_llama3, size):
    assert next_llama3.cfg.text.num_kv_heads * 4 == next_llama3.cfg.text.num_heads
    next_llama3.check(next_llama3.sample(*size))


def test_next_multi_turn_parity(next_llama3):
    sizes = [(480, 640), (300, 200)]  # different crop counts: HF zero-pads the second
    next_llama3.check(multi_turn_sample(sizes, next_llama3.cfg, frame=next_llama3.frame))
