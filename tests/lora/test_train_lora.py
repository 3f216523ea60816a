"""LoRA in the train step: only adapters (+ the projector) change, optimizer state holds only
those, the frozen base may be bf16, loss falls; config validation."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import traverse_util

from configs import stage2_ov
from lov_jax import config, sharding
from lov_jax.lora import adapters
from lov_jax.models.llava_onevision import init_params
from lov_jax.testing.batches import SyntheticBatches
from lov_jax.testing.tokenizers import qwen2_token_ids
from lov_jax.train.step import Trainer, stack_micro_batches

CFG = config.demo(token_ids=qwen2_token_ids())


def _flat(tree):
    return {"/".join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(tree).items()}


def _run(base_dtype: str, steps: int = 6):
    stage = stage2_ov.get_config("demo")
    stage.optim.trainable = ("projector", "llm")
    stage.optim.lr = 3e-3
    stage.optim.warmup_ratio = 0.0
    lcfg = adapters.LoraConfig(r=4, alpha=8, dropout=0.05, base_dtype=base_dtype, seed=3)
    lora = adapters.Lora(lcfg, CFG)
    mesh = sharding.make_mesh(devices=jax.devices()[:2])
    trainer = Trainer(CFG, stage.optim, mesh, 50, loss_chunk=32, lora=lora)
    params = jax.tree.map(np.asarray, init_params(CFG, jax.random.key(0)))
    state = trainer.init_state(params)
    before = _flat(jax.device_get(state.params))
    data = SyntheticBatches(rows=2, length=64)
    fixed = stack_micro_batches([next(data), next(data)])  # two micro-batches, one batch
    losses = []
    for _ in range(steps):
        state, out = trainer.step(state, fixed)
        losses.append(float(out["loss"]))
    return trainer, lora, state, before, losses


@pytest.fixture(scope="module", params=["bfloat16"])  # fp32 base: tests/train paths
def run(request):
    return request.param, *_run(request.param)


def test_only_adapters_and_projector_change(run):
    base_dtype, trainer, lora, state, before, losses = run
    after = _flat(jax.device_get(state.params))
    assert set(after) == set(before)
    n_adapters = 0
    for path, x in after.items():
        changed = not np.array_equal(x, before[path])
        trained = path.startswith("multi_modal_projector/") or path.endswith(("lora_a", "lora_b"))
        assert changed == trained, path
        n_adapters += path.endswith("lora_a")
        want = "float32" if trained else base_dtype
        assert x.dtype == np.dtype(want), (path, x.dtype)
    assert n_adapters == len(adapters.LLM_PROJECTIONS)
    assert losses[-1] < losses[0] - 0.05, losses


def test_optimizer_state_holds_only_trained_leaves(run):
    _, trainer, lora, state, _, _ = run
    shapes = {tuple(x.shape) for x in jax.tree.leaves(state.opt_state) if x.ndim > 0}
    trained = {k: v for k, v in trainer.labels.items() if v != "frozen"}
    assert all(k[-1] in ("lora_a", "lora_b") or k[0] == "multi_modal_projector" for k in trained)
    flat = traverse_util.flatten_dict(jax.device_get(state.params))
    want = {tuple(flat[k].shape) for k in trained}
    assert shapes == want
    # adam mu + nu per trained leaf
    assert len([x for x in jax.tree.leaves(state.opt_state) if x.ndim > 0]) == 2 * len(trained)


def test_adapters_shard_like_their_kernels(run):
    _, trainer, _, _, _, _ = run
    shard = traverse_util.flatten_dict(trainer.state_sharding.params)
    root = ("language_model", "layers", "self_attn", "q_proj")
    kernel, a, b = (shard[(*root, k)].spec for k in ("kernel", "lora_a", "lora_b"))
    # kernel [layers, embed, q_heads, head_dim]; A [layers, embed, rank]; B [layers, rank, ...]
    assert tuple(a) == (*tuple(kernel)[:2], None)
    assert tuple(b) == (tuple(kernel)[0], None, *tuple(kernel)[2:])


def test_dropout_is_keyed_and_off_without_rng():
    lora = adapters.Lora(adapters.LoraConfig(r=4, alpha=8, dropout=0.5), CFG)
    from lov_jax.models.llava_onevision import LlavaOnevision, dummy_inputs

    params = lora.init(jax.tree.map(np.asarray, init_params(CFG, jax.random.key(1))))
    flat = traverse_util.flatten_dict(params)
    rng = np.random.default_rng(0)
    for k in flat:
        if k[-1] == "lora_b":
            flat[k] = rng.normal(size=flat[k].shape).astype(np.float32)
    params = traverse_util.unflatten_dict(flat)
    model = LlavaOnevision(CFG)
    args = (np.arange(8, dtype=np.int32)[None] + 7, *dummy_inputs(CFG)[1:])
    run = jax.jit(lambda p, rngs: lora.apply(model, {"params": p}, *args, rngs=rngs))
    plain = run(params, None)
    merged = jax.jit(lambda p: model.apply({"params": p}, *args))(lora.merge(params))
    np.testing.assert_allclose(plain, merged, atol=1e-4)
    d1, d2 = (run(params, {"dropout": jax.random.key(i)}) for i in (1, 2))
    assert np.abs(d1 - plain).max() > 1e-3 and np.abs(d1 - d2).max() > 1e-3


def test_config_block_validation():
    assert adapters.from_config(None) is None
    assert adapters.from_config({"enabled": False, "r": 8}) is None
    c = adapters.from_config({"r": 16, "alpha": 32, "use_rslora": True, "targets": ["q_proj"]})
    assert c.scaling == 8.0 and c.targets == ("q_proj",)
    assert adapters.LoraConfig().scaling == 2.0  # LLaVA-1.5: r 128, alpha 256
    with pytest.raises(ValueError, match="unknown keys.*'rank'"):
        adapters.from_config({"rank": 8})
    with pytest.raises(ValueError, match="lora.dropout"):
        adapters.LoraConfig(dropout=1.0)
    with pytest.raises(ValueError, match="base_dtype"):
        adapters.LoraConfig(base_dtype="float16")
    with pytest.raises(ValueError, match=r"\['qkv'\]"):
        adapters.Lora(adapters.LoraConfig(targets=("q_proj", "qkv")), CFG)
    with pytest.raises(ValueError, match="matches no dense layer"):
        adapters.Lora(adapters.LoraConfig(targets="language_model/lm_head"), CFG)
    tower = adapters.Lora(adapters.LoraConfig(targets=r"vision_tower/.*/(q|v)_proj"), CFG)
    assert sorted(tower.targets) == [
        "vision_tower/encoder/layers/self_attn/q_proj",
        "vision_tower/encoder/layers/self_attn/v_proj",
    ]
    stage = stage2_ov.get_config("demo")
    stage.optim.trainable = ("projector", "llm")
    with pytest.raises(ValueError, match="does not train"):
        adapters.params_and_labels(CFG, stage.optim, tower)


def test_lora_recipe_and_overrides():
    from lov_jax.train.config_loading import UnknownConfigField, apply_overrides, load_config

    c = load_config("configs/lora.py:tiny_llava15")
    c = apply_overrides(c, ["--config.lora.r=8", "--config.lora.base_dtype=bfloat16"]) or c
    lcfg = adapters.from_config(c.lora)
    assert (lcfg.r, lcfg.alpha, lcfg.base_dtype, lcfg.dropout) == (8, 256.0, "bfloat16", 0.05)
    assert (c.optim.lr, c.optim.projector_lr) == (2e-4, 2e-5)
    assert tuple(c.optim.trainable) == ("projector", "llm")
    with pytest.raises(UnknownConfigField, match="lora.rank"):
        apply_overrides(c, ["--config.lora.rank=8"])
