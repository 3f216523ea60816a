"""Presets, parameter counts, chunked loss and sharded forward (no HF needed)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from lov_jax import config, sharding
from lov_jax.models.llava_onevision import (
    LlavaOnevision,
    abstract_params,
    count_params,
    init_params,
)
from lov_jax.models.loss import chunked_cross_entropy
from lov_jax.token_ids import TokenIds


@pytest.mark.parametrize(
    "name, published",
    # 0.5B: 893.7M with the tied head (= the 1.79 GB fp16 hub file); 7B: 8.03B (4 shards,
    # 16.06 GB); 72B: 73.2B. docs/reference.md 1.3.
    [("ov_0_5b", 893.7e6), ("ov_7b", 8.031e9), ("ov_72b", 73.18e9)],
)
def test_preset_parameter_counts(name, published):
    n = count_params(abstract_params(config.preset(name), boxed=False))
    assert abs(n - published) / published < 1e-3, n


# Token ids belong to a checkpoint, not a preset (read_token_ids reads them back).
IDS = TokenIds(pad=3, eos=(4, 5), image=6, video=7, bos=1)


def test_hf_config_round_trip():
    for name in ("ov_0_5b", "ov_7b", "ov_72b", "tiny"):
        cfg = config.preset(name, token_ids=IDS)
        hf = cfg.to_hf_config()
        assert hf["text_config"]["eos_token_id"] == [4, 5]
        assert config.ModelConfig.from_hf_config(hf, token_ids=IDS) == cfg


def test_config_rejects_non_onevision_settings():
    hf = config.ov_0_5b(token_ids=IDS).to_hf_config()
    with pytest.raises(ValueError, match="vision_feature_select_strategy"):
        config.ModelConfig.from_hf_config({**hf, "vision_feature_select_strategy": "default"})
    with pytest.raises(ValueError, match="remat_policy"):
        config.tiny(remat_policy="sometimes")


@pytest.mark.parametrize("chunk", [4, 7, 64])
def test_chunked_cross_entropy_matches_full_logits(chunk):
    rng = np.random.default_rng(0)
    b, length, h, v = 2, 19, 16, 50
    hidden = jnp.asarray(rng.normal(size=(b, length, h)), jnp.float32)
    kernel = jnp.asarray(rng.normal(size=(h, v)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, v, (b, length)), jnp.int32)
    mask = jnp.asarray(rng.random((b, length)) > 0.3, jnp.float32)

    def full(hd, k):
        logits = hd @ k
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
        return jnp.sum(ce * mask)

    def chunked(hd, k):
        return chunked_cross_entropy(hd, k, targets, mask, chunk_size=chunk)[0]

    np.testing.assert_allclose(chunked(hidden, kernel), full(hidden, kernel), rtol=1e-5)
    g_full = jax.grad(full, argnums=(0, 1))(hidden, kernel)
    g_chunk = jax.grad(chunked, argnums=(0, 1))(hidden, kernel)
    for a, b_ in zip(g_chunk, g_full, strict=True):
        np.testing.assert_allclose(a, b_, rtol=1e-4, atol=1e-5)
    assert float(chunked_cross_entropy(hidden, kernel, targets, mask)[1]) == float(mask.sum())


def _random_batch(cfg, b=4, length=64, crops=2, seed=0):
    rng = np.random.default_rng(seed)
    bank = crops * cfg.vision.num_patches + 2
    vis_w = np.zeros((b, length, 4), np.float32)
    vis_w[:, 10:40] = rng.random((b, 30, 4))
    return {
        "tokens": rng.integers(0, 151000, (b, length)).astype(np.int32),
        "positions": np.broadcast_to(np.arange(length), (b, length)).astype(np.int32),
        "segment_ids": np.repeat([[1] * 40 + [2] * 20 + [0] * 4], b, 0).astype(np.int32),
        "pixels": rng.integers(0, 256, (b, crops, 384, 384, 3), dtype=np.uint8),
        "vis_idx": rng.integers(0, bank, (b, length, 4)).astype(np.int32),
        "vis_w": vis_w,
    }


@pytest.mark.parametrize("remat", ["none", "full"])
def test_sharded_forward_equals_single_device(remat):
    cfg = config.tiny(remat_policy=remat)
    model = LlavaOnevision(cfg)
    params = init_params(cfg, jax.random.key(0))
    batch = _random_batch(cfg)
    single = jax.jit(lambda p, b: model.apply({"params": p}, **b))(params, batch)

    mesh = sharding.make_mesh(fsdp=4, tensor=2)
    p_shard = sharding.params_sharding(abstract_params(cfg), mesh)
    data_shard = jax.sharding.NamedSharding(mesh, P(("data", "fsdp")))
    with sharding.activation_rules(), jax.set_mesh(mesh):
        sharded_params = jax.device_put(params, p_shard)
        sharded_batch = jax.device_put(batch, data_shard)
        fwd = jax.jit(lambda p, b: model.apply({"params": p}, **b))
        out = fwd(sharded_params, sharded_batch)
    q = sharded_params["language_model"]["layers"]["self_attn"]["q_proj"]["kernel"]
    # embed: fsdp x context (size 1 here; context devices share params and optimizer state)
    assert q.sharding.is_equivalent_to(NamedSharding(mesh, P(None, "fsdp", "tensor", None)), 4)
    emb = sharded_params["language_model"]["embed_tokens"]["embedding"]
    assert emb.sharding.is_equivalent_to(NamedSharding(mesh, P("tensor", "fsdp")), 2)
    assert len(out.sharding.device_set) == 8
    np.testing.assert_allclose(np.asarray(out), np.asarray(single), atol=1e-4)


def test_rules_table_rejects_collisions():
    with pytest.raises(ValueError, match="twice"):
        sharding.logical_to_spec(("embed", "embed"))
    with pytest.raises(KeyError, match="no rule"):
        sharding.logical_to_spec(("not_an_axis",))
    with pytest.raises(ValueError, match="needs 6 devices"):
        sharding.make_mesh(data=3, fsdp=2, tensor=1)


@pytest.mark.parametrize("preset", ["tiny", "ov_7b"])
def test_key_tables_cover_exactly_the_model_params(preset):
    from lov_jax.convert.hf_keys import flatten, hf_entries

    cfg = config.preset(preset)
    leaves = flatten(abstract_params(cfg, boxed=False))
    entries = list(hf_entries(cfg))
    assert {path for _, path, _, _ in entries} == set(leaves)
    assert len({name for name, _, _, _ in entries}) == len(entries)  # no HF name twice
    for _, path, layer, _ in entries:  # every layer of a stacked leaf, once
        if layer is not None:
            assert 0 <= layer < leaves[path].shape[0]
    stacked = {p for _, p, layer, _ in entries if layer is not None}
    for p in stacked:
        assert sum(1 for _, q, _, _ in entries if q == p) == leaves[p].shape[0]


def test_gathering_trained_positions_keeps_the_loss_exact():
    from lov_jax.models.loss import gather_trained_positions

    rng = np.random.default_rng(1)
    b, length, h, v = 3, 40, 8, 30
    hidden = jnp.asarray(rng.normal(size=(b, length, h)), jnp.float32)
    kernel = jnp.asarray(rng.normal(size=(h, v)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, v, (b, length)), jnp.int32)
    mask = np.zeros((b, length), np.float32)
    mask[0, [3, 9, 30]] = 1
    mask[1, 10:16] = 1  # the fullest row: 6 trained tokens
    full = chunked_cross_entropy(hidden, kernel, targets, jnp.asarray(mask), chunk_size=8)
    gathered = gather_trained_positions(hidden, targets, jnp.asarray(mask), 6)
    assert gathered[0].shape == (b, 6, h)
    part = chunked_cross_entropy(gathered[0], kernel, gathered[1], gathered[2], chunk_size=8)
    np.testing.assert_allclose(part[0], full[0], rtol=1e-6)
    assert float(part[1]) == float(full[1]) == 9
