"""The rules table on meshes the LLM divides and the vision tower does not: the tower and
the projector's input have their own logical names (`vision_embed`, `vision_mlp`,
`vision_heads`), replicated where their mesh axes do not divide them."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
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


class FakeTpu:
    """What mesh_utils reads of a TPU device (jax's own mesh_utils tests do the same)."""

    platform = "tpu"

    def __init__(self, i, coords, kind="TPU v5p", slice_index=0, core=0):
        self.id, self.coords, self.device_kind = i, coords, kind
        self.slice_index, self.core_on_chip, self.process_index = slice_index, core, i // 4

    def __repr__(self):
        return f"TPU({self.id}, {self.coords}, slice {self.slice_index})"


def fake_slice(dims, kind, slice_index=0, start=0):
    import itertools

    cells = itertools.product(*(range(n) for n in reversed(dims)))
    return [FakeTpu(start + i, tuple(reversed(c)), kind, slice_index) for i, c in enumerate(cells)]


def _groups(array, axis):
    """The device groups along one mesh axis (every other index fixed)."""
    moved = np.moveaxis(array, axis, -1)
    return moved.reshape(-1, moved.shape[-1])


def _box(group):
    coords = np.array([d.coords for d in group])
    return int(np.prod(coords.max(0) - coords.min(0) + 1))


@pytest.mark.parametrize(
    "dims, kind, shape",
    [
        ((4, 4, 4), "TPU v5p", (1, 8, 1, 8)),  # v5p-128: tensor=8 splits a 4-wide axis
        ((4, 4, 4), "TPU v5p", (2, 4, 1, 8)),
        ((16, 16, 1), "TPU v6 lite", (1, 32, 1, 8)),  # v6e-256
        ((16, 16, 1), "TPU v6 lite", (1, 16, 2, 8)),
    ],
)
def test_device_order_splits_physical_axes(dims, kind, shape):
    devices = fake_slice(dims, kind)
    array = sharding.device_array(shape, devices)
    assert array.shape == shape
    assert sorted(d.id for d in array.flat) == list(range(len(devices)))
    # each tensor group is a compact block of the torus (8 chips in a box of 8)
    for group in _groups(array, 3):
        assert _box(group) == len(group), group


def test_device_order_over_slices_and_dcn_hygiene():
    devices = fake_slice((2, 2, 1), "TPU v5p", 0) + fake_slice((2, 2, 1), "TPU v5p", 1, 4)
    array = sharding.device_array((1, 2, 1, 2), devices, dcn_data=2)
    assert array.shape == (2, 2, 1, 2)
    for d in range(2):  # data index d = slice d; fsdp x tensor inside it
        assert {dev.slice_index for dev in array[d].flat} == {d}
    with pytest.raises(ValueError, match=r"2 TPU slices but dcn_data=1: fsdp=4 x tensor=2 .*DCN"):
        sharding.device_array((1, 4, 1, 2), devices)
    with pytest.raises(ValueError, match=r"dcn_data=4"):
        sharding.device_array((1, 2, 1, 1), devices, dcn_data=4)


@pytest.mark.skipif(
    not __import__("lov_jax.plan", fromlist=["x"]).libtpu_available(),
    reason="libtpu not installed (pip install -e .[tpu]): no TPU topology devices",
)
@pytest.mark.parametrize(
    "name, shape",
    [("v5p-128", (1, 8, 1, 8)), ("v6e-256", (1, 32, 1, 8)), ("v6e-256", (1, 16, 1, 16))],
)
def test_planner_lays_split_meshes_on_topologies(name, shape):
    from lov_jax import plan

    topo = plan.parse_topology(name)
    mesh = plan.build_mesh(plan.topology_devices(topo), shape)
    assert tuple(mesh.shape.values()) == shape
    for group in _groups(mesh.devices, 3):
        assert _box(group) == len(group)
