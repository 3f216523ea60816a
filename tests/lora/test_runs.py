"""A LoRA training run end to end: checkpoints hold adapters + projector only and resume;
`orbax-to-peft` gives an adapter PEFT loads and a merged HF dir transformers loads, both
with the run's logits; `peft-to-orbax` merges back into an Orbax checkpoint."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import tokenizers

from configs import stage2_ov
from lov_jax.architectures import hf_class
from lov_jax.cli import main
from lov_jax.convert import orbax_io
from lov_jax.lora import adapters
from lov_jax.models.llava_onevision import LlavaOnevision
from lov_jax.pretrained import load_pretrained
from lov_jax.testing.batches import SyntheticBatches
from lov_jax.testing.hf_checkpoints import (
    chat_frame,
    hf_logits,
    make_tiny_hf,
    our_batch,
    single_image_sample,
)
from lov_jax.train.loop import run_training

ATOL = 1e-4


def _stage(src):
    c = stage2_ov.get_config("tiny")
    c.init_from = str(src)
    c.mesh.num_devices = 1
    c.optim.trainable = ("projector", "llm")
    c.optim.lr = 1e-2
    c.optim.warmup_ratio = 0.0
    c.train.ckpt_every = 1
    c.train.loss_chunk = 64
    c.lora = ml_collections.ConfigDict(
        {"enabled": True, "r": 4, "alpha": 8.0, "dropout": 0.05, "use_rslora": True}
    )
    return c


def _data():
    return SyntheticBatches(rows=1, length=48, crops=1, vocab=700, image_size=384, patches=729)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora_run")
    src = make_tiny_hf(root / "hf", vocab_size=700, seed=4)
    stage = _stage(src)
    cfg, params = load_pretrained(src)
    work = root / "work"
    first = run_training(stage, cfg, work, _data(), lambda: params, 2, progress=False)
    data = _data()
    resumed = run_training(stage, cfg, work, data, lambda: params, 3, progress=False)
    return src, cfg, params, work, first, resumed


def test_checkpoint_holds_trained_leaves_and_resumes(run):
    src, cfg, params, work, first, resumed = run
    assert resumed.resumed_from == 2 and resumed.final_step == 3
    stored = orbax_io.param_metadata(orbax_io.resolve_checkpoint(work))
    assert stored and all(
        p.startswith("multi_modal_projector/") or p.endswith(("/lora_a", "/lora_b")) for p in stored
    ), sorted(stored)
    assert sum(p.endswith("/lora_a") for p in stored) == len(adapters.LLM_PROJECTIONS)
    # the resumed state's frozen base is the init's, bit for bit
    state = jax.device_get(resumed.state.params)
    np.testing.assert_array_equal(
        state["language_model"]["embed_tokens"]["embedding"],
        params["language_model"]["embed_tokens"]["embedding"],
    )


def test_exports_load_in_peft_and_transformers(run, tmp_path):
    from peft import PeftModel

    src, cfg, params, work, _, resumed = run
    assert main(["convert", "orbax-to-peft", "--ckpt", str(work), "--out",
                 str(tmp_path / "adapter")]) == 0  # fmt: skip
    assert main(["convert", "orbax-to-peft", "--ckpt", str(work), "--out",
                 str(tmp_path / "merged"), "--merge"]) == 0  # fmt: skip
    assert main(["convert", "peft-to-orbax", "--base", str(src), "--adapter",
                 str(tmp_path / "adapter"), "--out", str(tmp_path / "orbax")]) == 0  # fmt: skip

    frame = chat_frame(tokenizers.Tokenizer.from_file(str(src / "tokenizer.json")))
    sample = single_image_sample(250, 410, cfg, seed=1, frame=frame)
    assert len(sample.tokens) <= 2048
    batch = jax.tree.map(jnp.asarray, our_batch([sample], cfg, 2048, len(sample.crops)))
    keys = ("tokens", "positions", "segment_ids", "pixels", "vis_idx", "vis_w")
    lora = adapters.Lora(adapters.from_config(_stage(src).lora), cfg)
    model = LlavaOnevision(cfg)
    args = tuple(batch[k] for k in keys)
    n = len(sample.tokens)
    ours = np.asarray(lora.apply(model, {"params": resumed.state.params}, *args))[0, :n]

    klass = hf_class(cfg.architecture)
    peft_model = PeftModel.from_pretrained(klass.from_pretrained(src), tmp_path / "adapter")
    assert np.abs(hf_logits(peft_model.eval(), sample) - ours).max() < ATOL
    merged = klass.from_pretrained(tmp_path / "merged").eval()
    assert np.abs(hf_logits(merged, sample) - ours).max() < ATOL
    _, back = load_pretrained(tmp_path / "orbax")
    again = np.asarray(model.apply({"params": back}, *args))[0, :n]
    assert np.abs(again - ours).max() < ATOL


def test_orbax_to_peft_refuses_a_full_run(tmp_path, capsys):
    cfg_dir = tmp_path / "full"
    from lov_jax import config
    from lov_jax.models.llava_onevision import init_params
    from lov_jax.testing.tokenizers import qwen2_token_ids

    cfg = config.tiny(token_ids=qwen2_token_ids())
    params = jax.tree.map(np.asarray, init_params(cfg, jax.random.key(0)))
    orbax_io.save_checkpoint(cfg_dir, params, cfg)
    argv = ["convert", "orbax-to-peft", "--ckpt", str(cfg_dir), "--out", str(tmp_path / "o")]
    assert main(argv) == 1
    assert "not a LoRA run" in capsys.readouterr().err
