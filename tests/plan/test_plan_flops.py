# ruff: noqa: E501 (HLO text lines)
"""The planner's compiled FLOPs (`lov_jax.plan.flops`): while bodies times their trip
count, splash kernels from their formula, and the train step against the model's FLOPs
on an XLA:CPU compile (no libtpu needed)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import pytest

from lov_jax import sharding
from lov_jax.plan import flops
from lov_jax.plan.train import REMAT_RECOMPUTE


def _cost_flops(compiled) -> float:
    cost = compiled.cost_analysis()
    return float((cost[0] if isinstance(cost, list | tuple) else cost)["flops"])


def test_scan_body_counts_its_trips():
    # 7 scanned [5, 24] @ [24, 24] layers under grad: per trip the forward dot, the
    # activation gradient and the weight gradient, 2 * 5 * 24 * 24 FLOPs each.
    def f(w, x):
        def body(c, wi):
            return jnp.tanh(c @ wi), None

        return jax.lax.scan(body, x, w)[0].sum()

    compiled = jax.jit(jax.grad(f)).lower(jnp.ones((7, 24, 24)), jnp.ones((5, 24))).compile()
    got = flops.hlo_flops(compiled.as_text())
    assert got.dot_flops == 3 * 7 * 2 * 5 * 24 * 24
    assert got.unknown_trip_loops == 0 and got.kernel_flops == 0
    assert _cost_flops(compiled) < got.dot_flops / 3  # XLA's own count: each body once


HLO = """HloModule jit_step, entry_computation_layout={()->f32[]}

%body (p: (s32[], bf16[2,4,512,64], bf16[2,2,512,64])) -> (s32[], bf16[2,4,512,64], bf16[2,2,512,64]) {
  %p = (s32[], bf16[2,4,512,64]{3,2,1,0}, bf16[2,2,512,64]{3,2,1,0}) parameter(0)
  %q = bf16[2,4,512,64]{3,2,1,0} get-tuple-element(%p), index=1
  %k = bf16[2,2,512,64]{3,2,1,0} get-tuple-element(%p), index=2
  %mask = s32[2,4,4]{2,1,0} constant({...})
  %out = bf16[2,4,512,64]{3,2,1,0} custom-call(%mask, %q, %k, %k), custom_call_target="tpu_custom_call", backend_config={"custom_call_config": {"body": "TUxJUgAB"}}, kernel_name="splash_mha_fwd_segmented_no_residuals"
  %splash_mha_dq_segmented.3 = bf16[2,4,512,64]{3,2,1,0:T(8,128)} custom-call(%mask, %q, %k, %k, %out), custom_call_target="tpu_custom_call", backend_config={"custom_call_config": {"body": "TUxJUgAB"}}
  %other = f32[4]{0} custom-call(%mask), custom_call_target="SomethingElse"
  ROOT %t = (s32[], bf16[2,4,512,64]{3,2,1,0}, bf16[2,2,512,64]{3,2,1,0}) tuple(%p, %out, %k)
}

%cond (p.1: (s32[], bf16[2,4,512,64], bf16[2,2,512,64])) -> pred[] {
  ROOT %c = pred[] constant(true)
}

%cond5 (c: (s32[], f32[2,2])) -> pred[] {
  %five = s32[]{:T(128)} constant(5)
  %c = (s32[]{:T(128)}, f32[2,2]{1,0}) parameter(0)
  %i = s32[]{:T(128)} get-tuple-element(%c), index=0
  ROOT %lt = pred[]{:T(512)} compare(%i, %five), direction=LT
}

%body5 (b: (s32[], f32[2,2])) -> (s32[], f32[2,2]) {
  %b = (s32[], f32[2,2]{1,0}) parameter(0)
  %x = f32[2,2]{1,0} get-tuple-element(%b), index=1
  %y = f32[2,2]{1,0:T(8,128)} dot(%x, %x), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  ROOT %t5 = (s32[], f32[2,2]{1,0}) tuple(%b, %y)
}

%loop (a: f32[9,3]) -> pred[] {
  %w = f32[3,6]{1,0} constant({...})
  ROOT %d = f32[9,6]{1,0} dot(%a, %w), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

ENTRY %main (x: f32[1,10,10,3], k: f32[2,2,3,8]) -> f32[] {
  %x = f32[1,10,10,3]{3,2,1,0} parameter(0)
  %k = f32[2,2,3,8]{3,2,1,0} parameter(1)
  %conv = f32[1,5,5,8]{3,2,1,0} convolution(%x, %k), window={size=2x2 stride=2x2}, dim_labels=b01f_01io->b01f
  %init = (s32[], bf16[2,4,512,64]{3,2,1,0}, bf16[2,2,512,64]{3,2,1,0}) tuple()
  %w = (s32[], bf16[2,4,512,64]{3,2,1,0}, bf16[2,2,512,64]{3,2,1,0}) while(%init), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"6"}}
  %a = f32[9,3]{1,0} constant({...})
  %u = pred[] while(%a), condition=%cond, body=%loop
  %tpu = (s32[], f32[2,2]{1,0}) while(%init), condition=%cond5, body=%body5
  ROOT %r = f32[] constant(0)
}
"""


def test_kernels_convolutions_and_loops_from_hlo_text():
    got = flops.hlo_flops(HLO)
    # conv: 2 x 200 outputs x (2 * 2 * 3) taps; the loop without a trip count: once; the
    # TPU-style loop (no known_trip_count) runs its `i < 5` condition's 5 times.
    assert got.dot_flops == 2 * 200 * 12 + 2 * 9 * 6 * 3 + 5 * 2 * 2 * 2 * 2
    assert got.unknown_trip_loops == 1
    # splash over 512 tokens = one 512 block, so causal computes it whole: per call
    # 2 * B N T S H per matmul, fwd 2 matmuls, dq 3; the loop runs 6 times.
    one = 2.0 * 2 * 4 * 512 * 512 * 64
    assert got.kernel_flops == pytest.approx(6 * (2 + 3) * one)
    assert got.kernel_calls == {
        "splash_mha_fwd_segmented_no_residuals": 6,
        "splash_mha_dq_segmented": 6,  # named by the TPU compiler's instruction
    }
    assert got.uncounted_calls == {"SomethingElse": 6}
    with pytest.raises(ValueError, match="no ENTRY"):
        flops.hlo_flops("HloModule x\n")


def test_train_step_flops_match_the_model():
    # The planner's path on XLA:CPU: the real train step (3 scanned LLM layers, 2 tower
    # layers, 2 micro-batches, a 4-chunk loss) over 2 devices; compiled per-chip matmul
    # FLOPs x 2 against the model's executed FLOPs (metrics.step_flops + recompute).
    from lov_jax.testing import train_runs
    from lov_jax.train.step import Trainer

    micro = train_runs.MICRO
    cfg = micro.replace(
        text=dataclasses.replace(micro.text, num_layers=3),
        vision=dataclasses.replace(micro.vision, num_layers=2),
        remat_policy="none",
        attention_impl="xla",
    )
    config = train_runs.stage_config()
    mesh = sharding.make_mesh(1, -1, 1, devices=jax.devices()[:2])
    trainer = Trainer(cfg, config.optim, mesh, total_steps=10, loss_chunk=32)
    a, b, n, length = 2, 4, 2, 128
    batch = trainer.abstract_batch(b, length, n, micro_batches=a)
    compiled = trainer.lower(trainer.abstract_state(), batch).compile()
    got = flops.hlo_flops(compiled.as_text())
    assert got.unknown_trip_loops == 0 and not got.kernel_calls
    expected = flops.executed_flops(
        cfg, [length] * (a * b), a * b * n, config.optim.trainable, rows=a * b,
        seq_len=length, loss_chunk=32, recompute=REMAT_RECOMPUTE[cfg.remat_policy],
    )  # fmt: skip
    assert got.total * 2 == pytest.approx(expected, rel=0.05)
    assert _cost_flops(compiled) * 2 < 0.6 * expected  # XLA counts each body once


@pytest.mark.skipif(
    not __import__("lov_jax.plan", fromlist=["x"]).libtpu_available(),
    reason="libtpu not installed (pip install -e .[tpu]): cannot AOT-compile for TPU",
)
def test_tpu_plan_counts_splash_and_loops():
    # The TPU compiler's HLO: splash kernels by name, loops without known_trip_count.
    from pathlib import Path

    from lov_jax import plan
    from lov_jax.train.config_loading import load_config

    root = Path(__file__).resolve().parents[2]
    config = load_config(f"{root}/configs/stage2_ov.py:tiny")
    config.data.seq_len, config.data.max_crops = 1024, 1
    with jax.default_matmul_precision("default"):
        res = plan.plan(config, "v5e-8", fsdp=4, tensor=2, attention="splash", remat="none")
    assert res.compiled_flops == pytest.approx(res.executed_flops, rel=0.05)
    assert res.xla_cost_flops < res.compiled_flops
