"""Launch scripts: `--dry-run` prints the exact commands (nothing is run)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
LAUNCH = REPO / "launch"


def _dry(script: str, *args: str) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "LOV_JAX_"))}
    out = subprocess.run(
        ["bash", str(LAUNCH / script), "--dry-run", *args],
        capture_output=True, text=True, timeout=60, env=env, check=True,
    )  # fmt: skip
    return out.stdout


def _line(text: str, *needles: str) -> str:
    """The one printed command containing every needle."""
    hits = [ln for ln in text.splitlines() if all(n in ln for n in needles)]
    assert len(hits) == 1, (needles, text)
    return hits[0]


TPU = ("--name", "lov-ov", "--zone", "us-east5-a", "--project", "my-proj")


def test_tpu_vm_v5p_64_training_job():
    create = _dry("tpu_vm.sh", *TPU, "--accelerator-type", "v5p-64", "--spot", "create")
    line = _line(create, "queued-resources create lov-ov")
    for flag in ("--accelerator-type=v5p-64", "--runtime-version=v2-alpha-tpuv5", "--spot",
                 "--node-id=lov-ov", "--zone=us-east5-a", "--project=my-proj"):  # fmt: skip
        assert flag in line, flag
    assert "ACTIVE" in create  # waits for the queued resource

    setup = _dry("tpu_vm.sh", *TPU, "--bucket", "gs://my-bucket", "setup")
    ssh = _line(setup, "tpu-vm ssh lov-ov", "--worker=all")
    assert "pip install -q -r requirements.txt" in ssh and "jax[tpu]==" in ssh
    assert "gcsfuse --implicit-dirs my-bucket /mnt/gcs" in ssh
    assert "--worker=all" in _line(setup, "tpu-vm scp")

    train = _dry("tpu_vm.sh", *TPU, "--job", "ov7b", "train", "--config",
                 "configs/stage2_ov.py:ov_7b", "--workdir", "/mnt/gcs/runs/ov7b",
                 "--config.optim.lr=1e-5")  # fmt: skip
    job = _line(train, "--worker=all")
    assert "lov-jax train --config configs/stage2_ov.py:ov_7b" in job
    assert "--workdir /mnt/gcs/runs/ov7b --config.optim.lr=1e-5" in job
    assert "source launch/tpu_env.sh" in job and "LOV_JAX_DISTRIBUTED=1" in job
    logs = _line(train, "--worker=0")
    assert "tail" in logs and "lov_jax_logs/ov7b.log" in logs

    assert "gcloud storage cp -r gs://my-bucket/runs/ov7b ./ov7b" in _dry(
        "tpu_vm.sh", *TPU, "pull", "gs://my-bucket/runs/ov7b", "./ov7b"
    )
    delete = _dry("tpu_vm.sh", *TPU, "delete")
    assert "queued-resources delete lov-ov --zone=us-east5-a --project=my-proj" in delete


def test_tpu_vm_v5e_16_eval_job():
    create = _dry("tpu_vm.sh", *TPU, "--accelerator-type", "v5e-16", "create")
    line = _line(create, "queued-resources create")
    assert "--accelerator-type=v5litepod-16" in line  # gcloud's name for v5e
    assert "--runtime-version=v2-alpha-tpuv5-lite" in line
    ev = _dry("tpu_vm.sh", *TPU, "eval", "--ckpt", "/mnt/gcs/runs/ov7b", "--task",
              "tasks/mmbench.yaml", "--out", "/mnt/gcs/eval/ov7b")  # fmt: skip
    job = _line(ev, "--worker=all")
    assert "lov-jax eval --ckpt /mnt/gcs/runs/ov7b --task tasks/mmbench.yaml" in job
    assert "--out /mnt/gcs/eval/ov7b" in job


def test_tpu_env_holds_libtpu_flags():
    text = (LAUNCH / "tpu_env.sh").read_text()
    assert "LIBTPU_INIT_ARGS" in text
    out = subprocess.run(["bash", "-c", f"source {LAUNCH / 'tpu_env.sh'} && env"],
                         capture_output=True, text=True, check=True).stdout  # fmt: skip
    assert "LIBTPU_INIT_ARGS=--xla_tpu_enable_async_collective_fusion=true" in out


def test_gke_xpk_workload():
    out = _dry("gke_xpk.sh", "--cluster", "my-gke", "--tpu-type", "v5p-64", "--num-slices", "2",
               "--workload", "ov7b", "--project", "my-proj", "--zone", "us-east5-a", "train",
               "--config", "configs/stage2_ov.py:ov_7b", "--workdir", "/gcs/runs/ov7b")  # fmt: skip
    line = _line(out, "xpk workload create")
    for flag in ("--cluster=my-gke", "--workload=ov7b", "--tpu-type=v5p-64", "--num-slices=2",
                 "--project=my-proj", "--zone=us-east5-a", "--script-dir="):  # fmt: skip
        assert flag in line, flag
    assert "lov-jax train --config configs/stage2_ov.py:ov_7b --workdir /gcs/runs/ov7b" in line
    assert "source launch/tpu_env.sh" in line
    img = _dry("gke_xpk.sh", "--cluster", "c", "--tpu-type", "v5e-16", "--docker-image",
               "gcr.io/p/lov:1", "eval", "--ckpt", "/gcs/ckpt", "--task", "t.yaml", "--out",
               "/gcs/eval")  # fmt: skip
    assert "--docker-image=gcr.io/p/lov:1" in img and "lov-jax eval --ckpt /gcs/ckpt" in img


def test_slurm_two_node_job():
    out = _dry("slurm_submit.sh", "--nodes", "2", "--gpus-per-node", "8", "--partition", "a3",
               "--time", "24:00:00", "train", "--config", "configs/stage2_ov.py:ov_7b",
               "--workdir", "/shared/runs/ov7b")  # fmt: skip
    sb = _line(out, "sbatch")
    for flag in ("--nodes=2", "--ntasks-per-node=8", "--gpus-per-node=8", "--partition=a3",
                 "--time=24:00:00", "launch/slurm.sbatch lov-jax train"):  # fmt: skip
        assert flag in sb, flag
    srun = _line(out, "srun")
    assert "--nodes=2 --ntasks-per-node=8" in srun
    assert "bin/lov-jax train --config configs/stage2_ov.py:ov_7b" in srun
    assert "XLA_PYTHON_CLIENT_MEM_FRACTION=" in out
    # One process per node drives all 8 GPUs of its node.
    per_node = _dry("slurm_submit.sh", "--nodes", "2", "--per", "node", "eval", "--ckpt", "/c",
                    "--task", "t.yaml", "--out", "/o")  # fmt: skip
    assert "--ntasks-per-node=1" in _line(per_node, "sbatch")
    assert "LOV_JAX_LOCAL_DEVICE_IDS=0,1,2,3,4,5,6,7" in per_node


def test_local_cluster_dry_run():
    out = _dry("local_cluster.sh", "2", "lov-jax", "train", "--config", "c.py:demo")
    lines = [ln for ln in out.splitlines() if "lov-jax train" in ln]
    assert len(lines) == 2
    for i, ln in enumerate(lines):
        assert f"LOV_JAX_PROCESS_ID={i}" in ln and "LOV_JAX_NUM_PROCESSES=2" in ln
        assert "LOV_JAX_COORDINATOR=127.0.0.1:" in ln
        assert "--xla_force_host_platform_device_count=4" in ln


@pytest.mark.parametrize("script", ["tpu_vm.sh", "gke_xpk.sh", "slurm_submit.sh"])
def test_bad_usage_is_an_error(script):
    out = subprocess.run(["bash", str(LAUNCH / script), "--dry-run"], capture_output=True,
                         text=True, timeout=60)  # fmt: skip
    assert out.returncode == 2 and "error:" in out.stderr
