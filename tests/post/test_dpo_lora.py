"""DPO through LoRA adapters (`DPOTrainer(lora=)`) against full DPO on the same pairs.

With every B = 0 (PEFT's init) the adapted policy is the base, so at step 0 LoRA DPO's
loss and metrics equal full DPO's, the projector's gradient is full DPO's, and the
adapters' gradients follow from full DPO's kernel gradients by the chain rule through
y = x W + s (x A) B:  dL/dB = s A^T dL/dW,  dL/dA = s dL/dW B^T = 0. The reference here
differs from the policy in its projector, so the loss is not the trivial log 2. The
policy is the `demo` fixture's stage-2 checkpoint (tests/post/conftest.py).
"""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from flax import traverse_util

from lov_jax import sharding
from lov_jax.lora import adapters
from lov_jax.post import dpo, loop, shapes
from lov_jax.train import optimizer


def _pairs_batch(demo, config, cfg, tokenizer, n_pairs=8, rows=1):
    """[A=2, rows, ...] of answer-swap pairs from the test split, several pairs per row."""
    from data_pipelines import packing, sources
    from lov_jax.post.train import pair_process

    recs = [r for r in json.loads((demo["data"] / "test.json").read_text())
            if len(r["conversations"]) == 2]  # fmt: skip
    pairs = loop.answer_swap_pairs(recs, seed=5)[:n_pairs]
    options = dpo.DPOOptions.from_config(config.dpo)
    process = pair_process(config, cfg, tokenizer, options)
    data = config.data
    pack = packing.PackConfig(data.seq_len, data.max_crops, pad_id=cfg.ids.pad)
    samples = [process(sources.resolve_media(p, data.image_folder, data.video_folder))
               for p in pairs]  # fmt: skip
    micro = list(packing.pack_batches(samples, pack, cfg, rows))
    assert len(micro) >= 2, len(micro)
    micro = micro[:2]
    assert max(int(m["segment_ids"].max()) for m in micro) >= 4  # a row holds 2+ pairs
    return {k: np.stack([m[k] for m in micro]) for k in micro[0]}


@pytest.fixture(scope="module")
def setup(demo):
    from lov_jax.pretrained import load_pretrained, load_tokenizer

    config = shapes.shapes_dpo_config(demo["stage2"], demo["data"], "", steps=1, lora=True)
    config.lora.update(r=4, alpha=12.0, dropout=0.0)  # no dropout: the gradients compare
    config.optim.warmup_ratio = 0.0  # the first step moves the params
    config.data.seq_len = 768  # pairs of 80-400 tokens: 2+ per row, two micro-batches of a row
    cfg, params = load_pretrained(demo["stage2"])
    tokenizer = load_tokenizer(demo["stage2"])
    batch = _pairs_batch(demo, config, cfg, tokenizer)
    # the reference: the policy with another projector (the part LoRA's reference copies)
    flat = traverse_util.flatten_dict(params)
    rng = np.random.default_rng(0)
    ref = traverse_util.unflatten_dict({
        p: (x + 0.05 * rng.standard_normal(x.shape).astype(x.dtype)
            if p[0] == "multi_modal_projector" else x) for p, x in flat.items()
    })  # fmt: skip
    mesh = sharding.make_mesh(fsdp=1, devices=jax.devices()[:1])
    options = dpo.DPOOptions.from_config(config.dpo)
    lora = adapters.from_stage(config, cfg)
    make = lambda lo: dpo.DPOTrainer(cfg, config.optim, options, mesh, 4,  # noqa: E731
                                     config.train.loss_chunk, config.train.loss_tokens_per_row,
                                     lora=lo)  # fmt: skip
    return dict(cfg=cfg, params=params, ref=ref, batch=batch, lora=lora,
                full=make(None), lora_trainer=make(lora))  # fmt: skip


def test_lora_dpo_at_init_equals_full_dpo_and_its_chain_rule(setup):
    full, ours, lora = setup["full"], setup["lora_trainer"], setup["lora"]
    m_full, g_full = full.loss_and_grads(setup["params"], setup["ref"], setup["batch"])
    policy = lora.prepare(setup["params"], ours.labels)
    # whole reference params in: only its projector is read (the base is the policy's)
    m_lora, g_lora = ours.loss_and_grads(policy, setup["ref"], setup["batch"])
    m_full, m_lora = jax.device_get(m_full), jax.device_get(m_lora)
    assert float(m_full["pairs"]) >= 3
    assert abs(float(m_full["loss"]) - np.log(2)) > 1e-3  # the reference differs
    for key in ("loss", *dpo.METRIC_NAMES):
        np.testing.assert_allclose(float(m_lora[key]), float(m_full[key]), atol=1e-6, rtol=1e-6,
                                   err_msg=key)  # fmt: skip

    # LoRA trains the adapters and the projector, nothing else
    trained = set(g_lora)
    adapter_paths = {p for p in trained if adapters.is_adapter(p)}
    assert trained - adapter_paths == {p for p in g_full if p[0] == "multi_modal_projector"}
    assert len(adapter_paths) == 2 * len(lora.targets) == 2 * len(adapters.LLM_PROJECTIONS)
    for p in trained - adapter_paths:
        np.testing.assert_allclose(np.asarray(g_lora[p]), np.asarray(g_full[p]), atol=1e-6,
                                   rtol=1e-5, err_msg=str(p))  # fmt: skip
    flat_policy = traverse_util.flatten_dict(policy)
    biggest = 0.0
    for module, t in lora.targets.items():
        assert t.stacked, module
        path = tuple(module.split("/"))
        a = np.asarray(flat_policy[(*path, adapters.A)])  # [L, *in, r]
        g_w = np.asarray(g_full[(*path, "kernel")])  # [L, *in, *out]
        g_b = np.asarray(g_lora[(*path, adapters.B)])  # [L, r, *out]
        n = a.shape[0]
        want = lora.scaling * np.einsum("lir,lio->lro", a.reshape(n, -1, lora.config.r),
                                        g_w.reshape(n, a[0, ..., 0].size, -1))  # fmt: skip
        np.testing.assert_allclose(g_b.reshape(want.shape), want, atol=1e-6, rtol=1e-4,
                                   err_msg=module)  # fmt: skip
        np.testing.assert_array_equal(np.asarray(g_lora[(*path, adapters.A)]), 0.0)
        biggest = max(biggest, float(np.abs(want).max()))
    assert biggest > 1e-4  # the adapters do get a gradient


def test_lora_dpo_step_keeps_the_base_and_holds_state_for_trained_leaves(setup):
    ours = setup["lora_trainer"]
    trained = {p for p, g in ours.labels.items() if g != optimizer.FROZEN}
    state = ours.init_state(setup["params"])
    sizes = {p: int(np.prod(x.shape)) for p, x in traverse_util.flatten_dict(state.params).items()}
    # Adam's two moments over the trained leaves only (plus scalar counts)
    moments = sum(x.size for x in jax.tree.leaves(state.opt_state) if x.ndim)
    assert moments == 2 * sum(sizes[p] for p in trained) < sum(sizes.values()) / 4
    ref = ours.place_reference(setup["ref"])
    assert set(traverse_util.flatten_dict(ref)) == trained - {
        p for p in trained if adapters.is_adapter(p)}  # fmt: skip
    state, metrics = ours.step(state, ref, setup["batch"])
    assert bool(metrics["finite"]) and int(state.step) == 1
    after = traverse_util.flatten_dict(jax.device_get(state.params))
    before = traverse_util.flatten_dict(setup["params"])
    for p, x in after.items():
        if p in trained:
            continue
        np.testing.assert_array_equal(x, before[p], err_msg=str(p))  # the base is untouched
    assert all(np.abs(after[p]).max() > 0 for p in trained if p[-1] == adapters.B)
    view = ours.checkpoint_view(state)
    assert set(traverse_util.flatten_dict(view.params)) == trained


def test_dpo_config_takes_a_lora_block():
    from lov_jax.train.config_loading import UnknownConfigField, apply_overrides, load_config

    c = load_config("configs/dpo.py:demo")
    assert adapters.from_config(c.lora) is None  # off by default
    c = apply_overrides(c, ["--config.lora.enabled=true", "--config.lora.r=8",
                            "--config.lora.targets=q_proj,v_proj"])  # fmt: skip
    lcfg = adapters.from_config(c.lora)
    assert lcfg.r == 8 and lcfg.alpha == 256.0 and lcfg.targets == ("q_proj", "v_proj")
    with pytest.raises(UnknownConfigField, match="lora.rank"):
        apply_overrides(c, ["--config.lora.rank=8"])
    with pytest.raises(ValueError, match="lora: unknown keys"):
        adapters.from_config({**c.lora.to_dict(), "rank": 4})
