"""SIGKILL `lov-jax convert` (both ways) and `lov-jax eval` (subprocesses, a tiny model) at a
few points, then rerun the same command: the result equals an uninterrupted run's, and
nothing half-written is ever left where a later command would take it."""

from __future__ import annotations

import json
import os
import random
import select
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from lov_jax.cli import main
from lov_jax.convert import io_utils, orbax_io
from lov_jax.convert.safetensors_io import read_safetensors
from lov_jax.testing.hf_checkpoints import make_tiny_hf

ROOT = Path(__file__).resolve().parents[2]

# Runs `lov-jax ARGV...` and parks (prints PARKED, sleeps) at one point; the test kills it.
# read N: hf-to-orbax after N tensors read; write N: orbax-to-hf after N tensors written;
# rename: the partial output complete and fsync'd, not yet renamed into place;
# predict N: eval at its N-th batch (the N - 1 before it written to the shard file).
_PARKED = textwrap.dedent(
    """
    import sys, time
    from lov_jax.convert import export, import_hf, io_utils
    from lov_jax.eval import runner

    mode, at, argv, calls = sys.argv[1], int(sys.argv[2]), sys.argv[3:], []

    def park():
        print("PARKED", flush=True)
        time.sleep(300)

    def after(cls, name, nth):
        real = getattr(cls, name)

        def wrapped(*a, **k):
            calls.append(1)
            if len(calls) == nth and name != "write":
                park()
            out = real(*a, **k)
            if len(calls) == nth and name == "write":
                park()
            return out

        setattr(cls, name, wrapped)

    if mode == "read":
        after(import_hf._Counted, "__getitem__", at)
    elif mode == "write":
        after(export.ShardWriter, "write", at)
    elif mode == "predict":
        after(runner.ModelPredictor, "predict", at)
    elif mode == "rename":
        after(io_utils, "_fsync_tree", 1)
    from lov_jax.cli import main
    sys.exit(main(argv))
    """
)


def _env(cache: Path) -> dict:
    return {**os.environ, "JAX_COMPILATION_CACHE_DIR": str(cache),
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
            "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}  # fmt: skip


def _start(mode: str, at: int, argv: list[str], cache: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", _PARKED, mode, str(at), *argv],
                            env=_env(cache), cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)  # fmt: skip


def _kill_when_parked(procs: list[subprocess.Popen], seed: int, timeout: float = 400) -> None:
    """SIGKILL each process once it parks (a random fraction of a second later)."""
    deadline, waiting = time.time() + timeout, list(procs)
    rng = random.Random(seed)
    while waiting and time.time() < deadline:
        for proc in list(waiting):
            ready, _, _ = select.select([proc.stdout], [], [], 0.2)
            if ready and proc.stdout.readline().strip() == "PARKED":
                time.sleep(rng.uniform(0.0, 0.5))
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                waiting.remove(proc)
            else:
                assert proc.poll() is None, f"exited early with {proc.returncode}: {proc.args}"
    for proc in waiting:
        proc.kill()
    assert not waiting, "a subprocess never reached its parking point"


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    import jax
    from jax._src import compilation_cache

    path = tmp_path_factory.mktemp("jax_cache")
    keys = {"jax_compilation_cache_dir": str(path),
            "jax_persistent_cache_min_compile_time_secs": 0.0,
            "jax_persistent_cache_min_entry_size_bytes": 0}  # fmt: skip
    before = {k: getattr(jax.config, k) for k in keys}
    for k, v in keys.items():
        jax.config.update(k, v)
    compilation_cache.reset_cache()
    yield path
    for k, v in before.items():
        jax.config.update(k, v)
    compilation_cache.reset_cache()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny HF checkpoint and its uninterrupted conversions both ways."""
    root = tmp_path_factory.mktemp("faults")
    hf = make_tiny_hf(root / "hf", vocab_size=512, tie_word_embeddings=False, seed=21)
    assert main(["convert", "hf-to-orbax", "--hf", str(hf), "--out", str(root / "ob"),
                 "--no-progress"]) == 0  # fmt: skip
    assert main(["convert", "orbax-to-hf", "--ckpt", str(root / "ob"), "--out", str(root / "back"),
                 "--no-progress", "--max-shard-size", "200KB"]) == 0  # fmt: skip
    return {"hf": hf, "orbax": root / "ob", "back": root / "back"}


def _hidden(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def _same_hf(a: Path, b: Path) -> None:
    ta, tb = read_safetensors(a), read_safetensors(b)
    assert sorted(ta) == sorted(tb)
    for k in ta:
        assert ta[k].dtype == tb[k].dtype and ta[k].tobytes() == tb[k].tobytes(), k
    assert (a / "config.json").read_text() == (b / "config.json").read_text()


def _same_orbax(a: Path, b: Path) -> None:
    meta = orbax_io.param_metadata(a)
    assert meta == orbax_io.param_metadata(b)
    for p in meta:
        np.testing.assert_array_equal(orbax_io.restore_leaf(a, p), orbax_io.restore_leaf(b, p))


def test_sigkill_conversions_then_rerun(tiny, cache, tmp_path, capsys):
    n = len(orbax_io.param_metadata(tiny["orbax"]))
    rng = random.Random(7)
    hf_args = ["convert", "hf-to-orbax", "--hf", str(tiny["hf"]), "--no-progress"]
    ob_args = ["convert", "orbax-to-hf", "--ckpt", str(tiny["orbax"]), "--no-progress",
               "--max-shard-size", "200KB"]  # fmt: skip
    cases = {  # out dir name: (mode, at, argv without --out)
        "ob_read": ("read", rng.randint(2, n - 2), hf_args),
        "ob_rename": ("rename", 0, hf_args),
        "hf_write": ("write", rng.randint(2, n - 2), ob_args),
        "hf_over": ("rename", 0, [*ob_args, "--overwrite"]),  # replacing an earlier output
    }
    shutil.copytree(tiny["back"], tmp_path / "hf_over")  # the earlier output (marker and all)
    procs = [_start(mode, at, [*argv, "--out", str(tmp_path / name)], cache)
             for name, (mode, at, argv) in cases.items()]  # fmt: skip
    _kill_when_parked(procs, seed=3)

    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == [
        "hf_over"
    ]  # nothing half-written under any output name; the old output as it was
    _same_hf(tmp_path / "hf_over", tiny["back"])
    assert any(".partial-" in h for h in _hidden(tmp_path))  # the killed runs' leftovers
    for name, (_, _, argv) in cases.items():
        assert main([*argv, "--out", str(tmp_path / name)]) == 0, name
        err = capsys.readouterr().err
        assert "error" not in err, err
    assert _hidden(tmp_path) == []  # every orphan removed by a later run into the parent
    for name in cases:
        assert io_utils.is_tool_output(tmp_path / name)
    _same_orbax(tmp_path / "ob_read", tiny["orbax"])
    _same_orbax(tmp_path / "ob_rename", tiny["orbax"])
    _same_hf(tmp_path / "hf_write", tiny["back"])
    _same_hf(tmp_path / "hf_over", tiny["back"])


def _task(root: Path) -> Path:
    recs = [{"id": f"r{i}", "question": f"Say {w}.", "answer": w}
            for i, w in enumerate(["red", "blue", "green", "cat", "dog"])]  # fmt: skip
    (root / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    (root / "t.yaml").write_text("task: t\ndata: t.jsonl\nmax_new_tokens: 3\n")
    return root / "t.yaml"


def test_sigkill_eval_then_resume_equals_uninterrupted(tiny, cache, tmp_path):
    task = _task(tmp_path)
    argv = ["eval", "--ckpt", str(tiny["orbax"]), "--task", str(task), "--batch-size", "1"]
    procs = [_start("predict", at, [*argv, "--out", str(tmp_path / f"k{at}")], cache)
             for at in (2, 4)]  # fmt: skip
    _kill_when_parked(procs, seed=5)
    for at in (2, 4):
        shard = tmp_path / f"k{at}" / "shards" / "t.rank00000-of-00001.jsonl"
        assert len(shard.read_text().splitlines()) == at - 1  # each finished batch is kept
        assert not (tmp_path / f"k{at}" / "results.json").exists()
    assert main([*argv, "--out", str(tmp_path / "ref")]) == 0
    ref = tmp_path / "ref"
    for at in (2, 4):
        out = tmp_path / f"k{at}"
        assert main([*argv, "--out", str(out)]) == 0
        assert (out / "results.json").read_text() == (ref / "results.json").read_text()
        assert (out / "samples_t.jsonl").read_text() == (ref / "samples_t.jsonl").read_text()
        rows = (out / "shards" / "t.rank00000-of-00001.jsonl").read_text().splitlines()
        assert len(rows) == 5  # the killed run's rows reused, none scored twice
