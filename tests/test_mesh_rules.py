"""The rules table on meshes the LLM divides and the vision tower does not: the tower and
the projector's input have their own logical names (`vision_embed`, `vision_mlp`,
`vision_heads`), replicated where their mesh axes do not divide them."""

from __future__ import annotations

import dataclasses

import jax
import pytest
from jax.sharding import PartitionSpec as P

from lov_jax import sharding
from lov_jax.plan import PlanError, check_divisible


def test_fit_spec_replicates_only_uneven_tower_dims():
    # SigLIP-400m on v6e-256 at fsdp=256 x tensor=1: 1152 = 2^7 x 9 is not a multiple
    # of 256, 4304 = 2^4 x 269 is over tensor=16; the LLM's dims keep their axes.
    sizes = {"data": 1, "fsdp": 256, "context": 1, "tensor": 16}
    assert sharding.fit_spec(("vision_embed", "vision_mlp"), (1152, 4304), sizes) == P(
        None, "tensor"
    )
    assert sharding.fit_spec(("vision_embed", "vision_heads", None), (1152, 16, 72), sizes) == (
        P(None, "tensor", None)
    )
    sizes["fsdp"] = 128
    assert sharding.fit_spec(("vision_embed", "vision_mlp"), (1152, 4304), sizes) == P(
        ("fsdp", "context"), "tensor"
    )
    # the LLM's names are never silently replicated: jit / check_divisible refuse them
    assert sharding.fit_spec(("embed", "mlp"), (1000, 3), sizes) == P(("fsdp", "context"), "tensor")
    # the tower's names map independently of the LLM's
    rules = dict(sharding.LOGICAL_AXIS_RULES)
    assert {"vision_embed", "vision_mlp", "vision_heads"} <= set(rules)


def _cfg(vision_width: int, text_width: int):
    from lov_jax.testing import train_runs

    m = train_runs.MICRO
    return m.replace(
        vision=dataclasses.replace(m.vision, hidden_size=vision_width, intermediate_size=60),
        text=dataclasses.replace(m.text, hidden_size=text_width),
    )


def _state_shardings(cfg, mesh):
    from lov_jax.lora.adapters import params_and_labels
    from lov_jax.testing import train_runs

    boxed, _ = params_and_labels(cfg, train_runs.stage_config().optim)
    shardings = sharding.params_sharding(boxed, mesh)
    flat = {
        jax.tree_util.keystr(p): (x.value, s)
        for (p, x), s in zip(
            jax.tree_util.tree_leaves_with_path(boxed, is_leaf=lambda x: hasattr(x, "names")),
            jax.tree.leaves(shardings),
            strict=True,
        )
    }
    tree = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s) for k, (v, s) in flat.items()}
    return flat, tree


def test_llm_shards_and_tower_replicates_on_8_devices():
    # fsdp=8 divides the LLM's 64 but not the tower's 36 or its 60-wide MLP (tensor=1).
    mesh = sharding.make_mesh(1, 8, 1, devices=jax.devices()[:8])
    flat, tree = _state_shardings(_cfg(36, 64), mesh)
    check_divisible(tree)  # nothing jit would refuse
    vision = {k: s.spec for k, (v, s) in flat.items() if "vision_tower" in k}
    llm = {k: s.spec for k, (v, s) in flat.items() if "language_model" in k}
    assert vision and llm
    assert all("fsdp" not in str(spec) for spec in vision.values()), vision
    assert any("fsdp" in str(spec) for spec in llm.values())
    proj = {k: s.spec for k, (v, s) in flat.items() if "linear_1" in k and "kernel" in k}
    assert list(proj.values()) == [P(None, "tensor")], proj  # 36 in, 64 out (tensor=1)
    # an LLM width fsdp does not divide is refused, with the array named
    _, tree = _state_shardings(_cfg(36, 60), mesh)
    with pytest.raises(PlanError, match=r"language_model.*embed_tokens.*\(1024, 60\)"):
        check_divisible(tree)
