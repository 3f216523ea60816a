"""GPU attention kernels on CPU: chunked (plain XLA) and pallas_gpu (Pallas interpret mode)
against the xla reference; cudnn's CPU-checkable parts; `auto`'s choice per backend.

fp32 with 'highest' matmuls (conftest): outputs within 1e-5, gradients within 1e-5.
bf16 inputs: each kernel within BF16_ATOL of fp32 xla on the same (rounded) inputs, the
error bf16 xla itself makes (observed ~9e-3). Lengths are not block multiples (40 with
16 / 24 tiles; pallas pads 40 to 48), rows hold several segments and padding, and the
GQA ratios N / K are 1, 2, 4 and 7. Padding rows (segment 0) are left out of the
comparisons: the contract promises nothing about them.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lov_jax import config, sharding
from lov_jax.models import attention, chunked, cudnn, pallas_gpu
from lov_jax.models.attention import Call, choose, dot_product_attention
from lov_jax.models.llava_onevision import LlavaOnevision, init_params
from lov_jax.testing.batches import SyntheticBatches
from lov_jax.train.step import loss_terms

ATOL = 1e-5
BF16_ATOL = 2e-2
T = 40
PACKED = [[17, 13, 6], [25, 9]]  # 4 and 6 padding tokens
# chunked's tiles through dot_product_attention are 512: call it directly with small ones.
KERNELS = {
    "chunked": lambda q, k, v, **kw: chunked.chunked_attention(
        q, k, v, **kw, block_q=16, block_k=24
    ),
    "pallas_gpu": lambda q, k, v, **kw: pallas_gpu.pallas_attention(q, k, v, **kw),
}


def _segment_ids(lengths_per_row: list[list[int]], total: int) -> jax.Array:
    rows = []
    for lengths in lengths_per_row:
        ids = np.concatenate([np.full(n, i + 1) for i, n in enumerate(lengths)])
        rows.append(np.pad(ids, (0, total - len(ids))))
    return jnp.asarray(np.stack(rows), jnp.int32)


def _qkv(b, t, s, n, kv_heads, h, seed=0, dtype=jnp.float32):
    kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(kq, (b, t, n, h), jnp.float32).astype(dtype)
    k = jax.random.normal(kk, (b, s, kv_heads, h), jnp.float32).astype(dtype)
    v = jax.random.normal(kv, (b, s, kv_heads, h), jnp.float32).astype(dtype)
    return q, k, v


def _on_tokens(x: jax.Array, seg: jax.Array | None) -> jax.Array:
    return x if seg is None else jnp.where((seg != 0)[:, :, None, None], x, 0.0)


def _max_diff(a, b, seg=None) -> float:
    return float(jnp.max(jnp.abs(_on_tokens(a.astype(jnp.float32) - b, seg))))


def _out_and_grads(attend, q, k, v, seg):
    """attend(q, k, v) and the grads of a nonlinear readout over real tokens only (no
    gradient from padding rows), in one jit (one compile instead of op by op)."""

    def both(q, k, v):
        loss = lambda q, k, v: jnp.sum(_on_tokens(jnp.sin(attend(q, k, v)), seg))  # noqa: E731
        return attend(q, k, v), jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

    return jax.jit(both)(q, k, v)


@pytest.mark.parametrize(
    ("impl", "groups", "causal"),
    [
        ("chunked", 1, True),
        ("chunked", 2, False),
        ("pallas_gpu", 4, True),
        ("pallas_gpu", 7, False),
    ],
)
def test_packed_forward_and_grads_match_xla(impl: str, groups: int, causal: bool) -> None:
    kv_heads = 1 if groups == 7 else 2
    q, k, v = _qkv(2, T, T, kv_heads * groups, kv_heads, 16, seed=groups)
    seg = _segment_ids(PACKED, T)
    kw = dict(q_segment_ids=seg, kv_segment_ids=seg, causal=causal)
    out, got = _out_and_grads(lambda q, k, v: KERNELS[impl](q, k, v, **kw), q, k, v, seg)
    ref, want = _out_and_grads(lambda q, k, v: dot_product_attention(q, k, v, **kw), q, k, v, seg)
    assert out.shape == ref.shape and out.dtype == jnp.float32
    assert _max_diff(out, ref, seg) <= ATOL
    for name, g, r in zip("qkv", got, want, strict=True):
        assert g.dtype == jnp.float32
        assert float(jnp.max(jnp.abs(g - r))) <= ATOL, name


@pytest.mark.parametrize("impl", ["chunked", "pallas_gpu"])
def test_bf16_within_tolerance(impl: str) -> None:
    q, k, v = _qkv(2, T, T, 4, 2, 16, seed=3, dtype=jnp.bfloat16)
    seg = _segment_ids(PACKED, T)
    kw = dict(q_segment_ids=seg, kv_segment_ids=seg, causal=True)
    ref = dot_product_attention(*(x.astype(jnp.float32) for x in (q, k, v)), **kw)
    out = jax.jit(lambda q, k, v: KERNELS[impl](q, k, v, **kw))(q, k, v)
    assert out.dtype == jnp.bfloat16
    assert _max_diff(out, ref, seg) <= BF16_ATOL
    assert _max_diff(dot_product_attention(q, k, v, **kw), ref, seg) <= BF16_ATOL


def test_chunked_sliding_window_no_segments_and_cross_lengths() -> None:
    q, k, v = _qkv(2, T, T, 4, 2, 16, seed=5)
    seg = _segment_ids(PACKED, T)
    kw = dict(q_segment_ids=seg, kv_segment_ids=seg, causal=True, sliding_window=5)
    out, got = _out_and_grads(lambda q, k, v: KERNELS["chunked"](q, k, v, **kw), q, k, v, seg)
    ref, want = _out_and_grads(lambda q, k, v: dot_product_attention(q, k, v, **kw), q, k, v, seg)
    assert _max_diff(out, ref, seg) <= ATOL
    for g, r in zip(got, want, strict=True):
        assert float(jnp.max(jnp.abs(g - r))) <= ATOL
    # No segment ids, T != S, not causal: the padded key tail must stay unattended.
    q, _, _ = _qkv(1, 9, 9, 4, 2, 16, seed=6)
    _, k, v = _qkv(1, 50, 50, 4, 2, 16, seed=7)
    assert _max_diff(jax.jit(KERNELS["chunked"])(q, k, v), dot_product_attention(q, k, v)) <= ATOL


@pytest.mark.parametrize("impl", ["chunked", "pallas_gpu", "splash", "cudnn", "auto"])
def test_decode_with_q_offset_matches_xla(impl: str, caplog) -> None:
    """One new token per row at per-row cache slots; kernels without a q_offset fall back
    (xla: the logits are [1, S]) and log why once."""
    s = 48
    q, k, v = _qkv(2, 1, s, 4, 2, 16, seed=8)
    kv_seg = _segment_ids([[20, 14], [30]], s)
    index = jnp.asarray([33, 29], jnp.int32)
    q_seg = jnp.take_along_axis(kv_seg, index[:, None], axis=1)
    kw = dict(q_segment_ids=q_seg, kv_segment_ids=kv_seg, causal=True, q_offset=index)
    with caplog.at_level(logging.INFO, logger=attention.__name__):
        out = jax.jit(lambda q, k, v: dot_product_attention(q, k, v, impl=impl, **kw))(q, k, v)
    assert _max_diff(out, dot_product_attention(q, k, v, **kw)) <= ATOL
    if impl not in ("chunked", "auto"):
        assert f"xla instead of {impl}" in caplog.text and "q_offset" in caplog.text


def test_chunked_memory_is_linear_in_length() -> None:
    """Compiled temp memory of forward + backward (compile only): chunked grows about
    linearly from 4k to 16k tokens (x4 length), xla quadratically (its [T, T] logits).
    Observed on CPU: chunked 42 MB -> 92 MB, xla 0.81 GB -> 12.9 GB."""

    def temp_bytes(t: int, impl: str) -> int:
        x = jax.ShapeDtypeStruct((1, t, 4, 64), jnp.float32)
        kv = jax.ShapeDtypeStruct((1, t, 2, 64), jnp.float32)
        seg = jax.ShapeDtypeStruct((1, t), jnp.int32)

        def loss(q, k, v, seg):
            out = dot_product_attention(
                q, k, v, q_segment_ids=seg, kv_segment_ids=seg, causal=True, impl=impl
            )
            return jnp.sum(out)

        compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(x, kv, kv, seg).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    small, large = temp_bytes(4096, "chunked"), temp_bytes(16384, "chunked")
    assert large / small < 4.5, (small, large)
    assert large < 16384 * 16384 * 4  # less than ONE head's fp32 logits
    xla_small, xla_large = temp_bytes(4096, "xla"), temp_bytes(16384, "xla")
    assert xla_large / xla_small > 12, (xla_small, xla_large)


def _model_loss(cfg, params, batch, impl: str):
    model = LlavaOnevision(cfg.replace(attention_impl=impl))

    def loss(params):
        total, count = model.apply({"params": params}, batch, 64, 0.0, method=loss_terms)
        return total / count

    with sharding.activation_rules(), jax.set_mesh(sharding.make_mesh(devices=jax.devices()[:1])):
        return jax.tree.map(np.asarray, jax.jit(jax.value_and_grad(loss))(params))


@pytest.fixture(scope="module")
def tiny_model():
    """The tiny preset (1k vocab, 56px crops), text rows of 40 tokens (2 segments +
    padding), and its loss and grads with xla attention."""
    tiny = config.tiny()
    cfg = tiny.replace(
        vision=dataclasses.replace(tiny.vision, image_size=56),  # 16 patches: a cheap init
        text=dataclasses.replace(tiny.text, vocab_size=1024),
    )
    params = init_params(cfg, jax.random.key(0))
    batch = next(SyntheticBatches(rows=2, length=T, vocab=1000))
    batch = {k: batch[k] for k in ("tokens", "targets", "loss_mask", "segment_ids", "positions")}
    return cfg, params, batch, _model_loss(cfg, params, batch, "xla")


@pytest.mark.parametrize("impl", ["chunked", "pallas_gpu"])
def test_model_loss_and_grads_equal_xla(tiny_model, impl: str) -> None:
    cfg, params, batch, (ref_loss, ref_grads) = tiny_model
    loss, grads = _model_loss(cfg, params, batch, impl)
    assert abs(loss - ref_loss) <= 1e-5
    for (path, g), r in zip(
        jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(ref_grads), strict=True
    ):
        np.testing.assert_allclose(g, r, atol=1e-6, err_msg=jax.tree_util.keystr(path))


def _call(**kw) -> Call:
    base = dict(
        q_len=4096, kv_len=4096, heads=14, kv_heads=2, head_dim=64, dtype="bfloat16",
        causal=True, segments=True, self_attention=True, decode=False, sliding_window=None,
        backend="gpu",
    )  # fmt: skip
    return Call(**{**base, **kw})


def test_auto_picks_per_backend(caplog) -> None:
    # No CUDA here: cudnn's environment check fails, so auto on "gpu" takes pallas_gpu.
    with caplog.at_level(logging.INFO, logger=attention.__name__):
        assert choose("auto", _call()) == "pallas_gpu"
    assert "needs a CUDA GPU" in caplog.text and "pallas_gpu" in caplog.text
    assert choose("auto", _call(sliding_window=4096)) == "chunked"  # neither kernel windows
    assert choose("auto", _call(decode=True, q_len=1, kv_len=32768)) == "xla"
    assert choose("auto", _call(backend="tpu")) == "splash"
    assert choose("auto", _call(backend="tpu", q_len=4000, kv_len=4000)) == "chunked"
    assert choose("auto", _call(backend="cpu", q_len=2048, kv_len=2048)) == "xla"
    assert choose("auto", _call(backend="cpu", q_len=8192, kv_len=8192)) == "chunked"
    caplog.clear()
    with caplog.at_level(logging.INFO, logger=attention.__name__):
        choose("auto", _call(backend="cpu", q_len=8192, kv_len=8192))
    assert caplog.text == ""  # logged once


def test_explicit_kernels_refuse_what_they_cannot_do() -> None:
    q, k, v = _qkv(1, 32, 32, 4, 2, 16)
    seg = jnp.ones((1, 32), jnp.int32)
    with pytest.raises(ValueError, match="needs a CUDA GPU"):
        dot_product_attention(q.astype(jnp.bfloat16), k, v, impl="cudnn")
    with pytest.raises(ValueError, match="needs bfloat16 / float16"):
        dot_product_attention(q, k, v, impl="cudnn")
    with pytest.raises(ValueError, match="pallas_gpu' has no sliding_window"):
        dot_product_attention(
            q, k, v, q_segment_ids=seg, kv_segment_ids=seg, causal=True, sliding_window=4,
            impl="pallas_gpu",
        )  # fmt: skip
    with pytest.raises(ValueError, match="self-attention only"):
        dot_product_attention(q, k[:, :16], v[:, :16], impl="pallas_gpu")
    with pytest.raises(ValueError, match="one segment-id array"):
        pallas_gpu.pallas_attention(q, k, v, q_segment_ids=seg, kv_segment_ids=seg + 0)
    with pytest.raises(ValueError, match="unknown attention impl 'flash'"):
        dot_product_attention(q, k, v, impl="flash")
    with pytest.raises(ValueError, match="attention_impl 'flash' not in"):
        config.tiny(attention_impl="flash")


def test_cudnn_environment_messages() -> None:
    ok = cudnn.Environment(cudnn.JAX_VERSION, "gpu", (9, 0), 90800)
    assert ok.problem() is None
    assert "checked against jax 0.10.2; this is jax 0.11.0" in dataclasses.replace(
        ok, jax_version="0.11.0"
    ).problem()  # fmt: skip
    assert "needs a Hopper GPU" in dataclasses.replace(ok, compute_capability=(8, 0)).problem()
    assert "cuDNN >= 90600" in dataclasses.replace(ok, cudnn_version=90100).problem()
    assert "needs a CUDA GPU" in dataclasses.replace(ok, backend="cpu").problem()
    assert cudnn.unsupported(_call(), ok) is None
    assert "head_dim <= 256" in cudnn.unsupported(_call(head_dim=100), ok)
    with pytest.raises(ValueError, match="max_segments >= 2"):
        with cudnn.segment_budget(1):
            pass


def test_cudnn_segment_layout_matches_the_upstream_example() -> None:
    """jax's tests/fused_attention_stablehlo_test.py test_sdpa_packed_layout (T=512):
    padding may sit between segments; seqlen counts real tokens only."""
    want_offsets = [[0, 170, 340, -1], [0, 150, 340, -1], [0, 190, -1, -1], [0, -1, -1, -1]]
    want_seqlen = [[170, 170, 172], [150, 187, 172], [190, 190, -1], [400, -1, -1]]
    seg = np.zeros((4, 512), np.int32)
    for row, (offs, lens) in enumerate(zip(want_offsets, want_seqlen, strict=True)):
        for m, (o, n) in enumerate(zip(offs, lens, strict=False)):
            if n > 0:
                seg[row, o : o + n] = m + 1
    seqlen, offsets, ok = jax.jit(cudnn.segment_layout, static_argnums=1)(jnp.asarray(seg), 3)
    np.testing.assert_array_equal(seqlen, want_seqlen)
    np.testing.assert_array_equal(offsets, want_offsets)
    assert bool(ok.all())
    bad = np.stack([seg[0], seg[1], seg[2], seg[3]])
    bad[0, 100:110] = 2  # segment 2 split in two runs
    bad[1, -1] = 4  # more segments than the budget
    bad[2, 0] = -3  # negative id
    np.testing.assert_array_equal(cudnn.segment_layout(jnp.asarray(bad), 3)[2], [0, 0, 0, 1])


def test_pallas_gpu_runs_in_shard_map_on_a_mesh() -> None:
    q, k, v = _qkv(4, 32, 32, 4, 2, 16)
    seg = jnp.ones((4, 32), jnp.int32)

    def attend(q, k, v, seg):
        return pallas_gpu.pallas_attention(q, k, v, q_segment_ids=seg, kv_segment_ids=seg)

    with jax.set_mesh(sharding.make_mesh(data=2, fsdp=2, tensor=2)):
        jaxpr = jax.make_jaxpr(attend)(q, k, v, seg)
    (eqn,) = [e for e in jaxpr.eqns if e.primitive.name == "shard_map"]
    assert eqn.params["out_specs"] == (jax.P(("data", "fsdp"), None, "tensor", None),)


def test_gpu_extra_and_cudnn_pin_follow_requirements() -> None:
    """`.[gpu]` installs jax[cuda12] at requirements.txt's jax, which is the jax the
    cudnn wrapper was checked against (bumping jax means re-checking lov_jax/models/cudnn.py)."""
    root = Path(__file__).resolve().parents[2]
    pins = dict(
        line.split("==") for line in (root / "requirements.txt").read_text().splitlines()
        if "==" in line and not line.startswith("#")
    )  # fmt: skip
    assert pins["jax"] == cudnn.JAX_VERSION == jax.__version__
    assert f'"gpu": ["jax[cuda12]=={pins["jax"]}"]' in (root / "setup.py").read_text()


def test_partials_over_split_keys_merge_to_full_attention() -> None:
    """What context parallelism relies on: attend_block over two disjoint key ranges,
    merged in either order, then finish() = attention over all keys (GQA 3, causal +
    segments); block_grads summed over the two ranges = the xla gradients."""
    q, k, v = _qkv(2, T, T, 6, 2, 16, seed=9)
    seg = _segment_ids(PACKED, T)

    @jax.jit
    def compute(q, k, v, seg):
        full = attention.attention_mask(seg, seg, q_len=T, kv_len=T, causal=True)
        cut = 23
        halves = [
            (k[:, :cut], v[:, :cut], full[..., :cut]),
            (k[:, cut:], v[:, cut:], full[..., cut:]),
        ]
        parts = [chunked.attend_block(q, kb, vb, m) for kb, vb, m in halves]
        outs = [chunked.finish(chunked.merge(a, b)) for a, b in (parts, parts[::-1])]
        attend = lambda q, k, v: dot_product_attention(  # noqa: E731
            q, k, v, q_segment_ids=seg, kv_segment_ids=seg, causal=True
        )
        ref, vjp = jax.vjp(attend, q, k, v)
        dout = _on_tokens(jnp.cos(ref), seg)
        out, lse = outs[0]
        delta = jnp.sum(dout * out, -1)
        g = [chunked.block_grads(q, kb, vb, m, dout, lse, delta) for kb, vb, m in halves]
        got = (g[0][0] + g[1][0], jnp.concatenate([g[0][1], g[1][1]], 1),
               jnp.concatenate([g[0][2], g[1][2]], 1))  # fmt: skip
        return [o for o, _ in outs], ref, got, vjp(dout)

    outs, ref, got, want = compute(q, k, v, seg)
    for out in outs:
        assert _max_diff(out, ref, seg) <= ATOL
    for name, g, r in zip("qkv", got, want, strict=True):
        assert float(jnp.max(jnp.abs(g - r))) <= ATOL, name
