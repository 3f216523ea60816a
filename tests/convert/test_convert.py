"""HF <-> Orbax conversion: bit-exact round trips, HF loading, meshes, atomicity, errors, CLI."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
import pytest

import lov_jax
from lov_jax.cli import main
from lov_jax.convert import export, io_utils, orbax_io
from lov_jax.convert.export import orbax_to_hf
from lov_jax.convert.hf_keys import CheckpointError, flatten, params_to_hf
from lov_jax.convert.import_hf import hf_to_orbax
from lov_jax.convert.safetensors_io import (
    INDEX_NAME,
    load_hf_checkpoint,
    read_safetensors,
    write_safetensors,
)
from lov_jax.models.llava_onevision import abstract_params
from lov_jax.sharding import make_mesh, params_sharding
from lov_jax.testing.hf_checkpoints import make_tiny_hf

VOCAB = 1024  # round trips never look tokens up; keeps files ~1 MB


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {
        name: make_tiny_hf(root / name, tie_word_embeddings=tied, vocab_size=VOCAB)
        for name, tied in (("tied", True), ("untied", False))
    }


def _tree_snapshot(d: Path) -> dict:
    """{relative path: (size, mtime_ns, bytes)} of every file under `d`."""
    return {
        str(p.relative_to(d)): (p.stat().st_size, p.stat().st_mtime_ns, p.read_bytes())
        for p in sorted(d.rglob("*"))
        if p.is_file()
    }


def _make_input(src: Path, out: Path, layout: str, dtype: str) -> dict[str, np.ndarray]:
    """An HF dir in `layout` and `dtype` built from `src`; returns its tensors."""
    cfg, params = load_hf_checkpoint(src, dtype=dtype)
    tensors = params_to_hf(params, cfg, layout=layout)
    write_safetensors(tensors, out)
    shutil.copy(src / "config.json", out / "config.json")
    (out / "tokenizer_config.json").write_text('{"model_max_length": 32768}\n')
    return tensors


def _no_leftovers(parent: Path, name: str) -> bool:
    return not any(p.name.startswith(f".{name}.") for p in parent.iterdir())


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize(
    "layout,variant", [("hf", "tied"), ("hf_legacy", "untied"), ("lmms_lab", "untied")]
)
def test_round_trip_bit_exact(tiny, tmp_path, layout, variant, dtype):
    src = tmp_path / "in"
    tensors = _make_input(tiny[variant], src, layout, dtype)
    before = _tree_snapshot(src)
    hf_to_orbax(src, tmp_path / "orbax", progress=False)
    orbax_to_hf(tmp_path / "orbax", tmp_path / "out", progress=False)
    assert _tree_snapshot(src) == before  # input untouched

    cfg, params = load_hf_checkpoint(src)
    want = params_to_hf(params, cfg, layout="hf")  # what transformers itself writes
    got = read_safetensors(tmp_path / "out")
    assert sorted(got) == sorted(want)
    assert len(want) == len(tensors)
    for k, x in want.items():
        assert got[k].dtype == np.dtype(dtype), k
        assert got[k].tobytes() == x.tobytes(), k  # bit-exact, NaN payloads included
    assert ("language_model.lm_head.weight" in got) == (variant == "untied")
    out_cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert out_cfg == {**cfg.to_hf_config(), "dtype": dtype}
    assert (tmp_path / "out" / "tokenizer_config.json").is_file()
    ids = cfg.ids  # the source checkpoint's own (a 1024-entry ChatML BPE: two stop ids)
    assert json.loads((tmp_path / "out" / "generation_config.json").read_text()) == {
        "eos_token_id": list(ids.eos),
        "pad_token_id": ids.pad,
    }


@pytest.fixture(scope="module")
def full_vocab(tmp_path_factory):
    """Tiny models with the real vocab (the prompt uses Qwen token ids), exported via Orbax."""
    root = tmp_path_factory.mktemp("full")
    out = {}
    for name, tied in (("tied", True), ("untied", False)):
        src = make_tiny_hf(root / f"{name}_src", tie_word_embeddings=tied, seed=1)
        hf_to_orbax(src, root / f"{name}_orbax", progress=False)
        orbax_to_hf(root / f"{name}_orbax", root / f"{name}_out", progress=False)
        out[name] = (src, root / f"{name}_out")
    return out


def _logits(model, sample, keep: int = 32):
    """float32[keep, V]: the last `keep` positions (all attend to the 1485 image tokens)."""
    import torch

    kwargs = {k: torch.from_numpy(np.asarray(v)) for k, v in sample.hf_kwargs.items()}
    ids = torch.from_numpy(sample.tokens.astype(np.int64))[None]
    with torch.no_grad():
        out = model(
            input_ids=ids, attention_mask=torch.ones_like(ids), logits_to_keep=keep, **kwargs
        )
    return out.logits[0].float().numpy()


@pytest.mark.parametrize("variant", ["tied", "untied"])
def test_export_loads_in_transformers_with_equal_logits(full_vocab, variant):
    import torch
    from transformers import LlavaOnevisionForConditionalGeneration

    from lov_jax.testing.hf_checkpoints import single_image_sample

    src, out = full_vocab[variant]
    model, info = LlavaOnevisionForConditionalGeneration.from_pretrained(
        out, output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert not info.get("mismatched_keys"), info
    ref = LlavaOnevisionForConditionalGeneration.from_pretrained(src).eval()
    model.eval()
    cfg, _ = load_hf_checkpoint(out)
    sample = single_image_sample(384, 384, cfg)  # 1 crop -> 1485 image tokens
    assert int((sample.tokens == cfg.ids.image).sum()) == 1485
    np.testing.assert_array_equal(_logits(model, sample), _logits(ref, sample))
    head, embed = model.lm_head.weight, model.get_input_embeddings().weight
    tied = head.data_ptr() == embed.data_ptr()
    assert tied == (variant == "tied")
    assert torch.equal(head, ref.lm_head.weight)
    names = set(read_safetensors(out))
    assert ("language_model.lm_head.weight" in names) == (variant == "untied")


@pytest.fixture(scope="module")
def orbax_ckpt(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("ob") / "ckpt"
    hf_to_orbax(tiny["untied"], out, progress=False)
    return out


@pytest.mark.parametrize("axes", [dict(fsdp=4, tensor=2), dict(data=2, fsdp=4, tensor=1)])
def test_restore_onto_meshes(tiny, orbax_ckpt, axes):
    cfg, want = load_hf_checkpoint(tiny["untied"])
    mesh = make_mesh(**axes)
    cfg2, got = lov_jax.load_pretrained(orbax_ckpt, mesh=mesh)
    assert cfg2 == cfg
    shardings = flatten(params_sharding(abstract_params(cfg), mesh))
    fw, fg = flatten(want), flatten(got)
    assert sorted(fw) == sorted(fg)
    for k in fw:
        assert isinstance(fg[k], jax.Array)
        assert fg[k].sharding.is_equivalent_to(shardings[k], fw[k].ndim), k
        np.testing.assert_array_equal(np.asarray(fg[k]), fw[k], err_msg=k)
    # HF dir and cast: same entry point
    cfg3, bf = lov_jax.load_pretrained(tiny["untied"], dtype="bfloat16")
    assert cfg3 == cfg and flatten(bf)[k].dtype == ml_dtypes.bfloat16


def test_sharded_save_restores_on_other_mesh(tiny, tmp_path):
    hf_to_orbax(tiny["tied"], tmp_path / "o", mesh="fsdp=4,tensor=2", progress=False)
    _, want = load_hf_checkpoint(tiny["tied"])
    _, got = lov_jax.load_pretrained(tmp_path / "o", mesh=make_mesh(data=2, fsdp=4, tensor=1))
    for k, x in flatten(want).items():
        np.testing.assert_array_equal(np.asarray(flatten(got)[k]), x, err_msg=k)


def _manager_run(root: Path, params_by_step: dict, cfg) -> None:
    """A training-style CheckpointManager dir (items as in lov_jax/train/checkpoint.py)."""
    mgr = ocp.CheckpointManager(
        root,
        options=ocp.CheckpointManagerOptions(create=True, enable_async_checkpointing=False),
        item_names=("params", "opt_state", "config", "data_iter"),
    )
    for step, params in params_by_step.items():
        opt = jax.tree.map(np.zeros_like, params)
        mgr.save(
            step,
            args=ocp.args.Composite(
                params=ocp.args.StandardSave(params),
                opt_state=ocp.args.StandardSave({"mu": opt}),
                config=ocp.args.JsonSave({"model": cfg.to_hf_config(), "stage": {"lr": 1e-5}}),
                data_iter=ocp.args.JsonSave({"pos": step}),
            ),
        )
    mgr.wait_until_finished()
    mgr.close()


def test_cli_training_run_to_hf(tiny, tmp_path, capsys):
    cfg, params = load_hf_checkpoint(tiny["untied"])
    p2 = jax.tree.map(lambda x: (x * 2).astype(np.float32), params)
    _manager_run(tmp_path / "work" / "checkpoints", {1: params, 2: p2}, cfg)
    (tmp_path / "tok").mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):  # the checkpoint's own
        shutil.copy(tiny["untied"] / name, tmp_path / "tok" / name)

    args = ["convert", "orbax-to-hf", "--no-progress", "--max-shard-size", "200KB"]
    assert main([*args, "--ckpt", str(tmp_path / "work"), "--out", str(tmp_path / "latest")]) == 0
    assert "orbax-to-hf: 69 tensors" in capsys.readouterr().out
    assert (tmp_path / "latest" / INDEX_NAME).is_file()  # sharded
    got = read_safetensors(tmp_path / "latest")
    for k, x in params_to_hf(p2, cfg).items():
        assert got[k].tobytes() == x.tobytes(), k

    root = str(tmp_path / "work" / "checkpoints")
    out1 = str(tmp_path / "step1")
    rc = main([*args, "--ckpt", root, "--step", "1", "--out", out1, "--dtype", "bfloat16",
               "--assets", str(tmp_path / "tok")])  # fmt: skip
    assert rc == 0
    got = read_safetensors(out1)
    for k, x in params_to_hf(params, cfg).items():
        assert got[k].tobytes() == x.astype(ml_dtypes.bfloat16).tobytes(), k
    assert (Path(out1) / "tokenizer.json").is_file()

    # the same run through the library loader and the other CLI direction
    cfg2, latest = lov_jax.load_pretrained(tmp_path / "work", step=2)
    assert cfg2 == cfg
    np.testing.assert_array_equal(flatten(latest)["image_newline"], p2["image_newline"])
    rc = main(["convert", "hf-to-orbax", "--no-progress", "--hf", out1, "--out",
               str(tmp_path / "back"), "--dtype", "float32"])  # fmt: skip
    assert rc == 0 and "hf-to-orbax: 69 tensors" in capsys.readouterr().out
    # bad step: one error, exit code 1, nothing written
    assert main([*args, "--ckpt", root, "--step", "7", "--out", str(tmp_path / "x")]) == 1
    assert "no step 7" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_failed_export_leaves_nothing(orbax_ckpt, tmp_path, monkeypatch):
    calls = []

    def failing_write(self, name, x):
        calls.append(name)
        if len(calls) == 5:
            raise OSError("disk full (simulated)")
        return real_write(self, name, x)

    real_write = export.ShardWriter.write
    monkeypatch.setattr(export.ShardWriter, "write", failing_write)
    before = _tree_snapshot(orbax_ckpt)
    with pytest.raises(OSError, match="simulated"):
        orbax_to_hf(orbax_ckpt, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists() and _no_leftovers(tmp_path, "out")
    # with --overwrite, a failure keeps the old output as it was
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("old")
    (tmp_path / "out" / io_utils.MARKER).write_text("{}")  # an earlier conversion's output
    calls.clear()
    with pytest.raises(OSError, match="simulated"):
        orbax_to_hf(orbax_ckpt, tmp_path / "out", overwrite=True, progress=False)
    assert sorted(os.listdir(tmp_path / "out")) == sorted([io_utils.MARKER, "keep.txt"])
    assert _no_leftovers(tmp_path, "out")
    assert _tree_snapshot(orbax_ckpt) == before


def test_failed_import_leaves_nothing(tiny, tmp_path, monkeypatch):
    def fail(*a, **k):  # after Orbax has written params into the temp dir
        raise OSError("interrupted (simulated)")

    monkeypatch.setattr(orbax_io, "copy_assets", fail)
    src = tiny["tied"]
    before = _tree_snapshot(src)
    with pytest.raises(OSError, match="simulated"):
        hf_to_orbax(src, tmp_path / "o", progress=False)
    assert not (tmp_path / "o").exists() and _no_leftovers(tmp_path, "o")
    assert _tree_snapshot(src) == before


def test_one_error_lists_every_problem(tiny, tmp_path):
    cfg, params = load_hf_checkpoint(tiny["untied"])
    t = params_to_hf(params, cfg, layout="hf_legacy")
    del t["language_model.model.layers.1.mlp.up_proj.weight"]  # missing
    t["language_model.model.norm.weight"] = np.zeros(7, np.float32)  # misshapen
    t["vision_tower.vision_model.head.probe"] = np.zeros(3, np.float32)  # unknown
    bad = tmp_path / "bad"
    write_safetensors(t, bad)
    shutil.copy(tiny["untied"] / "config.json", bad)
    (tmp_path / "exists").mkdir()
    with pytest.raises(CheckpointError) as err:
        hf_to_orbax(bad, tmp_path / "exists", progress=False)
    msg = str(err.value)
    for needle in (
        "4 problem(s)",
        "already exists",
        "missing language_model/layers/mlp/up_proj/kernel layer 1",
        "shape mismatch 'language_model.model.norm.weight': expected [48], got [7]",
        "unknown key 'vision_tower.vision_model.head.probe'",
    ):
        assert needle in msg, msg
    assert os.listdir(tmp_path / "exists") == []

    # a truncated shard (checked from headers before any data is read), plus the same output
    sharded = tmp_path / "sharded"
    write_safetensors(params_to_hf(params, cfg), sharded, max_shard_size="100KB")
    shutil.copy(tiny["untied"] / "config.json", sharded)
    shard = sorted(sharded.glob("model-*.safetensors"))[1]
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(CheckpointError) as err:
        hf_to_orbax(sharded, tmp_path / "exists", progress=False)
    assert "2 problem(s)" in str(err.value) and "truncated" in str(err.value)
    assert shard.name in str(err.value)

    # export side: not a checkpoint + output inside the input
    with pytest.raises(CheckpointError) as err:
        orbax_to_hf(tmp_path / "exists", tmp_path / "exists" / "sub", progress=False)
    assert "2 problem(s)" in str(err.value) and "not an Orbax checkpoint" in str(err.value)


def test_atomic_output_helper(tmp_path):
    with io_utils.atomic_output(tmp_path / "d") as tmp:
        tmp.mkdir()
        (tmp / "f").write_text("x")
        assert not (tmp_path / "d").exists()
    assert (tmp_path / "d" / "f").read_text() == "x" and _no_leftovers(tmp_path, "d")
