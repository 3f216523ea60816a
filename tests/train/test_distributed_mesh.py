"""The one mesh constructor (`sharding.make_mesh`) and the one `--mesh` syntax: a stage
config's mesh block, multi-slice included (and the XPK launcher setting `mesh.dcn_data`
for a multi-slice train job), the flag's parser, and every command building the same mesh.

Multi-slice layouts are checked on stand-in devices that carry `slice_index` /
`process_index` (this process's CPU devices are one slice of one process).
"""

from __future__ import annotations

import dataclasses
import subprocess
from pathlib import Path

import jax
import pytest

from configs import common
from lov_jax import sharding
from lov_jax.sharding import make_mesh, mesh_from_config, parse_mesh

REPO = Path(__file__).resolve().parents[2]


@dataclasses.dataclass(frozen=True)
class FakeDevice:
    """What mesh building reads from a device (hashable, like jax.Device)."""

    id: int
    process_index: int
    slice_index: int
    platform: str = "cpu"
    device_kind: str = "cpu"


def _ids(mesh) -> list:
    """Device ids by (data, fsdp, tensor) of a mesh whose context axis has size 1."""
    assert mesh.shape["context"] == 1
    return jax.tree.map(lambda d: d.id, mesh.devices[:, :, 0].tolist())


def test_default_config_uses_every_device():
    mesh = mesh_from_config(common.base_config("tiny").mesh)
    assert dict(mesh.shape) == {"data": 1, "fsdp": 8, "context": 1, "tensor": 1}
    mesh = mesh_from_config({"data": 2, "tensor": 2, "num_devices": 4})
    assert dict(mesh.shape) == {"data": 2, "fsdp": 1, "context": 1, "tensor": 2}
    assert set(mesh.devices.flat) == set(jax.devices()[:4])


def test_two_slices_stack_on_the_data_axis():
    # Two TPU slices of 4 chips, listed interleaved: each row of `data` is one slice.
    devices = [FakeDevice(i, process_index=i // 2, slice_index=i % 2) for i in range(8)]
    mesh = mesh_from_config({"fsdp": 4, "dcn_data": 2}, devices)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "context": 1, "tensor": 1}
    assert _ids(mesh) == [[[0], [2], [4], [6]], [[1], [3], [5], [7]]]
    # data inside a slice too: global data = dcn_data * data, slice-major.
    mesh = mesh_from_config({"data": 2, "fsdp": -1, "dcn_data": 2}, devices)
    assert dict(mesh.shape) == {"data": 4, "fsdp": 2, "context": 1, "tensor": 1}
    assert [{d.slice_index for d in row.flat} for row in mesh.devices] == [{0}, {0}, {1}, {1}]


def test_processes_are_slices_where_devices_have_no_slice_index():
    # A GPU/CPU cluster: every device says slice 0, so each process is a slice.
    devices = [FakeDevice(i, process_index=i // 4, slice_index=0) for i in range(8)]
    mesh = mesh_from_config({"fsdp": -1, "tensor": 2, "dcn_data": 2}, devices)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "context": 1, "tensor": 2}
    assert _ids(mesh) == [[[0, 1], [2, 3]], [[4, 5], [6, 7]]]


def test_mesh_that_does_not_tile_the_devices_names_the_fields():
    named = r"mesh\.data=1 x mesh\.fsdp=8 x mesh\.context=1 x mesh\.tensor=1 x mesh\.dcn_data=2"
    with pytest.raises(ValueError, match=named + ": .* needs 16 devices, have 8"):
        mesh_from_config({"fsdp": 8, "dcn_data": 2})
    with pytest.raises(ValueError, match=r"mesh\.tensor=3 x mesh\.dcn_data=2: .*4 devices per "
                       "slice .* not a multiple of 3"):  # fmt: skip
        mesh_from_config({"tensor": 3, "dcn_data": 2})
    with pytest.raises(ValueError, match="sizes must be >= 1, one may be -1"):
        mesh_from_config({"data": -1, "fsdp": -1})
    with pytest.raises(ValueError, match="sizes must be >= 1"):
        mesh_from_config({"dcn_data": 0})
    with pytest.raises(ValueError, match=r"unknown config.mesh fields \['model'\]"):
        mesh_from_config({"model": 2})
    with pytest.raises(ValueError, match="mesh.num_devices=16: only 8 devices"):
        mesh_from_config({"num_devices": 16})
    # The right count, but one process of one slice cannot be two slices.
    with pytest.raises(ValueError, match="cannot form dcn_data=2 slices"):
        mesh_from_config({"fsdp": 4, "dcn_data": 2})
    with pytest.raises(ValueError, match="do not split into 3 slices"):
        make_mesh(dcn_data=3)


def test_mesh_flag_parser():
    assert parse_mesh("fsdp=4,tensor=2") == {"fsdp": 4, "tensor": 2}
    assert parse_mesh(" data = 2 , fsdp=-1,") == {"data": 2, "fsdp": -1}
    assert parse_mesh("") == {}
    for flag, why in [
        ("pipeline=2", "'pipeline=2': expected AXIS=SIZE"),
        ("fsdp", "'fsdp': expected AXIS=SIZE"),
        ("fsdp=four", "'fsdp=four': 'four' is not an integer"),
        ("tensor=2,tensor=4", "'tensor=4': tensor is given twice"),
        ("1,-1,2", "'1': expected AXIS=SIZE"),  # the old positional syntax
    ]:
        with pytest.raises(ValueError, match=why):
            parse_mesh(flag)
    with pytest.raises(ValueError, match="needs 6 devices, have 8"):
        sharding.mesh_from_flag("fsdp=3,tensor=2")


def test_every_command_builds_the_same_mesh():
    import argparse

    from lov_jax.convert import commands as convert_commands
    from lov_jax.eval import commands as eval_commands
    from lov_jax.inference import commands as generate_commands
    from lov_jax.inference.commands import local_mesh
    from lov_jax.plan import build_mesh, resolve_mesh
    from lov_jax.plan import commands as plan_commands

    flag = "fsdp=4,tensor=2"
    want = make_mesh(1, 4, 2)
    assert dict(want.shape) == {"data": 1, "fsdp": 4, "context": 1, "tensor": 2}
    assert local_mesh(flag) == want  # generate, eval
    assert sharding.mesh_from_flag(flag) == want  # convert hf-to-orbax
    assert mesh_from_config({"fsdp": 4, "tensor": 2}) == want  # train
    shape = resolve_mesh(8, **plan_commands.mesh_sizes(flag))  # plan
    assert build_mesh(jax.devices(), shape) == want
    assert local_mesh(None) is None and sharding.mesh_from_flag("") is None
    # One help text on every --mesh flag.
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    for module in (convert_commands, eval_commands, generate_commands, plan_commands):
        module.add_commands(sub)
    helps = [
        a.help
        for p in [
            *sub.choices.values(),
            *sub.choices["convert"]._subparsers._group_actions[0].choices.values(),
        ]  # fmt: skip
        for a in p._actions
        if "--mesh" in a.option_strings
    ]
    assert len(helps) == 4 and all(h.startswith(sharding.MESH_HELP) for h in helps)


def test_xpk_multi_slice_train_job_sets_dcn_data():
    def command(*args: str) -> str:
        argv = ["bash", str(REPO / "launch/gke_xpk.sh"), "--dry-run", "--cluster", "c",
                "--tpu-type", "v5p-64", *args]  # fmt: skip
        return subprocess.run(argv, capture_output=True, text=True, check=True).stdout

    train = ("train", "--config", "configs/stage2_ov.py:ov_7b", "--workdir", "/gcs/w")
    assert "--workdir /gcs/w --config.mesh.dcn_data=2'" in command("--num-slices", "2", *train)
    own = command("--num-slices", "2", *train, "--config.mesh.dcn_data=1")
    assert own.count("dcn_data") == 1 and "dcn_data=1" in own
    assert "dcn_data" not in command(*train)  # one slice
    assert "dcn_data" not in command("--num-slices", "2", "eval", "--ckpt", "/gcs/w")


def test_context_axis_in_config_flag_and_rules():
    from jax.sharding import PartitionSpec as P

    from lov_jax.models import ring

    mesh = mesh_from_config({"fsdp": 2, "context": 4, "context_strategy": "all_gather"})
    assert dict(mesh.shape) == {"data": 1, "fsdp": 2, "context": 4, "tensor": 1}
    want = make_mesh(fsdp=2, tensor=2, context=2)
    assert sharding.mesh_from_flag("context=2,tensor=2,fsdp=2") == want
    assert parse_mesh("context=-1, tensor=2") == {"context": -1, "tensor": 2}
    with pytest.raises(ValueError, match=r"mesh\.context=3 .* not a multiple of 3"):
        mesh_from_config({"context": 3})
    stage = common.base_config("tiny").mesh
    assert sharding.context_from_config(stage) == ring.ContextParallel("ring", "zigzag")
    # The LLM's tokens over context, the tower's crops too; params over fsdp x context.
    act = sharding.logical_to_spec(("activation_batch", "activation_length", "activation_embed"))
    assert act == P(("data", "fsdp"), "context", None)
    assert sharding.logical_to_spec(("activation_crops",)) == P(("data", "fsdp", "context"))
    assert sharding.logical_to_spec(("embed", "mlp")) == P(("fsdp", "context"), "tensor")
