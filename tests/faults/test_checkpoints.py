"""Checkpoint faults on a tiny run: truncated files, a corrupt newest step, a changed
config, disk full at a save, a held workdir, bad step knobs. Each ends in the results of
an uninterrupted run or one clear error with nothing half-written that a later command
would accept."""

from __future__ import annotations

import dataclasses
import errno
import json
import shutil
import socket

import jax
import numpy as np
import pytest

from lov_jax import sharding
from lov_jax.convert import orbax_io
from lov_jax.pretrained import load_pretrained
from lov_jax.testing.batches import SyntheticBatches
from lov_jax.testing.train_runs import MICRO, init_params, stage_config
from lov_jax.train import checkpoint, metrics
from lov_jax.train.loop import run_training
from lov_jax.train.resume import ResumeConfigChanged
from lov_jax.train.run import train_from_config
from lov_jax.train.step import Trainer
from lov_jax.workdir_lock import LOCK_NAME, WorkdirLocked

STEPS = 4


@pytest.fixture(autouse=True)
def cache(fault_cache):
    return fault_cache


@pytest.fixture
def base(fault_base):
    return fault_base


def _copy(base, tmp_path):
    dst = tmp_path / "w"
    shutil.copytree(base["work"], dst)
    return dst


def _equal(a, b) -> bool:
    la, lb = jax.tree.leaves(jax.device_get(a)), jax.tree.leaves(b)
    return len(la) == len(lb) and all(np.array_equal(x, y) for x, y in zip(la, lb, strict=True))


def _truncate(f):
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])


def _largest(d):
    return max((f for f in d.rglob("*") if f.is_file()), key=lambda f: f.stat().st_size)


# Every kind of file an Orbax step holds (per item: metadata, sharding, OCDBT manifests,
# data files), relative to the step directory.
KINDS = [
    "_CHECKPOINT_METADATA", "config/metadata", "data_iter/metadata",
    "params/_METADATA", "params/_sharding", "params/array_metadatas/process_0",
    "params/manifest.ocdbt", "params/ocdbt.process_0/manifest.ocdbt",
    "params/ocdbt.process_0/d", "params/d",
    "opt_state/_METADATA", "opt_state/manifest.ocdbt", "opt_state/ocdbt.process_0/d",
]  # fmt: skip
# Those whose damage changes what a restore would return: they must be caught.
MUST_FALL_BACK = {
    "config/metadata", "data_iter/metadata", "params/ocdbt.process_0/d",
    "opt_state/ocdbt.process_0/d", "params/_METADATA", "opt_state/_METADATA",
}  # fmt: skip


def test_each_truncated_file_falls_back_or_restores_exactly(base, tmp_path, capsys):
    c = stage_config()
    trainer = Trainer(MICRO, c.optim, sharding.mesh_from_config(c.mesh), STEPS, loss_chunk=32)
    abstract = trainer.checkpoint_view(trainer.abstract_state())
    run_config = {**orbax_io.config_json(MICRO), "stage": c.to_dict()}
    fell_back = set()
    for i, kind in enumerate(KINDS):
        work = tmp_path / str(i)
        shutil.copytree(base["work"], work)
        target = checkpoint.checkpoint_dir(work) / "4" / kind
        _truncate(_largest(target) if target.is_dir() else target)
        capsys.readouterr()
        manager = checkpoint.make_manager(work)
        step, params, opt_state, _ = checkpoint.restore_latest(manager, abstract, run_config)
        manager.close()
        out = capsys.readouterr().out
        if step == 4:  # undamaged in effect: the values are exactly the saved ones
            assert _equal(params, base["params"]) and _equal(opt_state, base["opt"]), kind
            assert not (work / "quarantine").exists(), kind
        else:
            fell_back.add(kind)
            assert step == 2, kind
            assert (work / "quarantine" / "4" / kind).exists(), kind  # moved, not deleted
            assert not (checkpoint.checkpoint_dir(work) / "4").exists(), kind
            warnings = [line for line in out.splitlines() if line.startswith("WARNING")]
            assert len(warnings) == 1 and "step 4" in warnings[0], (kind, out)
            assert "corrupt" in warnings[0] and "falling back to step 2" in warnings[0]
    assert MUST_FALL_BACK <= fell_back, sorted(MUST_FALL_BACK - fell_back)


def test_corrupt_newest_is_quarantined_retrained_and_saved_in_place(base, tmp_path, capsys):
    work = _copy(base, tmp_path)
    _truncate(_largest(checkpoint.checkpoint_dir(work) / "4" / "params"))
    # Readers fall back too, moving nothing; an explicit --step is never replaced.
    assert orbax_io.readable_step_dir(work) == checkpoint.checkpoint_dir(work) / "2"
    assert "step 4" in capsys.readouterr().out
    with pytest.raises(orbax_io.CorruptCheckpoint, match=r"step 4 .* corrupt.*steps there"):
        load_pretrained(work, step=4)
    assert (checkpoint.checkpoint_dir(work) / "4").exists()

    data = SyntheticBatches()
    result = run_training(stage_config(), MICRO, work, data, init_params, STEPS, progress=False)
    assert result.resumed_from == 2 and data.position == 4
    assert [result.losses[s] for s in (2, 3)] == [base["losses"][s] for s in (2, 3)]
    assert _equal(result.state.params, base["params"])
    assert (work / "quarantine" / "4" / "params").is_dir()
    # The retrained step 4 replaced it: readers take it without a warning.
    capsys.readouterr()
    assert orbax_io.readable_step_dir(work) == checkpoint.checkpoint_dir(work) / "4"
    assert "WARNING" not in capsys.readouterr().out
    # metrics.jsonl holds each step once (the re-done 3, 4 replaced, not appended).
    steps = [json.loads(line)["step"] for line in (work / "metrics.jsonl").open()]
    assert steps == [1, 2, 3, 4]
    # TensorBoard: the resumed run purges steps after 2; what a reader keeps is 1..4 once.
    assert _tensorboard_loss_steps(work / "tb") == [1, 2, 3, 4]


def _tensorboard_loss_steps(tb_dir) -> list[int]:
    """Steps of the `loss` scalars TensorBoard shows: a SessionLog START at step p drops
    the earlier events at steps >= p (tensorboardX `purge_step`). TFRecord framing:
    u64 length, u32 crc, payload, u32 crc."""
    from tensorboardX.proto import event_pb2

    kept: list[int] = []
    for f in sorted(tb_dir.glob("events.out.tfevents.*"), key=lambda f: f.stat().st_mtime):
        data, i = f.read_bytes(), 0
        while i + 12 <= len(data):
            n = int.from_bytes(data[i : i + 8], "little")
            event = event_pb2.Event.FromString(data[i + 12 : i + 12 + n])
            i += 16 + n
            if event.session_log.status == event_pb2.SessionLog.START:
                kept = [s for s in kept if s < event.step]
            kept += [event.step for v in event.summary.value if v.tag == "loss"]
    return kept


def test_structural_mismatch_is_an_error_naming_init_from(base, tmp_path):
    work = _copy(base, tmp_path)
    before = sorted(p.name for p in checkpoint.checkpoint_dir(work).iterdir())
    projector_only = stage_config(trainable=("projector",))
    with pytest.raises(checkpoint.CheckpointMismatch) as err:
        run_training(projector_only, MICRO, work, SyntheticBatches(), init_params, 6,
                     progress=False)  # fmt: skip
    text = str(err.value)
    assert "opt_state" in text and "optim.trainable" in text
    assert f"--config.init_from={work.absolute()}" in text
    wider = MICRO.replace(text=dataclasses.replace(MICRO.text, vocab_size=2048))
    with pytest.raises(checkpoint.CheckpointMismatch, match=r"embed_tokens.*\(1024, 64\).*"
                                                             r"\(2048, 64\)"):  # fmt: skip
        run_training(stage_config(), wider, work, SyntheticBatches(), init_params, 6,
                     progress=False)  # fmt: skip
    # Nothing moved, nothing started over.
    assert sorted(p.name for p in checkpoint.checkpoint_dir(work).iterdir()) == before
    assert not (work / "quarantine").exists()


def test_changed_config_or_data_is_refused_then_allowed(base, tmp_path, capsys):
    work = _copy(base, tmp_path)
    c = stage_config()
    c.optim.lr = 2e-3
    with pytest.raises(ResumeConfigChanged, match=r"optim\.lr: 1e-05 -> 0\.002"):
        run_training(c, MICRO, work, SyntheticBatches(), init_params, STEPS, progress=False)
    fp = {"records": 10, "files": {"a.jsonl": "1:ab"}}  # base saved none: the config check only
    c.train.allow_config_change = True
    result = run_training(c, MICRO, work, SyntheticBatches(), init_params, STEPS,
                          progress=False, data_fingerprint=fp)  # fmt: skip
    assert result.resumed_from == 4 and "optim.lr: 1e-05 -> 0.002" in capsys.readouterr().out


def test_changed_data_fingerprint_is_refused(tmp_path):
    from lov_jax.train import resume

    data = tmp_path / "train.jsonl"
    data.write_text('{"id": 1}\n')
    saved = {"stage": {"a": 1}, "data_fingerprint": resume.data_fingerprint(str(data), [1])}
    data.write_text('{"id": 2}\n')
    now = {"stage": {"a": 1}, "data_fingerprint": resume.data_fingerprint(str(data), [1])}
    changes = resume.config_changes(saved, now)
    assert len(changes) == 1 and changes[0].startswith(f"data files.{data}: 10:")
    with pytest.raises(ResumeConfigChanged, match="allow_config_change"):
        resume.refuse_or_warn(tmp_path / "checkpoints" / "4", changes, allow=False)
    # the mesh, the checkpoint cadence, workers and kernels may change freely
    a = {"mesh": {"fsdp": 1}, "train": {"ckpt_every": 2, "seed": 0}, "data": {"num_workers": 0}}
    b = {"mesh": {"fsdp": 4}, "train": {"ckpt_every": 5, "seed": 0}, "data": {"num_workers": 2}}
    assert resume.config_changes({"stage": a}, {"stage": b}) == []
    b["train"]["seed"] = 1
    b["train"]["new_knob"] = True  # a key another version added: not a change of this run
    assert resume.config_changes({"stage": a}, {"stage": b}) == ["train.seed: 0 -> 1"]


def test_disk_full_at_a_save_is_one_error_at_that_step(base, tmp_path, monkeypatch):
    from orbax.checkpoint._src.handlers import json_checkpoint_handler as jh

    real = jh.JsonCheckpointHandler._save_fn
    data_saves = []

    async def full_at_step_2(self, x, directory):
        if "process_count" in x:  # the data_iter item: once per save
            data_saves.append(directory)
            if len(data_saves) == 2:
                raise OSError(errno.ENOSPC, "No space left on device", str(directory))
        return await real(self, x, directory)

    work = tmp_path / "w"
    monkeypatch.setattr(jh.JsonCheckpointHandler, "_save_fn", full_at_step_2)
    with pytest.raises(checkpoint.CheckpointSaveError) as err:
        run_training(stage_config(ckpt_every=1), MICRO, work, SyntheticBatches(), init_params,
                     STEPS, progress=False)  # fmt: skip
    monkeypatch.undo()
    text = str(err.value)
    assert "\n" not in text and "step 2" in text and "No space left on device" in text
    # Stopped at the next step: step 3 was never saved; step 2 is not a committed step.
    assert sorted(orbax_io.step_dirs(checkpoint.checkpoint_dir(work))) == [1]
    assert orbax_io.readable_step_dir(work).name == "1"
    result = run_training(stage_config(), MICRO, work, SyntheticBatches(), init_params, STEPS,
                          progress=False)  # fmt: skip
    assert result.resumed_from == 1
    assert _equal(result.state.params, base["params"])


def test_metrics_truncate_to_the_resumed_step(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = [{"step": 1, "loss": 1.0}, {"step": 1, "loss": float("nan")}, {"step": 2, "loss": 2.0},
            {"step": 2, "loss": 0.5, "skipped": True}, {"step": 3, "loss": 3.0}]  # fmt: skip
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 4, "lo')
    assert metrics.truncate_jsonl(path, 2) == 3  # the skipped attempt after 2, step 3, the cut line
    assert path.read_text().splitlines() == [json.dumps(r) for r in rows[:3]]
    assert metrics.truncate_jsonl(path, 0) == 3 and path.read_text() == ""


def test_second_trainer_refuses_at_once(tmp_path):
    import subprocess
    import sys

    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        from lov_jax import workdir_lock

        work = tmp_path / "w"
        work.mkdir()
        start = workdir_lock.process_start_time(holder.pid)
        info = {"host": socket.gethostname(), "pid": holder.pid, "start": start}
        (work / LOCK_NAME).write_text(json.dumps(info))
        with pytest.raises(WorkdirLocked, match=rf"in use .*pid {holder.pid}"):
            run_training(stage_config(), MICRO, work, SyntheticBatches(), init_params, STEPS,
                         progress=False)  # fmt: skip
        assert not (work / "checkpoints").exists()  # refused before anything was written
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.parametrize(
    "field,value", [("train.ckpt_every", 0), ("train.ckpt_keep", 0), ("optim.grad_accum", 0),
                    ("train.loss_chunk", -1), ("optim.max_consecutive_nonfinite", 0)],
)  # fmt: skip
def test_step_knobs_are_validated_up_front(tmp_path, field, value):
    c = stage_config()
    group, name = field.split(".")
    c[group][name] = value
    with pytest.raises(ValueError, match=rf"{field}={value}: must be an integer >= "):
        run_training(c, MICRO, tmp_path, SyntheticBatches(), init_params, STEPS, progress=False)
    with pytest.raises(ValueError, match=r"total steps .*=0"):
        run_training(stage_config(), MICRO, tmp_path, SyntheticBatches(), init_params, 0)
    # `lov-jax train` checks them before loading a model or reading data (none given here)
    with pytest.raises(ValueError, match=rf"{field}={value}: must be an integer >= "):
        train_from_config(c, tmp_path / "cli", progress=False)
    assert not any(tmp_path.iterdir())
