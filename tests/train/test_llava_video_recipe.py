"""configs/llava_video.py (../shared/REFERENCE_VIDEO_POST.md 2.5-2.7): it sets what the
LLaVA-Video script changes; a 64-frame record becomes 13440 grid video tokens and 64 crops
with the time instruction in its text; two of them fill a row's token and crop budgets;
the 7B preset's forward traces at the recipe's budgets (what `lov-jax plan` lowers; the
plan itself needs libtpu, absent here, and then exits 2 naming it)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from configs import common, llava_video
from lov_jax import config as model_config
from lov_jax.train.config_loading import load_config

ROOT = Path(__file__).resolve().parents[2]


def _flat(c, prefix=""):
    out = {}
    for k, v in c.items():
        out.update(_flat(v, f"{prefix}{k}.") if hasattr(v, "items") else {f"{prefix}{k}": v})
    return out


def test_recipe_sets_what_the_script_changes():
    for preset in llava_video.PRESETS:
        c = load_config(f"{ROOT}/configs/llava_video.py:{preset}")
        a, b = _flat(c), _flat(common.base_config(preset, llava_video.PRESETS))
        assert a.keys() == b.keys()
        assert {k: v for k, v in a.items() if v != b[k]} == {
            "data.train_path": "llava_video.yaml", "data.frames_upbound": 64,
            "data.force_sample": True, "data.add_time_instruction": True,
            "data.max_crops": 128, "train.ckpt_every": 500, "model.video_newline": "grid",
        }  # fmt: skip
        assert (c.optim.lr, c.optim.vision_lr, c.data.seq_len) == (1e-5, 2e-6, 32768)
        cfg = model_config.preset(preset)
        assert cfg.video.newline == "grid" and cfg.video.pool_stride == 2
    assert model_config.preset("llava_video_7b").text.num_layers == 28  # Qwen-2 7B
    with pytest.raises(ValueError, match="unknown model preset"):
        llava_video.get_config("ov_7b")


def test_recipe_trains_grid_newlines_from_a_one_token_checkpoint(monkeypatch):
    """init_from a OneVision checkpoint (mm_newline_position one_token in its config): the
    recipe's model.video_newline wins; "" keeps the checkpoint's; a bad value names the key."""
    import dataclasses

    from lov_jax import pretrained
    from lov_jax.train.run import model_from_config

    ov = model_config.preset("tiny")  # OneVision: one newline after each video
    assert ov.video.newline == "one_token"
    monkeypatch.setattr(pretrained, "load_pretrained", lambda path, dtype: (ov, "params"))
    c = llava_video.get_config("tiny_llava_video")
    c.init_from = "/ckpt/ov"
    cfg, params = model_from_config(c)
    assert cfg.video == dataclasses.replace(ov.video, newline="grid") and params == "params"
    c.model.video_newline = ""
    assert model_from_config(c)[0].video.newline == "one_token"
    c.model.video_newline = "per_row"
    with pytest.raises(ValueError, match="model.video_newline 'per_row'"):
        model_from_config(c)


@pytest.fixture(scope="module")
def video_sample(tmp_path_factory):
    """A 90-frame 10 fps clip (9 s; 1 fps would give 9 frames, force_sample gives 64)."""
    from data_pipelines.video import write_video
    from lov_jax.train import run

    path = tmp_path_factory.mktemp("v") / "clip.mp4"
    rng = np.random.default_rng(0)
    write_video(path, rng.integers(0, 256, (90, 36, 48, 3), dtype=np.uint8), fps=10, gop=12)
    c = llava_video.get_config("tiny_llava_video")
    from data_pipelines.tokenizer import qwen2_token_ids

    tok = run.load_tokenizer_for(c)
    cfg = model_config.preset("tiny_llava_video", token_ids=qwen2_token_ids(tok))
    record = {"id": "v1", "video": str(path), "conversations": [
        {"from": "human", "value": "<image>\nWhat happens?"},
        {"from": "gpt", "value": "Noise."}]}  # fmt: skip
    return run.make_process_fn(c, cfg, tok)(record), tok, c


def test_64_frame_record_tokens_and_time_instruction(video_sample):
    sample, tok, _ = video_sample
    assert sample.crops.shape[0] == 64 and sample.items[0].num_frames == 64
    video_id = tok.token_to_id("<video>")
    assert video_id is not None
    assert int(np.sum(sample.tokens == video_id)) == 64 * 14 * 15  # reference 2.7, grid
    text = tok.decode([int(t) for t in sample.tokens if t != video_id])
    times = ",".join(f"{i / 10:.2f}s" for i in np.linspace(0, 89, 64, dtype=int))
    assert (
        "The video lasts for 9.00 seconds, and 64 frames are uniformly sampled from it. "
        f"These frames are located at {times}.Please answer the following questions "
        "related to this video.\n\nWhat happens?"
    ) in text


def test_two_videos_fill_both_row_budgets(video_sample):
    from data_pipelines import packing

    sample, _, c = video_sample
    t, n = len(sample.tokens), sample.crops.shape[0]
    pack = packing.PackConfig(max_tokens=c.data.seq_len, max_crops=c.data.max_crops)
    row = packing.select_row(np.array([t] * 3), np.array([n] * 3), pack)
    assert len(row) == 2  # the third fits neither budget
    assert 2 * n == c.data.max_crops and 2 * t / c.data.seq_len > 0.8


def test_7b_forward_traces_at_the_recipe_budgets_and_plan_reads_it(capsys):
    import flax.linen as nn
    import jax

    from lov_jax import batch
    from lov_jax.cli import main
    from lov_jax.models.llava_onevision import LlavaOnevision, abstract_params
    from lov_jax.plan import topology

    c = llava_video.get_config("llava_video_7b")
    cfg = model_config.preset("llava_video_7b")
    leaves = nn.meta.unbox(abstract_params(cfg))
    keys = ("tokens", "positions", "segment_ids", "pixels", "vis_idx", "vis_w")
    inputs = batch.abstract_batch(1, c.data.seq_len, c.data.max_crops, cfg, keys=keys)
    out = jax.eval_shape(
        lambda p, b: LlavaOnevision(cfg).apply({"params": p}, **b, output="hidden"), leaves, inputs
    )
    assert out.shape == (1, 32768, 3584)
    if not topology.libtpu_available():
        rc = main(["plan", "--config", f"{ROOT}/configs/llava_video.py:llava_video_7b",
                   "--topology", "v5p-128"])  # fmt: skip
        assert rc == 2 and "libtpu" in capsys.readouterr().err
