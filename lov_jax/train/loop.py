"""The training loop: init or resume, step, log, checkpoint.

The data side is any iterator of host batches (dicts of numpy arrays in the
batch contract, [B, ...]) with `get_state()` / `set_state(state)` (JSON-able)
so a resumed run continues the exact sample stream; `stats()` (optional)
returns skip counters and budget fill for the logs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import jax
import numpy as np

from lov_jax import sharding
from lov_jax.config import ModelConfig
from lov_jax.convert import orbax_io
from lov_jax.train import checkpoint, metrics
from lov_jax.train.step import Trainer, TrainState, stack_micro_batches
from lov_jax.workdir_lock import WorkdirLock


class BatchIterator(Protocol):
    def __next__(self) -> dict: ...
    def get_state(self) -> Any: ...
    def set_state(self, state: Any) -> None: ...


class NonFiniteLossError(RuntimeError):
    pass


@dataclasses.dataclass
class TrainResult:
    final_step: int
    losses: dict[int, float]  # optimizer step -> loss (this process's run only)
    skipped_nonfinite: int
    resumed_from: int | None
    state: TrainState


def run_training(
    config,
    cfg: ModelConfig,
    workdir: str | Path,
    data_iter: BatchIterator,
    init_params: Callable[[], Any],
    total_steps: int,
    *,
    stop_after: int | None = None,
    progress: bool = True,
    data_fingerprint: dict | None = None,
) -> TrainResult:
    """Train `total_steps` optimizer steps (resuming from `workdir` if it has checkpoints).

    `init_params()` is only called for a fresh run. `stop_after` ends this process
    after that many steps of its own (tests of preemption), without a final save.
    `data_fingerprint` (lov_jax/train/resume.py) is saved with each step and checked on
    resume. Process 0 holds the workdir lock (lov_jax/workdir_lock.py) while it runs.
    """
    check_train_knobs(config, total_steps)
    with workdir_locked(workdir):
        return _run_training(config, cfg, Path(workdir), data_iter, init_params, total_steps,
                             stop_after, progress, data_fingerprint)  # fmt: skip


@contextlib.contextmanager
def workdir_locked(workdir: str | Path):
    """The training workdir's lock, held by process 0 (the other processes share its run)."""
    lock = WorkdirLock(workdir) if jax.process_index() == 0 else contextlib.nullcontext()
    with lock:
        yield


def check_train_knobs(config, total_steps: int | None = None) -> None:
    """The step knobs, before any work (a bad one would fail mid-run or loop forever).
    `total_steps` None: not known yet (`lov-jax train` checks before estimating it)."""
    t, o = config.train, config.optim
    rules = [  # (name, value, smallest allowed)
        ("train.ckpt_every", t.ckpt_every, 1),
        ("train.ckpt_keep", t.ckpt_keep, 1),
        ("train.ckpt_keep_period", t.ckpt_keep_period, 0),
        ("train.loss_chunk", t.loss_chunk, 1),
        ("optim.grad_accum", o.grad_accum, 1),
        ("optim.max_consecutive_nonfinite", o.max_consecutive_nonfinite, 1),
    ]
    if total_steps is not None:
        rules.append(("total steps (train.num_steps)", total_steps, 1))
    if "loss_tokens_per_row" in t:
        rules.append(("train.loss_tokens_per_row", t.loss_tokens_per_row, 0))  # 0: every one
    for name, value, least in rules:
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < least:
            raise ValueError(f"config {name}={value!r}: must be an integer >= {least}")


def _run_training(config, cfg, workdir, data_iter, init_params, total_steps, stop_after,
                  progress, data_fingerprint) -> TrainResult:  # fmt: skip
    mesh = sharding.mesh_from_config(config.mesh)
    loss_tokens = config.train.get("loss_tokens_per_row", 0)
    lora = _lora(config, cfg)
    trainer = Trainer(cfg, config.optim, mesh, total_steps, config.train.loss_chunk, loss_tokens,
                      lora=lora, context=sharding.context_from_config(config.mesh))  # fmt: skip
    manager = checkpoint.make_manager(
        workdir, keep=config.train.ckpt_keep, keep_period=config.train.ckpt_keep_period
    )
    is_main = jax.process_index() == 0
    run_config = {**orbax_io.config_json(cfg), "stage": config.to_dict()}
    if data_fingerprint is not None:
        run_config["data_fingerprint"] = data_fingerprint
    restored = checkpoint.restore_latest(
        manager, trainer.checkpoint_view(trainer.abstract_state()), run_config,
        allow_config_change=config.train.get("allow_config_change", False),
    )  # fmt: skip
    if restored is None:
        state = trainer.init_state(init_params())
        start, resumed_from = 0, None
    else:
        step, params, opt_state, data_state = restored
        if lora is not None:  # the checkpoint holds the trained leaves; the base is init's
            params = trainer.with_frozen(params, init_params())
        state = TrainState(step=jax.numpy.asarray(step, jax.numpy.int32), params=params,
                           opt_state=opt_state)  # fmt: skip
        state = jax.device_put(state, trainer.state_sharding)
        data_iter.set_state(data_state)
        start, resumed_from = step, step
    writer = metrics.MetricWriter(workdir, enabled=is_main, resume_step=start)
    try:
        return _steps(config, cfg, trainer, manager, writer, data_iter, state, start,
                      resumed_from, total_steps, stop_after, progress, run_config)  # fmt: skip
    except BaseException:
        _close_quietly(manager)  # the pending save finishes (its own error is logged)
        writer.close()
        raise


def _close_quietly(manager) -> None:
    try:
        manager.wait_until_finished()
        manager.close()
    except Exception:  # noqa: BLE001, S110 - an error is already on its way out
        pass


def _steps(config, cfg, trainer, manager, writer, data_iter, state, start, resumed_from,
           total_steps, stop_after, progress, run_config) -> TrainResult:  # fmt: skip
    loss_tokens = config.train.get("loss_tokens_per_row", 0)
    is_main = jax.process_index() == 0
    peak = config.train.get("peak_flops_per_device", 0.0) or metrics.peak_flops(
        jax.devices()[0].device_kind
    )
    accum = config.optim.grad_accum
    losses: dict[int, float] = {}
    skipped, in_a_row, done_here = 0, 0, 0
    bar = _progress(total_steps, start, progress and is_main)
    step = start
    while step < total_steps:
        host = stack_micro_batches([next(data_iter) for _ in range(accum)])
        _check_loss_budget(host, loss_tokens)
        batch = _global_batch(host, trainer)
        t0 = time.perf_counter()
        state, out = trainer.step(state, batch)
        out = jax.device_get(out)
        manager.raise_save_errors()  # a failed async save stops the run at once
        seconds = time.perf_counter() - t0
        lengths, crops, _ = metrics.batch_work(host, cfg.vision.num_features)
        n_proc = jax.process_count()
        flops = metrics.step_flops(cfg, lengths, crops, config.optim.trainable) * n_proc
        record = _step_record(out, host, seconds, flops, peak, data_iter)
        if not bool(out["finite"]):
            skipped += 1
            in_a_row += 1
            print(f"WARNING: non-finite loss/grad at step {step}: skipped ({skipped} so far)")
            if in_a_row >= config.optim.max_consecutive_nonfinite:
                raise NonFiniteLossError(f"{in_a_row} non-finite steps in a row at step {step}")
            writer.write(step, {**record, "skipped_nonfinite": skipped, "skipped": True})
            continue  # the batch is consumed; the optimizer step is not counted
        in_a_row = 0
        losses[step] = float(out["loss"])
        step += 1
        done_here += 1
        writer.write(step, {**record, "skipped_nonfinite": skipped})
        bar.update(1)
        bar.set_postfix(loss=f"{losses[step - 1]:.4f}")
        if step % config.train.ckpt_every == 0 or step == total_steps:
            data_states = checkpoint.gather_data_states(data_iter.get_state())
            checkpoint.save(manager, step, trainer.checkpoint_view(state), run_config, data_states)
        if stop_after is not None and done_here >= stop_after:
            break
    manager.finish()
    manager.close()
    writer.close()
    bar.close()
    return TrainResult(step, losses, skipped, resumed_from, state)


def _lora(config, cfg: ModelConfig):
    """The stage's `lora` block (lov_jax/lora/adapters.py) bound to the model, or None."""
    from lov_jax.lora import adapters

    lcfg = adapters.from_config(config.get("lora"))
    return None if lcfg is None else adapters.Lora(lcfg, cfg)


def _check_loss_budget(host: dict, loss_tokens: int) -> None:
    if loss_tokens:
        most = int(host["loss_mask"].astype(bool).sum(-1).max())
        if most > loss_tokens:
            raise ValueError(
                f"a row has {most} trained tokens > train.loss_tokens_per_row={loss_tokens}; "
                "raise the limit (or set 0 to project every position)"
            )


def _global_batch(host: dict, trainer: Trainer) -> dict:
    """Host-local [A, B_local, ...] arrays -> global jax.Arrays (`trainer.batch_sharding`)."""
    return {
        k: jax.make_array_from_process_local_data(trainer.batch_sharding, v)
        for k, v in host.items()
    }


def _step_record(out, host, seconds, flops, peak, data_iter) -> dict:
    tokens = int((host["segment_ids"] > 0).sum()) * jax.process_count()
    record = {
        "loss": float(out["loss"]),
        "grad_norm": float(out["grad_norm"]),
        "trained_tokens": float(out["trained_tokens"]),
        "trained_token_fraction": float(out["trained_tokens"]) / max(tokens, 1),
        "token_fill": float((host["segment_ids"] > 0).mean()),
        "tokens_per_s": tokens / seconds,
        "step_seconds": seconds,
        "model_flops": flops,
        "mfu": flops / (seconds * jax.device_count() * peak) if peak else None,
        **{k: float(v) for k, v in out.items() if k.startswith("lr/")},
    }
    stats = getattr(data_iter, "stats", None)
    if callable(stats):
        record.update({f"data/{k}": v for k, v in stats().items() if _is_number(v)})
    return record


def _is_number(v) -> bool:
    return isinstance(v, int | float | np.integer | np.floating)


def _progress(total: int, start: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, initial=start, disable=not enabled, desc="train", unit="step")
