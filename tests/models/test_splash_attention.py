"""Splash attention (Pallas interpret mode off TPU) against the XLA reference kernel.

Shapes are small because interpret mode runs the kernel's grid as a loop. All
fp32 with 'highest' matmuls (conftest), atol 2e-5. Under a multi-device mesh
(conftest's 8 CPU devices) the kernel runs in shard_map; the tiny model's loss and
gradients on a data x fsdp x tensor mesh match one device with XLA attention.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from lov_jax import config, sharding
from lov_jax.models import splash
from lov_jax.models.attention import dot_product_attention
from lov_jax.models.llava_onevision import LlavaOnevision, abstract_params, init_params
from lov_jax.testing.batches import SyntheticBatches
from lov_jax.train.step import loss_terms

ATOL = 2e-5


def _segment_ids(lengths_per_row: list[list[int]], total: int) -> jax.Array:
    """int32[B, total]: segments 1, 2, ... of the given lengths, then padding 0s."""
    rows = []
    for lengths in lengths_per_row:
        ids = np.concatenate([np.full(n, i + 1) for i, n in enumerate(lengths)])
        rows.append(np.pad(ids, (0, total - len(ids))))
    return jnp.asarray(np.stack(rows), jnp.int32)


def _qkv(b: int, t: int, s: int, n: int, kv_heads: int, h: int, seed: int = 0):
    kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(kq, (b, t, n, h), jnp.float32)
    k = jax.random.normal(kk, (b, s, kv_heads, h), jnp.float32)
    v = jax.random.normal(kv, (b, s, kv_heads, h), jnp.float32)
    return q, k, v


def _max_diff_on_tokens(out: jax.Array, ref: jax.Array, segment_ids: jax.Array | None) -> float:
    """Max |out - ref| over query rows that are real tokens (segment id != 0).

    Padding rows (segment 0) attend padding only. Their outputs are never used
    and the attention contract promises nothing about them (they differ by
    definition between kernels, e.g. in how a fully-masked row is filled), so
    they are left out of the check.
    """
    diff = jnp.abs(out - ref)  # [B, T, N, H]
    if segment_ids is not None:
        diff = jnp.where((segment_ids != 0)[:, :, None, None], diff, 0.0)
    return float(jnp.max(diff))


PACKED = [[100, 90, 40], [128, 64, 30, 10]]  # 26 and 24 padding tokens at T=256


@pytest.mark.parametrize(
    ("kv_heads", "head_dim", "causal"),
    [(2, 64, True), (4, 64, True), (2, 128, True), (2, 64, False), (4, 128, False)],
)
def test_packed_segments_match_xla(kv_heads: int, head_dim: int, causal: bool) -> None:
    b, t, n = 2, 256, 4
    q, k, v = _qkv(b, t, t, n, kv_heads, head_dim)
    seg = _segment_ids(PACKED, t)
    kwargs = dict(q_segment_ids=seg, kv_segment_ids=seg, causal=causal)
    out = dot_product_attention(q, k, v, impl="splash", **kwargs)
    ref = dot_product_attention(q, k, v, impl="xla", **kwargs)
    assert out.shape == ref.shape == (b, t, n, head_dim)
    assert out.dtype == jnp.float32
    assert _max_diff_on_tokens(out, ref, seg) <= ATOL


@pytest.mark.parametrize("causal", [True, False])
def test_small_blocks_match_xla(causal: bool) -> None:
    # 128-tiles over T=384: 3x3 kv blocks per head, so the online softmax runs
    # across blocks and causal skips the fully-masked upper blocks.
    b, t, n, kv_heads, h = 1, 384, 4, 2, 64
    q, k, v = _qkv(b, t, t, n, kv_heads, h, seed=1)
    seg = _segment_ids([[150, 200]], t)
    blocks = sk.BlockSizes(block_q=128, block_kv=128, block_kv_compute=128)
    out = splash.splash_attention(
        q, k, v, q_segment_ids=seg, kv_segment_ids=seg, causal=causal, block_sizes=blocks
    )
    ref = dot_product_attention(q, k, v, q_segment_ids=seg, kv_segment_ids=seg, causal=causal)
    assert _max_diff_on_tokens(out, ref, seg) <= ATOL


def test_no_segment_ids_and_cross_lengths_match_xla() -> None:
    # T != S without a causal mask (cross-attention shape); MQA (K = 1).
    q, _, _ = _qkv(2, 128, 128, 4, 1, 64, seed=2)
    _, k, v = _qkv(2, 256, 256, 4, 1, 64, seed=3)
    out = splash.splash_attention(q, k, v, causal=False)
    ref = dot_product_attention(q, k, v, causal=False)
    assert _max_diff_on_tokens(out, ref, None) <= ATOL


def test_grads_match_xla() -> None:
    b, t, n, kv_heads, h = 1, 256, 4, 2, 64
    q, k, v = _qkv(b, t, t, n, kv_heads, h, seed=4)
    seg = _segment_ids([[100, 90, 40]], t)
    tokens = (seg != 0)[:, :, None, None]

    def loss(impl, q, k, v):
        out = dot_product_attention(
            q, k, v, q_segment_ids=seg, kv_segment_ids=seg, causal=True, impl=impl
        )
        # Padding rows are excluded from the loss, so no gradient flows from them.
        return jnp.sum(jnp.where(tokens, out * jnp.cos(out), 0.0))

    grads = jax.grad(lambda *a: loss("splash", *a), argnums=(0, 1, 2))(q, k, v)
    ref = jax.grad(lambda *a: loss("xla", *a), argnums=(0, 1, 2))(q, k, v)
    for name, g, r in zip("qkv", grads, ref, strict=True):
        assert float(jnp.max(jnp.abs(g - r))) <= 1e-4, name


def test_default_block_sizes_divide_lengths() -> None:
    assert splash.default_block_sizes(256, 256).block_q == 256
    assert splash.default_block_sizes(1024, 640).block_q == 512
    assert splash.default_block_sizes(1024, 640).block_kv == 128
    assert splash.default_block_sizes(384, 1536).block_kv_dkv == 512


def test_length_not_multiple_of_128_raises() -> None:
    q, k, v = _qkv(1, 200, 200, 4, 2, 64)
    seg = jnp.ones((1, 200), jnp.int32)
    with pytest.raises(ValueError, match="multiples of 128"):
        dot_product_attention(
            q, k, v, q_segment_ids=seg, kv_segment_ids=seg, causal=True, impl="splash"
        )


def test_mesh_runs_kernel_in_shard_map() -> None:
    q, k, v = _qkv(4, 128, 128, 4, 2, 64)
    seg = jnp.ones((4, 128), jnp.int32)

    def attend(q, k, v, seg):
        return splash.splash_attention(q, k, v, q_segment_ids=seg, kv_segment_ids=seg)

    with jax.set_mesh(sharding.make_mesh(data=2, fsdp=2, tensor=2)):
        jaxpr = jax.make_jaxpr(attend)(q, k, v, seg)
        # A batch that does not divide data x fsdp (init's 1-row dummy) is replicated.
        assert jax.eval_shape(attend, q[:1], k[:1], v[:1], seg[:1]).shape == (1, 128, 4, 64)
    (eqn,) = [e for e in jaxpr.eqns if e.primitive.name == "shard_map"]
    assert eqn.params["out_specs"] == (P(("data", "fsdp"), None, "tensor", None),)
    assert eqn.params["in_specs"][-1] == P(("data", "fsdp"))  # kv segment ids
    with jax.set_mesh(sharding.make_mesh(devices=jax.devices()[:1])):
        jaxpr = jax.make_jaxpr(attend)(q, k, v, seg)
    assert "shard_map" not in {e.primitive.name for e in jaxpr.eqns}
    with jax.set_mesh(sharding.make_mesh(fsdp=2, tensor=4)):
        with pytest.raises(ValueError, match=r"kv heads \(2\) must both divide by 4"):
            jax.eval_shape(attend, q, k, v, seg)


def test_sharded_model_matches_single_device_xla() -> None:
    """Loss and grads of the tiny model, T=128: splash on data=2 x fsdp=2 x tensor=2
    (6 query heads, 2 kv heads: 3 and 1 per device) against XLA attention on one device.
    Text only (the vision tower never runs splash) and a 1k vocab (cheaper loss).
    Observed on CPU: loss equal, grads within 4e-8 (largest grad 0.05)."""
    tiny = config.tiny()
    cfg = tiny.replace(text=dataclasses.replace(tiny.text, vocab_size=1024))
    params = init_params(cfg, jax.random.key(0))
    batch = next(SyntheticBatches(rows=4, length=128, vocab=1000))
    batch = {k: batch[k] for k in ("tokens", "targets", "loss_mask", "segment_ids", "positions")}

    def loss_and_grads(impl: str, mesh):
        model = LlavaOnevision(cfg.replace(attention_impl=impl))

        def loss(params, batch):
            total, count = model.apply({"params": params}, batch, 64, 0.0, method=loss_terms)
            return total / count

        with sharding.activation_rules(), jax.set_mesh(mesh):
            shardings = sharding.params_sharding(abstract_params(cfg), mesh)
            rows = NamedSharding(mesh, P(("data", "fsdp")))
            out = jax.jit(jax.value_and_grad(loss), in_shardings=(shardings, rows))(params, batch)
        return jax.tree.map(np.asarray, out)

    ref_loss, ref_grads = loss_and_grads("xla", sharding.make_mesh(devices=jax.devices()[:1]))
    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
    loss, grads = loss_and_grads("splash", mesh)
    assert abs(loss - ref_loss) <= 1e-5
    for (path, g), r in zip(
        jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(ref_grads), strict=True
    ):
        np.testing.assert_allclose(g, r, atol=1e-6, err_msg=jax.tree_util.keystr(path))
