"""SIGKILL a tiny training run (a subprocess) at a few points, resume in this process:
the results equal an uninterrupted run's. A killed loader's worker processes die too."""

from __future__ import annotations

import os
import random
import select
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from lov_jax.convert import orbax_io
from lov_jax.testing import train_runs
from lov_jax.testing.batches import SyntheticBatches
from lov_jax.testing.train_runs import MICRO, init_params, stage_config
from lov_jax.train import checkpoint
from lov_jax.train.loop import run_training
from lov_jax.workdir_lock import LOCK_NAME

STEPS = 4
ROOT = Path(__file__).resolve().parents[2]

# Parks (sleeps) at one point of a 4-step run saved every step; the test kills it there.
# "save N": inside the data_iter write of the N-th save (params / opt_state of that step
# written or in flight); "step N": while fetching batch N (the save of step N in flight).
_TRAIN = textwrap.dedent(
    """
    import sys, time
    from orbax.checkpoint._src.handlers import json_checkpoint_handler as jh
    from lov_jax.testing.batches import SyntheticBatches
    from lov_jax.testing.train_runs import MICRO, init_params, stage_config
    from lov_jax.train.loop import run_training

    mode, at, work = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    real, saves = jh.JsonCheckpointHandler._save_fn, []

    async def parked_save(self, x, directory):
        if "process_count" in x:
            saves.append(directory)
            if mode == "save" and len(saves) == at:
                print("PARKED", flush=True)
                time.sleep(300)
        return await real(self, x, directory)

    jh.JsonCheckpointHandler._save_fn = parked_save

    class Batches(SyntheticBatches):
        def __next__(self):
            if mode == "step" and self.position == at:
                print("PARKED", flush=True)
                time.sleep(300)
            return super().__next__()

    run_training(stage_config(ckpt_every=1), MICRO, work, Batches(), init_params, 4,
                 progress=False)
    """
)

_LOADER = textwrap.dedent(
    """
    import time
    from data_pipelines import loader, stats
    from lov_jax import config
    from lov_jax.testing.tokenizers import qwen2_token_ids

    cfg = config.tiny(token_ids=qwen2_token_ids())
    recs = [{"id": f"r{i}", "seed": i, "image_sizes": [], "num_frames": 0, "kind": "text",
             "text_tokens": 20} for i in range(40)]
    lc = loader.LoaderConfig(batch_size=2, max_tokens=256, max_crops=1, seed=0, num_workers=2,
                             num_epochs=None)  # as training: the workers never run dry
    it = loader.make_loader(recs, stats.SyntheticProcess(cfg), cfg, lc, process_index=0,
                            process_count=1)
    next(it)
    print("PARKED", flush=True)
    time.sleep(300)
    """
)


@pytest.fixture
def cache(fault_cache):
    return fault_cache


@pytest.fixture
def base(fault_base):
    return fault_base["losses"], fault_base["params"]


def _start_and_park(script: str, args: list[str], env: dict, timeout: float = 400):
    """Start `script`; return the process once it prints PARKED (it is then asleep)."""
    proc = subprocess.Popen([sys.executable, "-c", script, *args], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, text=True)  # fmt: skip
    deadline = time.time() + timeout
    while time.time() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], 1.0)
        if ready:
            line = proc.stdout.readline()
            if line.strip() == "PARKED":
                return proc
        assert proc.poll() is None, f"subprocess exited early with {proc.returncode}"
    proc.kill()
    raise AssertionError("subprocess never reached its parking point")


@pytest.mark.parametrize("mode,at,seed", [("save", 3, 0), ("step", 3, 1)])
def test_sigkill_then_resume_equals_an_uninterrupted_run(base, cache, tmp_path, mode, at, seed):
    losses, params = base
    work = tmp_path / "w"
    proc = _start_and_park(_TRAIN, [mode, str(at), str(work)], train_runs.env_for_cache(cache))
    time.sleep(random.Random(seed).uniform(0.0, 1.5))  # a few kill times past the point
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    committed = sorted(orbax_io.step_dirs(checkpoint.checkpoint_dir(work)))
    assert committed[:2] == [1, 2] and max(committed) <= at, committed
    assert (work / LOCK_NAME).exists()  # the dead trainer's lock: stale, taken over below

    data = SyntheticBatches()
    result = run_training(stage_config(), MICRO, work, data, init_params, STEPS, progress=False)
    assert result.resumed_from == max(committed) and data.position == STEPS
    assert all(result.losses[s] == losses[s] for s in result.losses)  # bitwise on CPU
    assert all(
        np.array_equal(a, b)
        for a, b in zip(jax.tree.leaves(jax.device_get(result.state.params)),
                        jax.tree.leaves(params), strict=True)
    )  # fmt: skip
    assert not (work / LOCK_NAME).exists()


def _descendants(pid: int) -> list[int]:
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parents[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError):
            continue
    out, frontier = [], [pid]
    while frontier:
        kids = [p for p, pp in parents.items() if pp in frontier]
        out += kids
        frontier = kids
    return out


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_loader_workers_die_with_their_parent():
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = _start_and_park(_LOADER, [], env)
    workers = [p for p in _descendants(proc.pid) if b"spawn_main" in _cmdline(p)]
    assert len(workers) == 2, workers  # the two decode workers
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 20
    while time.time() < deadline and any(_alive(w) for w in workers):
        time.sleep(0.2)
    left = [w for w in workers if _alive(w)]
    for w in left:  # do not leak them into the rest of the suite
        os.kill(w, signal.SIGKILL)
    assert not left, f"loader workers outlived the killed trainer: {left}"
