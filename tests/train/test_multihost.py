"""Two processes x 4 CPU devices joined by jax.distributed (gloo) == one 8-device process.

The cluster is started with `launch/local_cluster.sh 2 python tests/test_multihost.py
WORKDIR TASK`; each process trains 3 steps with its own host batches
(`SyntheticBatches(rows=4, seed=process_index)`) on a mesh from the config with
`mesh.dcn_data=2` (one "slice" per process on the data axis, fsdp=4 inside it),
checkpoints at step 3 and stops, then a second run resumes from that checkpoint for 2
more steps. The global batch is process 0's rows followed by process 1's, so the
single-process reference (the same script without LOV_JAX_* variables, 8 CPU devices,
the same data=2 x fsdp=4 mesh) feeds the concatenation of both streams, 5 steps
uninterrupted. Then every process runs `lov-jax eval` on the final checkpoint: records
are split by process, each decodes on its own 4 devices, and process 0 writes the merged
samples and results, which must equal the reference's. Both run as subprocesses sharing
a persistent compilation cache (the resumed run reuses the compiled step).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parents[1]
STEPS, RESUMED_STEPS = 3, 5


def _config(multi: bool):
    from configs import stage2_ov

    c = stage2_ov.get_config("demo")
    # data=2 x fsdp=4 either way: across the two processes (slices) or inside one.
    c.mesh.update(data=1 if multi else 2, fsdp=4, tensor=1, dcn_data=2 if multi else 1)
    c.mesh.num_devices = -1
    c.train.ckpt_every = STEPS
    c.train.loss_chunk = 32
    return c


def _init():
    import jax

    from lov_jax import config
    from lov_jax.models.llava_onevision import init_params

    return jax.tree.map(np.asarray, init_params(config.demo(), jax.random.key(0)))


class _Concat:
    """Host batches of several streams concatenated on the row axis (in stream order)."""

    def __init__(self, streams):
        self.streams = streams

    def __next__(self):
        parts = [next(s) for s in self.streams]
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    def get_state(self):
        return [s.get_state() for s in self.streams]

    def set_state(self, state):
        for s, st in zip(self.streams, state, strict=True):
            s.set_state(st)


def _worker(workdir: str, task: str) -> None:
    """One process of the local cluster, or (no LOV_JAX_* variables) the 8-device
    single-process reference fed both processes' rows; run as a script."""
    sys.path.insert(0, str(TESTS))
    sys.path.insert(0, str(REPO))
    from lov_jax import distributed

    multi = distributed.maybe_initialize()
    assert distributed.maybe_initialize() == multi  # idempotent
    import jax

    jax.config.update("jax_default_matmul_precision", "highest")
    from lov_jax import config, sharding
    from lov_jax.testing.batches import SyntheticBatches
    from lov_jax.testing.tokenizers import qwen2_token_ids
    from lov_jax.train.loop import run_training

    assert jax.process_count() == (2 if multi else 1) and jax.device_count() == 8
    rank = jax.process_index()
    # Two "slices" (one per process: CPU devices have no slice_index) on the data axis.
    mesh = sharding.mesh_from_config(_config(multi).mesh)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "context": 1, "tensor": 1}
    if multi:
        assert [{d.process_index for d in row.flat} for row in mesh.devices] == [{0}, {1}]

    def data():
        if multi:
            return SyntheticBatches(rows=4, seed=rank)
        return _Concat([SyntheticBatches(rows=4, seed=0), SyntheticBatches(rows=4, seed=1)])

    cfg, stage = config.demo(token_ids=qwen2_token_ids()), _config(multi)
    if not multi:  # the reference runs uninterrupted
        ref = run_training(stage, cfg, workdir, data(), _init, RESUMED_STEPS, progress=False)
        out = {"process": rank, "losses": ref.losses, "resumed_from": None}
    else:
        # The same total_steps (so the same LR schedule and compiled step) in both runs.
        first = run_training(stage, cfg, workdir, data(), _init, RESUMED_STEPS,
                             stop_after=STEPS, progress=False)  # fmt: skip
        resumed = run_training(stage, cfg, workdir, data(), _init, RESUMED_STEPS, progress=False)
        out = {
            "process": rank,
            "losses": {**first.losses, **resumed.losses},
            "resumed_from": resumed.resumed_from,
        }
    Path(workdir, f"result_{rank}.json").write_text(json.dumps(out))
    _run_eval(workdir, task)


def _run_eval(workdir: str, task: str) -> None:
    """`lov-jax eval` on the workdir's last checkpoint, as a user runs it on every host.
    The tokenizer / template files go to `assets/` first, as `lov-jax train` writes them."""
    from data_pipelines.hf_processor import save_hf_processor_files
    from lov_jax import config
    from lov_jax.cli import main
    from lov_jax.testing.tokenizers import qwen2_token_ids

    save_hf_processor_files(Path(workdir, "assets"), config.demo(token_ids=qwen2_token_ids()))
    t0 = time.time()
    rc = main(["eval", "--ckpt", workdir, "--task", task, "--out", str(Path(workdir, "eval")),
               "--mesh", "fsdp=-1", "--batch-size", "2"])  # fmt: skip
    assert rc == 0
    print(f"eval finished in {time.time() - t0:.1f}s")


def _write_task(root: Path) -> Path:
    """A 5-record task (single image, two images, text only, a missing image): the cluster
    splits it 3 / 2, so its processes run different numbers of batches."""
    from PIL import Image

    root.mkdir()
    rng = np.random.default_rng(0)
    for name, (w, h) in {"a.png": (112, 112), "b.png": (160, 96), "c.png": (64, 150)}.items():
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / name)
    records = [
        {"id": "one", "question": "What shape is this?", "images": ["a.png"], "answer": "red"},
        {"id": "two", "question": "Same colour?", "images": ["b.png", "c.png"], "answer": "no"},
        {"id": "text", "question": "Name a colour.", "answer": "blue"},
        {"id": "missing", "question": "What is it?", "images": ["nope.png"], "answer": "x"},
        {"id": "wide", "question": "What colour?", "images": ["b.png"], "answer": "green"},
    ]
    (root / "tiny.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    spec = {"task": "tiny", "data": "tiny.jsonl", "metric": "exact_match", "max_new_tokens": 3}
    (root / "tiny.yaml").write_text(json.dumps(spec))  # JSON is valid YAML
    return root / "tiny.yaml"


def _finish(proc: subprocess.Popen, what: str, timeout: float) -> None:
    try:
        log, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        log, _ = proc.communicate()
        pytest.fail(f"{what} timed out:\n{log[-4000:]}")
    assert proc.returncode == 0, f"{what} failed:\n{log[-4000:]}"


def test_two_processes_equal_one_process(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOV_JAX_")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(TESTS), env.get("PYTHONPATH", "")])
    env["LOG_DIR"] = str(tmp_path / "logs")
    # The resumed run in each process loads the first run's compiled step from disk.
    env["JAX_COMPILATION_CACHE_DIR"] = str(tmp_path / "jax_cache")
    task = str(_write_task(tmp_path / "task"))
    t0 = time.time()
    cluster = subprocess.Popen(
        ["bash", str(REPO / "launch/local_cluster.sh"), "2", sys.executable, __file__,
         str(tmp_path / "cluster"), task],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    single_env = {**env, "JAX_PLATFORMS": "cpu",
                  "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}  # fmt: skip
    single = subprocess.Popen(
        [sys.executable, __file__, str(tmp_path / "single"), task], env=single_env,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    _finish(single, "single-process reference", timeout=300)
    _finish(cluster, "local cluster", timeout=300)
    print(f"cluster and reference finished in {time.time() - t0:.1f}s")

    ref = json.loads((tmp_path / "single" / "result_0.json").read_text())
    assert ref["resumed_from"] is None
    want = np.asarray([ref["losses"][str(s)] for s in range(RESUMED_STEPS)])
    for i in range(2):
        r = json.loads((tmp_path / "cluster" / f"result_{i}.json").read_text())
        assert r["resumed_from"] == STEPS
        got = np.asarray([r["losses"][str(s)] for s in range(RESUMED_STEPS)])
        np.testing.assert_allclose(got, want, rtol=2e-6, err_msg=f"process {i}")
    # Every process wrote its shards, and both iterator states were gathered into the save.
    step_dir = tmp_path / "cluster" / "checkpoints" / str(STEPS)
    assert {p.name for p in (step_dir / "params").glob("ocdbt.process_*")} == {
        "ocdbt.process_0", "ocdbt.process_1"}  # fmt: skip
    saved = json.loads((step_dir / "data_iter" / "metadata").read_text())
    assert saved == {"process_count": 2, "states": {"0": {"position": 3}, "1": {"position": 3}}}
    _check_eval(tmp_path / "single" / "eval", tmp_path / "cluster" / "eval")


def _check_eval(ref: Path, got: Path) -> None:
    """Each process scored its records; process 0's merged outputs equal the reference's."""
    ids = {}
    for i in range(2):
        shard = got / "shards" / f"tiny.rank{i:05d}-of-00002.jsonl"
        ids[i] = sorted(json.loads(line)["id"] for line in shard.read_text().splitlines())
    assert ids == {0: ["one", "text", "wide"], 1: ["missing", "two"]}
    # Rows equal but for their key: the model fingerprint hashes the params' bits, and two
    # processes train to the same losses within 2e-6, not to the same bits.
    rows, ref_rows = (
        [json.loads(line) for line in (d / "samples_tiny.jsonl").read_text().splitlines()]
        for d in (got, ref)
    )
    assert [r["key"][1] for r in rows] == [r["key"][1] for r in ref_rows]  # the task hash
    assert [{**r, "key": None} for r in rows] == [{**r, "key": None} for r in ref_rows]
    assert [r["id"] for r in rows] == ["one", "two", "text", "missing", "wide"]
    assert rows[3]["error"]["reason"] == "missing_media"
    assert all(isinstance(r["prediction"], str) for i, r in enumerate(rows) if i != 3)
    want, have = (json.loads((d / "results.json").read_text()) for d in (ref, got))
    # Only the checkpoint path (config.model_args) differs.
    assert {k: v for k, v in have.items() if k != "config"} == {
        k: v for k, v in want.items() if k != "config"}  # fmt: skip
    assert have["n-samples"]["tiny"] == {"original": 5, "effective": 5}


def test_detect_cluster_from_environment():
    from lov_jax.distributed import detect_cluster

    assert detect_cluster({}) is None
    assert detect_cluster({"SLURM_JOB_ID": "1", "SLURM_NTASKS": "1"}) is None
    assert detect_cluster({"SLURM_JOB_ID": "1", "SLURM_NTASKS": "16"}) == "slurm"
    slurm_step = {"SLURM_JOB_ID": "1", "SLURM_NTASKS": "16", "SLURM_STEP_NUM_TASKS": "1"}
    assert detect_cluster(slurm_step) is None  # a one-task srun step inside a big job
    assert detect_cluster({"TPU_WORKER_HOSTNAMES": "localhost"}) is None
    assert detect_cluster({"TPU_WORKER_HOSTNAMES": "10.0.0.1,10.0.0.2"}) == "tpu"
    assert detect_cluster({"MEGASCALE_COORDINATOR_ADDRESS": "h:8080"}) == "megascale"
    assert detect_cluster({"LOV_JAX_NUM_PROCESSES": "2"}) == "explicit"
    assert detect_cluster({"LOV_JAX_DISTRIBUTED": "1"}) == "forced"
    assert detect_cluster({"LOV_JAX_DISTRIBUTED": "0", "SLURM_JOB_ID": "1",
                           "SLURM_NTASKS": "16"}) is None  # fmt: skip


def test_maybe_initialize_is_a_no_op_for_one_process(monkeypatch):
    import jax

    from lov_jax import distributed

    for key in list(os.environ):
        if key.startswith(("SLURM_", "LOV_JAX_", "MEGASCALE_", "TPU_WORKER")):
            monkeypatch.delenv(key)
    assert distributed.maybe_initialize() is False
    assert distributed.maybe_initialize(num_processes=1, coordinator="127.0.0.1:1",
                                        process_id=0) is False  # fmt: skip
    with pytest.raises(ValueError, match="needs coordinator"):
        distributed.maybe_initialize(num_processes=2)
    assert jax.process_count() == 1


if __name__ == "__main__":
    _worker(sys.argv[1], sys.argv[2])
