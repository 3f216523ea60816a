"""PEFT interop: our adapters load with PeftModel.from_pretrained on the HF class and give
our logits; an adapter made and randomised in PyTorch imports and gives PEFT's logits
(plain and rsLoRA scaling); the merged checkpoint equals the adapter forward."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tokenizers
from flax import traverse_util

from lov_jax.architectures import hf_class
from lov_jax.convert.safetensors_io import load_hf_checkpoint, read_safetensors
from lov_jax.lora import adapters, peft_io
from lov_jax.models.llava_onevision import LlavaOnevision
from lov_jax.testing.hf_checkpoints import (
    chat_frame,
    hf_logits,
    make_tiny_hf,
    make_tiny_llava_hf,
    our_batch,
    single_image_sample,
)

ATOL = 1e-4


class Model:
    def __init__(self, hf_dir, length):
        self.dir, self.length = hf_dir, length
        self.cfg, params = load_hf_checkpoint(hf_dir)
        self.params = jax.tree.map(np.asarray, params)
        frame = chat_frame(tokenizers.Tokenizer.from_file(str(hf_dir / "tokenizer.json")))
        self.sample = single_image_sample(300, 200, self.cfg, seed=3, frame=frame)
        n = len(self.sample.crops)
        self.batch = jax.tree.map(jnp.asarray, our_batch([self.sample], self.cfg, length, n))
        self.module = LlavaOnevision(self.cfg)

    def hf(self):
        return hf_class(self.cfg.architecture).from_pretrained(self.dir).eval()

    def logits(self, params, lora=None) -> np.ndarray:
        b = self.batch
        keys = ("tokens", "positions", "segment_ids", "pixels", "vis_idx", "vis_w")
        args = tuple(b[k] for k in keys)
        if lora is None:
            out = self.module.apply({"params": params}, *args)
        else:
            out = lora.apply(self.module, {"params": params}, *args)
        return np.asarray(out)[0, : len(self.sample.tokens)]


@pytest.fixture(scope="module", params=["llava_onevision", "llava"])
def model(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    if request.param == "llava":  # CLIP + Vicuna (MHA, no q/k/v bias), one crop: 576 tokens
        return Model(make_tiny_llava_hf(root / "hf", llm="vicuna", seed=2), 640)
    # SigLIP + Qwen-2 (GQA, q/k/v biases), anyres crops; a 700-token ChatML BPE
    return Model(make_tiny_hf(root / "hf", vocab_size=700, seed=2), 2048)


def _randomise(params, seed, scale=0.05):
    rng = np.random.default_rng(seed)
    flat = traverse_util.flatten_dict(params)
    for k, x in flat.items():
        if k[-1] in ("lora_a", "lora_b"):
            flat[k] = (rng.normal(size=x.shape) * scale).astype(np.float32)
    return traverse_util.unflatten_dict(flat)


def test_our_adapter_loads_in_peft_with_our_logits(model, tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model

    lora = adapters.Lora(adapters.LoraConfig(r=4, alpha=8, dropout=0.0), model.cfg)
    params = _randomise(lora.init(model.params), seed=0)
    proj = jax.tree.map(lambda x: x * 1.5 + 0.01, params["multi_modal_projector"])
    params = {**params, "multi_modal_projector": proj}
    out = peft_io.export_adapter(
        params, lora, tmp_path / "adapter", trained={"multi_modal_projector": proj}
    )
    ours = model.logits(params, lora)
    peft_model = PeftModel.from_pretrained(model.hf(), out).eval()
    ref = hf_logits(peft_model, model.sample)
    assert np.abs(ours - ref).max() < ATOL
    assert np.abs(ours - model.logits(model.params)).max() > 1e-2  # the adapter matters
    # merged weights == the adapter forward
    np.testing.assert_allclose(model.logits(lora.merge(params)), ours, atol=ATOL)
    # our file has exactly the keys and shapes PEFT itself saves for this config
    peft_cfg = LoraConfig(
        r=4, lora_alpha=8, target_modules=peft_io._target_regex(lora.targets),
        modules_to_save=["multi_modal_projector"],
    )  # fmt: skip
    get_peft_model(model.hf(), peft_cfg).save_pretrained(tmp_path / "peft")
    theirs = read_safetensors(tmp_path / "peft" / peft_io.WEIGHTS_NAME)
    mine = read_safetensors(out / peft_io.WEIGHTS_NAME)
    assert {k: tuple(theirs[k].shape) for k in theirs} == {k: tuple(mine[k].shape) for k in mine}
    assert "base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_A.weight" in mine


@pytest.mark.parametrize("rslora", [False, True])
def test_peft_adapter_imports_with_peft_logits(model, tmp_path, rslora):
    import torch
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer

    torch.manual_seed(5)
    hf = model.hf()
    peft_cfg = LoraConfig(
        r=8, lora_alpha=16, use_rslora=rslora, lora_dropout=0.1,
        target_modules=["q_proj", "v_proj", "o_proj", "down_proj"],
        exclude_modules=r".*vision_tower.*", layers_to_transform=[1], layers_pattern="layers",
    )  # fmt: skip
    peft_model = get_peft_model(hf, peft_cfg)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:  # nonzero B: a trained adapter
                p.copy_(torch.randn_like(p) * 0.1)
    peft_model.save_pretrained(tmp_path / "adapter")
    peft_model.eval()
    scale = {m.scaling["default"] for m in peft_model.modules() if isinstance(m, LoraLayer)}
    ref = hf_logits(peft_model, model.sample)

    lora, ada, trained = peft_io.import_adapter(tmp_path / "adapter", model.cfg)
    assert scale == {lora.scaling} == {16 / (np.sqrt(8) if rslora else 8)}
    assert sorted(p.rsplit("/", 1)[-1] for p in lora.targets) == [
        "down_proj", "o_proj", "q_proj", "v_proj"
    ]  # fmt: skip
    assert not trained
    a = ada["language_model"]["layers"]["self_attn"]["q_proj"]["lora_a"]
    assert not a[0].any() and a[1].any()  # layers_to_transform=[1]: layer 0 has no delta
    params = traverse_util.unflatten_dict(
        {**traverse_util.flatten_dict(model.params), **traverse_util.flatten_dict(ada)}
    )
    assert np.abs(model.logits(params, lora) - ref).max() < ATOL
    merged = peft_io.apply_adapter(model.params, tmp_path / "adapter", model.cfg)
    assert np.abs(model.logits(merged) - ref).max() < ATOL


def test_bad_adapter_dirs(model, tmp_path):
    import json

    from lov_jax.convert.hf_keys import CheckpointError

    with pytest.raises(CheckpointError, match="no adapter_config.json"):
        peft_io.import_adapter(tmp_path, model.cfg)
    lora = adapters.Lora(adapters.LoraConfig(r=2, alpha=2), model.cfg)
    out = peft_io.export_adapter(lora.init(model.params), lora, tmp_path / "a")
    raw = json.loads((out / peft_io.CONFIG_NAME).read_text())
    (out / peft_io.CONFIG_NAME).write_text(json.dumps({**raw, "r": 3, "use_dora": True}))
    with pytest.raises(CheckpointError) as err:
        peft_io.import_adapter(out, model.cfg)
    assert "use_dora=True" in str(err.value)
    (out / peft_io.CONFIG_NAME).write_text(json.dumps({**raw, "r": 3}))
    with pytest.raises(CheckpointError, match=r"lora_A.weight: shape \[2, .*\], expected \[3,"):
        peft_io.import_adapter(out, model.cfg)
