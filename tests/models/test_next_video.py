"""LLaVA-NeXT-Video vs HF `LlavaNextVideoForConditionalGeneration` (PyTorch, CPU, fp32).

Tiny random checkpoints saved with `save_pretrained` (3-layer CLIP, feature layer -2, a
Vicuna-style Llama), loaded through our converter: per-frame CLIP features pooled before
the projector (HF's `vision_resampler`: average 2x2 on an even 4x4 grid; max 2x2 on an
odd 5x5 grid, floored to 2x2), images through NeXT AnyRes, a video-only, an image-only and
a mixed prompt; max-abs-diff 1e-4 on the logits and 1e-5 on the merged input embeddings.
The export writes HF's layout back and transformers loads it with the same logits.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tokenizers
import torch

from lov_jax import architectures, visual_layout
from lov_jax.config import VideoConfig
from lov_jax.convert.hf_keys import params_to_hf
from lov_jax.convert.safetensors_io import load_hf_checkpoint
from lov_jax.models.llava_onevision import LlavaOnevision
from lov_jax.testing.hf_checkpoints import (
    Sample,
    chat_frame,
    expand,
    hf_embeds_and_logits,
    hf_logits,
    make_tiny_llava_hf,
    our_batch,
    single_image_sample,
    video_sample,
)

ATOL, EMBED_ATOL = 1e-4, 1e-5


class Loaded:
    """An HF NeXT-Video checkpoint and ours from it; one batch shape per model."""

    def __init__(self, hf_dir, length: int, crops: int):
        self.dir, self.length, self.crops = hf_dir, length, crops
        self.cfg, params = load_hf_checkpoint(hf_dir)
        self.hf = architectures.hf_class(self.cfg.architecture).from_pretrained(hf_dir).eval()
        self.params = jax.tree.map(jnp.asarray, params)
        self.frame = chat_frame(tokenizers.Tokenizer.from_file(str(hf_dir / "tokenizer.json")))
        model = LlavaOnevision(self.cfg)
        keys = ("tokens", "pixels", "vis_idx", "vis_w")

        def both(m, b):
            embeds = m.embed_inputs(*(b[k] for k in keys))
            return embeds, m(b["tokens"], b["positions"], b["segment_ids"],
                             *(b[k] for k in keys[1:]))  # fmt: skip

        self._run = jax.jit(lambda p, b: model.apply({"params": p}, b, method=both))

    def video(self, frames: int, seed: int = 0) -> Sample:
        return video_sample(frames, self.cfg, seed, frame=self.frame)

    def image(self, h: int, w: int, seed: int = 0) -> Sample:
        return single_image_sample(h, w, self.cfg, seed, frame=self.frame)

    def mixed(self, h: int, w: int, frames: int) -> Sample:
        """One image then one video in a prompt: image crops, then the frames."""
        img, vid = self.image(h, w, seed=5), self.video(frames, seed=6)
        items = img.items + vid.items
        return Sample(expand(items, self.cfg, self.frame),
                      np.concatenate([img.crops, vid.crops]), items,
                      {**img.hf_kwargs, **vid.hf_kwargs})  # fmt: skip

    def check(self, sample: Sample) -> None:
        n = len(sample.tokens)
        assert n <= self.length and len(sample.crops) <= self.crops
        batch = jax.tree.map(jnp.asarray, our_batch([sample], self.cfg, self.length, self.crops))
        hf_embeds, ref = hf_embeds_and_logits(self.hf, sample)
        embeds, logits = (np.asarray(x)[0, :n] for x in self._run(self.params, batch))
        for what, a, b, atol in (("embeds", embeds, hf_embeds, EMBED_ATOL),
                                 ("logits", logits, ref, ATOL)):  # fmt: skip
            assert a.shape == b.shape, (what, a.shape, b.shape)
            diff = float(np.max(np.abs(a - b)))
            assert diff <= atol, f"{what}: max-abs-diff {diff:.3g} > {atol}"


@pytest.fixture(scope="module")
def avg(tmp_path_factory):
    """56px CLIP (4x4 patches), average 2x2, pinpoints in multiples of 56."""
    d = make_tiny_llava_hf(
        tmp_path_factory.mktemp("next_video"), architecture="llava_next_video",
        vision={"image_size": 56}, seed=3,
        image_grid_pinpoints=[[56, 112], [112, 56], [112, 112], [168, 56], [56, 168]],
    )  # fmt: skip
    return Loaded(d, length=160, crops=8)


@pytest.fixture(scope="module")
def odd_max(tmp_path_factory):
    """70px CLIP (5x5 patches: floored to 2x2), max 2x2, GQA Llama-3-style LLM."""
    d = make_tiny_llava_hf(
        tmp_path_factory.mktemp("next_video_max"), architecture="llava_next_video",
        llm="llama3", vision={"image_size": 70}, spatial_pool_mode="max", seed=4,
        image_grid_pinpoints=[[70, 140], [140, 70], [140, 140]],
    )  # fmt: skip
    return Loaded(d, length=224, crops=8)


def test_loads_as_next_video(avg, odd_max):
    for ld, mode in ((avg, "average"), (odd_max, "max")):
        cfg = ld.cfg
        assert (cfg.architecture, cfg.vision.kind, cfg.vision.num_layers) == (
            "llava_next_video", "clip", 2)  # fmt: skip
        assert cfg.video == VideoConfig(mode, 2, True, "no_token")
        assert "image_newline" in ld.params and "faster_token" not in ld.params
    assert avg.cfg.video_pool_size == 2 and odd_max.cfg.video_pool_size == 2


def test_video_parity(avg, odd_max):
    avg.check(avg.video(3))
    odd_max.check(odd_max.video(4, seed=2))


def test_image_parity(avg):
    avg.check(avg.image(60, 100))  # a 1x2 grid, unpadded on the height


def test_mixed_prompt_parity(avg, odd_max):
    avg.check(avg.mixed(90, 50, 2))
    odd_max.check(odd_max.mixed(150, 100, 3))


def test_video_token_counts_are_hf_processor_and_model_counts(avg, odd_max):
    """HF's processor expands <video> to (S/p)^2 // 4 per frame: our count on an even grid.
    On an odd grid it says 25 // 4 = 6 per frame, the pooler gives 2x2 = 4 (HF's model
    then rejects its own processor's ids): ours is the model's."""
    from data_pipelines.hf_processor import load_hf_processor

    for ld, hf_per_frame in ((avg, 4), (odd_max, 6)):
        proc = load_hf_processor(ld.dir)
        s = ld.video(3)
        px = s.hf_kwargs["pixel_values_videos"]
        text = proc.replace_video_token({"pixel_values_videos": px}, 0)
        assert text.count(proc.video_token) == 3 * hf_per_frame
        with torch.no_grad():
            pooled = ld.hf.model.get_video_features(
                torch.from_numpy(px), vision_feature_layer=ld.hf.config.vision_feature_layer,
                vision_feature_select_strategy="default",
            ).pooler_output  # fmt: skip
        assert pooled.shape[1] == visual_layout.num_tokens(s.items[0], ld.cfg) == 12


def test_export_loads_unchanged_with_the_same_logits(avg, tmp_path):
    """ours -> HF layout -> LlavaNextVideoForConditionalGeneration: no missing or
    unexpected keys, the same logits on a mixed prompt; config keys round-trip."""
    from safetensors.numpy import save_file

    params = jax.tree.map(np.asarray, avg.params)
    hf_cfg = avg.cfg.to_hf_config()
    assert (hf_cfg["spatial_pool_mode"], hf_cfg["spatial_pool_stride"]) == ("average", 2)
    assert architectures.from_hf_config(hf_cfg, token_ids=avg.cfg.ids) == avg.cfg
    save_file(params_to_hf(params, avg.cfg), str(tmp_path / "model.safetensors"),
              metadata={"format": "pt"})  # fmt: skip
    (tmp_path / "config.json").write_text(json.dumps(hf_cfg))
    cls = architectures.hf_class("llava_next_video")
    model, info = cls.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    s = avg.mixed(90, 50, 2)
    np.testing.assert_array_equal(hf_logits(model.eval(), s), hf_logits(avg.hf, s))
    with pytest.raises(ValueError, match="spatial_pool_mode"):
        architectures.from_hf_config({**hf_cfg, "spatial_pool_mode": "conv"})


def test_check_parity_and_greedy_generate_video_equal_hf(avg, tmp_path, capsys):
    """`lov-jax check-parity --video --image` passes with HF's own <video> expansion, and
    `lov-jax generate --video` (greedy) gives HF generate's tokens on the same mp4."""
    from PIL import Image

    from data_pipelines.hf_processor import load_hf_processor
    from data_pipelines.video import write_video
    from lov_jax import cli, parity
    from lov_jax.inference.prompting import Prompter

    rng = np.random.default_rng(7)
    video, image = tmp_path / "v.mp4", tmp_path / "a.png"
    write_video(video, rng.integers(0, 256, (6, 48, 64, 3), dtype=np.uint8))
    Image.fromarray(rng.integers(0, 256, (40, 90, 3), np.uint8)).save(image)
    argv = ["check-parity", "--hf", str(avg.dir), "--video", str(video), "--image", str(image),
            "--num-frames", "3"]  # fmt: skip
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "ids equal: True" in printed and "parity: PASS" in printed

    request = parity.load_request("Describe it.", (), str(video), 3)
    tokens, crops, _ = parity.our_inputs(avg.cfg, Prompter.from_checkpoint(avg.dir), request)
    inputs = parity.hf_inputs(load_hf_processor(avg.dir), avg.cfg, request, crops)
    np.testing.assert_array_equal(inputs["input_ids"][0].numpy(), tokens)
    with torch.no_grad():
        out = avg.hf.generate(
            **inputs,
            max_new_tokens=6,
            do_sample=False,
            pad_token_id=avg.cfg.ids.pad,
            eos_token_id=list(avg.cfg.ids.eos),
        )
    want = out[0, len(tokens):].tolist()  # fmt: skip
    argv = ["generate", "--ckpt", str(avg.dir), "--prompt", "Describe it.", "--video",
            str(video), "--num-frames", "3", "--max-new-tokens", "6", "--json"]  # fmt: skip
    assert cli.main(argv) == 0
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert record["token_ids"] == want, (record["token_ids"], want)


def test_lmms_lab_layout_both_ways(avg, odd_max, tmp_path):
    """The original (lmms-lab) LLaVA-NeXT-Video config: `mm_resampler_type: spatial_pool`
    with `mm_spatial_pool_*`; its tensors are the original NeXT names (no pooler weights)."""
    from lov_jax.convert.hf_keys import flatten, hf_to_params

    tower = tmp_path / architectures.ORIGINAL_TOWER_DIR
    tower.mkdir()
    for ld, mode in ((avg, "average"), (odd_max, "max")):
        cfg = ld.cfg
        orig = architectures.to_original_config(cfg)
        assert (orig["mm_resampler_type"], orig["mm_spatial_pool_mode"]) == ("spatial_pool", mode)
        (tower / "config.json").write_text(json.dumps(architectures.tower_to_hf(cfg)))
        read = architectures.from_hf_config(orig, checkpoint_dir=tmp_path, token_ids=cfg.ids)
        assert read == cfg
        params = jax.tree.map(np.asarray, ld.params)
        tensors = params_to_hf(params, cfg, layout="lmms_lab")
        assert "model.mm_projector.0.weight" in tensors and "model.image_newline" in tensors
        got, want = flatten(hf_to_params(tensors, cfg)), flatten(params)
        assert sorted(got) == sorted(want)
        for k in want:
            np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    for bad, key in (({"mm_spatial_pool_mode": "conv"}, "mm_spatial_pool_mode"),
                     ({"mm_resampler_type": "perceiver"}, "mm_resampler_type"),
                     ({"mm_patch_merge_type": "flat"}, "mm_resampler_type")):  # fmt: skip
        with pytest.raises(ValueError, match=key):
            architectures.from_hf_config({**orig, **bad}, checkpoint_dir=tmp_path)
