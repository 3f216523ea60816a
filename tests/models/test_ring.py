"""Context-parallel attention (lov_jax/models/ring.py) on 8 CPU devices against the xla
kernel on the whole row: ring and all-gather-KV, contiguous and zigzag layouts, causal and
not, with and without packed segments (several crossing block boundaries), GQA and a
sliding window; forward and gradients. fp32, 'highest' matmuls (conftest): atol 2e-5
(a first run on other shapes, B=2 T=64 N=4 K=2 over context=4 fsdp=2: <= 2.4e-6).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lov_jax import sharding
from lov_jax.models import ring
from lov_jax.models.attention import dot_product_attention

ATOL = 2e-5


def _inputs(seed, b=2, t=96, n=6, k=2, h=8):
    rng = np.random.default_rng(seed)
    q, kk, v = (jnp.asarray(rng.normal(size=(b, t, heads, h)), jnp.float32) for heads in (n, k, k))
    seg = np.zeros((b, t), np.int32)  # row 0: 3 samples + padding; row 1: 2 samples
    seg[0, :17], seg[0, 17:50], seg[0, 50:83] = 1, 2, 3
    seg[1, :61], seg[1, 61:] = 1, 2
    return q, kk, v, jnp.asarray(seg)


CASES = [
    # strategy, reorder, causal, segments, sliding window, mesh (block_q: ring tiles of 8
    # query rows where the mesh has 4 context devices, 24 rows each)
    ("ring", "zigzag", True, True, None, {"context": 4, "fsdp": 2}),
    ("ring", "none", True, True, None, {"context": 8}),
    ("ring", "zigzag", False, True, None, {"context": 2, "tensor": 2, "fsdp": 2}),
    ("ring", "none", False, False, None, {"context": 4, "fsdp": 2}),
    ("ring", "zigzag", True, False, 20, {"context": 4, "fsdp": 2}),
    ("all_gather", "zigzag", True, True, None, {"context": 4, "fsdp": 2}),
    ("all_gather", "none", False, True, None, {"context": 2, "tensor": 2, "fsdp": 2}),
]


@pytest.mark.parametrize("strategy,reorder,causal,segments,window,mesh", CASES)
def test_context_attention_equals_xla(strategy, reorder, causal, segments, window, mesh):
    q, k, v, seg = _inputs(seed=len(mesh) + 3 * causal)
    seg = seg if segments else None
    t, n = q.shape[1], mesh["context"]
    w = jnp.asarray(np.random.default_rng(1).normal(size=q.shape), jnp.float32)

    def ref(q, k, v):
        return dot_product_attention(
            q, k, v, q_segment_ids=seg, kv_segment_ids=seg, causal=causal,
            sliding_window=window, impl="xla",
        )  # fmt: skip

    def sharded(q, k, v):
        x = {"q": q, "k": k, "v": v, "seg": seg}
        if reorder == "zigzag":  # the row in the layout's order, as shard_sequence lays it
            x = {key: None if a is None else jnp.take(a, ring.zigzag_order(t, n), axis=1)
                 for key, a in x.items()}  # fmt: skip
        with ring.layout(ring.ContextParallel(strategy, reorder)):
            out = ring.context_attention(
                x["q"], x["k"], x["v"], segment_ids=x["seg"], causal=causal,
                sliding_window=window, block_q=8 if n == 4 else 512,
            )  # fmt: skip
        return ring.restore(out, t, n, reorder)

    def out_and_grads(f):  # one program per kernel: the output and its vjp of w
        def run(q, k, v):
            out, vjp = jax.vjp(f, q, k, v)
            return out, vjp(w)

        return jax.jit(run)

    want, want_grads = out_and_grads(ref)(q, k, v)
    with sharding.activation_rules(), jax.set_mesh(sharding.make_mesh(**mesh)):
        got, got_grads = out_and_grads(sharded)(q, k, v)
    np.testing.assert_allclose(got, want, atol=ATOL)
    for name, a, b in zip("qkv", got_grads, want_grads, strict=True):
        np.testing.assert_allclose(a, b, atol=ATOL, err_msg=f"d{name}")


def test_zigzag_layout_round_trips():
    n, length = 4, 40
    order = ring.zigzag_order(length, n)
    chunks = np.arange(length).reshape(2 * n, -1)
    for r in range(n):  # device r holds chunks r and 2n - 1 - r
        block = order[r * 10 : (r + 1) * 10]
        np.testing.assert_array_equal(block, np.concatenate([chunks[r], chunks[2 * n - 1 - r]]))
        np.testing.assert_array_equal(ring.token_index(r, 10, n, "zigzag"), block)
    with pytest.raises(ValueError, match="multiple of 2 \\* 4; got 36"):
        ring.zigzag_order(36, n)
    # A batch of 37 tokens: padded to 40 (segment 0, no loss, no taps), reordered; the
    # per-token arrays come back in row order, pixels untouched.
    rng = np.random.default_rng(3)
    batch = {
        "tokens": rng.integers(1, 99, (2, 37)).astype(np.int32),
        "loss_mask": np.ones((2, 37), np.float32),
        "segment_ids": np.ones((2, 37), np.int32),
        "vis_w": rng.random((2, 37, 4)).astype(np.float32),
        "pixels": rng.integers(0, 255, (2, 3, 8, 8, 3)).astype(np.uint8),
    }
    for reorder in ring.REORDERS:
        out = ring.shard_sequence(batch, n, reorder)
        assert out["tokens"].shape == (2, 40)  # zigzag: a multiple of 8; none: of 4
        assert out["vis_w"].shape == (2, 40, 4) and out["pixels"] is batch["pixels"]
        for key in ("tokens", "loss_mask", "segment_ids", "vis_w"):
            np.testing.assert_array_equal(ring.restore(out[key], 37, n, reorder), batch[key])
        padded = np.asarray(ring.restore(out["segment_ids"], 40, n, reorder))
        assert (padded[:, 37:] == 0).all() and float(jnp.sum(out["loss_mask"])) == 2 * 37
    assert ring.shard_sequence(batch, 1)["tokens"] is batch["tokens"]
    assert ring.multiple(4, "zigzag") == 8 and ring.multiple(4, "none") == 4


def test_bad_context_settings_are_named():
    with pytest.raises(ValueError, match="context_strategy 'ulysses' not in"):
        ring.ContextParallel("ulysses")
    with pytest.raises(ValueError, match="config.mesh: context_reorder 'striped' not in"):
        sharding.context_from_config({"context_reorder": "striped"})
    assert sharding.context_from_config({}) == ring.ContextParallel("ring", "zigzag")
    q, k, v, seg = _inputs(0, t=20)
    with jax.set_mesh(sharding.make_mesh(context=4, fsdp=2)):
        with pytest.raises(ValueError, match="multiple of 8; got T=20"):
            with ring.layout(ring.ContextParallel("ring", "zigzag")):
                ring.context_attention(q, k, v, segment_ids=seg, causal=True)
