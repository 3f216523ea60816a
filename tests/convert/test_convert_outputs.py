"""What conversions leave on disk: --overwrite only over their own outputs, orphaned partials
of killed runs, non-finite / out-of-range numbers named per tensor, a full disk."""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import subprocess
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from lov_jax.cli import main
from lov_jax.convert import export, io_utils, orbax_io
from lov_jax.convert.hf_keys import CheckpointError, flatten, params_to_hf
from lov_jax.convert.import_hf import hf_to_orbax
from lov_jax.convert.safetensors_io import load_hf_checkpoint, read_safetensors, write_safetensors
from lov_jax.testing.hf_checkpoints import make_tiny_hf

NAN_KEY = "language_model.model.layers.0.mlp.down_proj.weight"  # layout "hf" names
BIG_KEY = "multi_modal_projector.linear_1.bias"


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return make_tiny_hf(tmp_path_factory.mktemp("hf") / "tiny", vocab_size=640, seed=3)


@pytest.fixture(scope="module")
def orbax_dir(hf_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("ob") / "ckpt"
    hf_to_orbax(hf_dir, out, progress=False)
    return out


def _edited(src: Path, dst: Path, edit) -> Path:
    """A copy of HF dir `src` whose tensors went through `edit(dict)`."""
    cfg, params = load_hf_checkpoint(src)
    tensors = params_to_hf(params, cfg, layout="hf")
    edit(tensors)
    write_safetensors(tensors, dst)
    for f in src.iterdir():
        if not f.name.endswith(".safetensors") and f.is_file():
            shutil.copy(f, dst / f.name)
    return dst


def _run(capsys, *argv) -> tuple[int, str]:
    rc = main(["convert", *argv, "--no-progress"])
    return rc, capsys.readouterr().err


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".partial-" in p.name or ".old-" in p.name)


def test_overwrite_replaces_only_conversion_outputs(hf_dir, orbax_dir, tmp_path, capsys):
    user = tmp_path / "mine"
    user.mkdir()
    (user / "notes.txt").write_text("keep me")
    for argv in (
        ["orbax-to-hf", "--ckpt", str(orbax_dir), "--out", str(user), "--overwrite"],
        ["hf-to-orbax", "--hf", str(hf_dir), "--out", str(user), "--overwrite"],
    ):
        rc, err = _run(capsys, *argv)
        assert rc == 1 and f"output {user} exists and was not written by lov-jax convert" in err
        assert os.listdir(user) == ["notes.txt"]
    # a conversion's own output carries the marker and may be replaced
    out = tmp_path / "hf_out"
    assert _run(capsys, "orbax-to-hf", "--ckpt", str(orbax_dir), "--out", str(out))[0] == 0
    assert io_utils.is_tool_output(out) and (out / io_utils.MARKER).is_file()
    (out / "model.safetensors").write_bytes(b"stale")
    rc, _ = _run(capsys, "orbax-to-hf", "--ckpt", str(orbax_dir), "--out", str(out), "--overwrite")
    assert rc == 0 and len(read_safetensors(out)) > 0 and _leftovers(tmp_path) == []
    assert io_utils.is_tool_output(orbax_dir)  # hf-to-orbax writes it too
    # a plain file at --out is never a conversion output
    (tmp_path / "f").write_text("x")
    with pytest.raises(CheckpointError, match="was not written by lov-jax convert"):
        export.orbax_to_hf(orbax_dir, tmp_path / "f", overwrite=True, progress=False)


def _dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def _fake_partial(parent: Path, name: str, tag: str, pid: int, host: str | None = None) -> Path:
    partial = parent / f".{name}.partial-{tag}"
    (partial / "params").mkdir(parents=True)
    (partial / "params" / "blob").write_bytes(b"\0" * 4096)
    (parent / f".{name}.partial-{tag}.orbax-checkpoint-tmp-1").mkdir()
    owner = {"host": host or socket.gethostname(), "pid": pid}
    (parent / f".{name}.partial-{tag}.owner").write_text(json.dumps(owner))
    return partial


def test_orphaned_partials_cleaned_by_next_run(hf_dir, orbax_dir, tmp_path, capsys):
    dead = _dead_pid()
    _fake_partial(tmp_path, "a", f"{dead}-0001", dead)  # killed converting to `a`
    _fake_partial(tmp_path, "b", f"{dead}-0002", dead)  # killed mid --overwrite of `b`:
    (tmp_path / ".b.old-0002").mkdir()  # the old `b` moved aside, the new one not yet in
    (tmp_path / ".b.old-0002" / "weights").write_text("old b")
    os.rename(tmp_path / ".b.old-0002", tmp_path / f".b.old-{dead}-0002")
    live = _fake_partial(tmp_path, "c", "77-0003", os.getppid())  # running elsewhere
    other = _fake_partial(tmp_path, "d", f"{dead}-0004", dead, host="another-host")
    (tmp_path / ".e.partial-55-0005").mkdir()  # no owner file: only named

    rc, err = _run(capsys, "orbax-to-hf", "--ckpt", str(orbax_dir), "--out", str(tmp_path / "x"))
    assert rc == 0
    assert f"removed {tmp_path / f'.a.partial-{dead}-0001'}" in err
    assert (tmp_path / "b" / "weights").read_text() == "old b" and "restored" in err
    assert str(tmp_path / ".e.partial-55-0005") in err
    assert _leftovers(tmp_path) == sorted(
        [live.name, live.name + ".orbax-checkpoint-tmp-1", live.name + ".owner", other.name,
         other.name + ".orbax-checkpoint-tmp-1", other.name + ".owner", ".e.partial-55-0005"]
    )  # fmt: skip
    # a live conversion to the same output: refused at once, its partial untouched
    rc, err = _run(capsys, "hf-to-orbax", "--hf", str(hf_dir), "--out", str(tmp_path / "c"))
    assert rc == 1 and f"pid {os.getppid()}" in err and "being written by another" in err
    assert live.is_dir() and not (tmp_path / "c").exists()


def test_nonfinite_and_out_of_range_named_per_tensor(hf_dir, tmp_path, capsys):
    def edit(t):
        t[NAN_KEY] = t[NAN_KEY].copy()
        t[NAN_KEY][0, :3] = [np.nan, np.inf, -np.inf]
        t[BIG_KEY] = t[BIG_KEY].copy()
        t[BIG_KEY][1] = 1.5e5  # finite in float32 / bfloat16, inf in float16

    src = _edited(hf_dir, tmp_path / "bad_hf", edit)
    out = tmp_path / "o"
    rc, err = _run(capsys, "hf-to-orbax", "--hf", str(src), "--out", str(out))
    assert rc == 1 and f"{NAN_KEY}: 3 non-finite value(s)" in err and BIG_KEY not in err
    assert not out.exists() and _leftovers(tmp_path) == []
    rc, err = _run(capsys, "hf-to-orbax", "--hf", str(src), "--out", str(out), "--dtype", "float16")
    assert rc == 1 and f"{BIG_KEY}: 1 value(s) outside the float16 range (max |x| 150000" in err
    assert "2 tensor(s)" in err and not out.exists()
    # allowed: warnings naming the tensors, the values kept
    rc, err = _run(capsys, "hf-to-orbax", "--hf", str(src), "--out", str(out), "--allow-nonfinite")
    assert rc == 0 and f"warning: {NAN_KEY}: 3 non-finite" in err and "--allow-nonfinite" in err
    leaf = orbax_io.restore_leaf(out, "language_model/layers/mlp/down_proj/kernel")
    assert np.isnan(leaf).any() and np.isposinf(leaf).any()

    # export side: the stored fp32 value overflows float16 only; the HF name is given
    def fix_nan(t):
        t[NAN_KEY] = np.nan_to_num(t[NAN_KEY], nan=0.0, posinf=0.0, neginf=0.0)

    clean = _edited(src, tmp_path / "big_hf", fix_nan)
    ckpt = tmp_path / "big_orbax"
    assert _run(capsys, "hf-to-orbax", "--hf", str(clean), "--out", str(ckpt))[0] == 0
    rc, err = _run(capsys, "orbax-to-hf", "--ckpt", str(ckpt), "--out", str(tmp_path / "h"),
                   "--dtype", "float16")  # fmt: skip
    assert rc == 1 and f"{BIG_KEY}: 1 value(s) outside the float16 range" in err
    assert not (tmp_path / "h").exists() and _leftovers(tmp_path) == []
    rc, _ = _run(capsys, "orbax-to-hf", "--ckpt", str(ckpt), "--out", str(tmp_path / "h"),
                 "--dtype", "bfloat16")  # fmt: skip
    got = read_safetensors(tmp_path / "h")[BIG_KEY]
    assert rc == 0 and got.dtype == ml_dtypes.bfloat16 and float(got[1]) == 149504.0


def test_disk_full_is_one_error_and_leaves_nothing(
    hf_dir, orbax_dir, tmp_path, capsys, monkeypatch
):
    calls = []
    real_write = export.ShardWriter.write

    def full_write(self, name, x):
        calls.append(name)
        if len(calls) == 7:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(self, name, x)

    monkeypatch.setattr(export.ShardWriter, "write", full_write)
    out = tmp_path / "hf"
    rc, err = _run(capsys, "orbax-to-hf", "--ckpt", str(orbax_dir), "--out", str(out))
    assert rc == 1 and err.startswith("error: no space left on the device of") and str(out) in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not out.exists() and _leftovers(tmp_path) == []
    monkeypatch.setattr(export.ShardWriter, "write", real_write)
    assert _run(capsys, "orbax-to-hf", "--ckpt", str(orbax_dir), "--out", str(out))[0] == 0

    def full_assets(*a, **k):  # after Orbax wrote the params into the partial dir
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(orbax_io, "copy_assets", full_assets)
    rc, err = _run(capsys, "hf-to-orbax", "--hf", str(hf_dir), "--out", str(tmp_path / "ob"))
    assert rc == 1 and "no space left" in err and not (tmp_path / "ob").exists()
    assert _leftovers(tmp_path) == []
    # the exported dir from before is whole: every tensor of the checkpoint
    cfg, params = load_hf_checkpoint(out)
    assert sorted(flatten(params)) == sorted(orbax_io.param_metadata(orbax_dir))
