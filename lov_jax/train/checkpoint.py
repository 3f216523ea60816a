"""Orbax CheckpointManager for training runs.

Layout of `workdir/checkpoints/<step>/` (one Orbax step directory per save):
    params     StandardSave of the nested params tree (fp32 master weights)
    opt_state  StandardSave of the optimizer state (trainable leaves only)
    config     JsonSave: {"model": ModelConfig.to_hf_config(), "stage": the stage ConfigDict}
    data_iter  JsonSave: {"process_count": P, "states": {"<process>": iterator state}},
               gathered from every process when the save is issued (exact resume)
The step number is the directory name. `lov-jax convert orbax-to-hf --ckpt workdir`
reads `params` + `config` from the latest step. Saves are async; only committed
steps are listed (Orbax writes to a temporary name and renames), and a step whose
restore fails (corrupt files) is skipped with a warning in favour of the previous one.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)

ITEMS = ("params", "opt_state", "config", "data_iter")


def checkpoint_dir(workdir: str | Path) -> Path:
    return Path(workdir).absolute() / "checkpoints"


def make_manager(workdir: str | Path, keep: int = 3, keep_period: int = 0, async_save=True):
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep,
        keep_period=keep_period or None,
        enable_async_checkpointing=async_save,
        create=True,
    )
    return ocp.CheckpointManager(checkpoint_dir(workdir), options=options, item_names=ITEMS)


def gather_data_states(local_state: Any) -> dict:
    """Every process's iterator state, captured now (saves are async), keyed by process."""
    import json

    import numpy as np

    blob = json.dumps(local_state).encode()
    if jax.process_count() == 1:
        return {"process_count": 1, "states": {"0": local_state}}
    from jax.experimental import multihost_utils

    sizes = multihost_utils.process_allgather(np.asarray([len(blob)]))
    buf = np.zeros(int(sizes.max()), np.uint8)
    buf[: len(blob)] = np.frombuffer(blob, np.uint8)
    blobs = multihost_utils.process_allgather(buf)
    states = {
        str(i): json.loads(bytes(blobs[i][: int(sizes[i][0])]).decode())
        for i in range(jax.process_count())
    }
    return {"process_count": jax.process_count(), "states": states}


def local_data_state(saved: dict) -> Any:
    if saved["process_count"] != jax.process_count():
        raise ValueError(
            f"checkpoint data state was written by {saved['process_count']} processes, this "
            f"run has {jax.process_count()}: the sample stream cannot resume exactly"
        )
    return saved["states"][str(jax.process_index())]


def save(manager, step: int, state, config: dict, data_state: dict) -> None:
    """`data_state` comes from `gather_data_states` (called on every process)."""
    manager.save(
        step,
        args=ocp.args.Composite(
            params=ocp.args.StandardSave(state.params),
            opt_state=ocp.args.StandardSave(state.opt_state),
            config=ocp.args.JsonSave(config),
            data_iter=ocp.args.JsonSave(data_state),
        ),
    )


def restore_latest(manager, abstract_state):
    """(step, params, opt_state, data_state) from the newest restorable step, or None.

    `abstract_state` carries the target shapes, dtypes and shardings (any mesh).
    """
    for step in sorted(manager.all_steps(), reverse=True):
        try:
            restored = manager.restore(
                step,
                args=ocp.args.Composite(
                    params=ocp.args.StandardRestore(abstract_state.params),
                    opt_state=ocp.args.StandardRestore(abstract_state.opt_state),
                    data_iter=ocp.args.JsonRestore(),
                ),
            )
        except Exception as err:  # noqa: BLE001 - any unreadable step: fall back
            _warn(
                f"checkpoint step {step} is unreadable ({type(err).__name__}: {err}); "
                "falling back to the previous step"
            )
            continue
        data_state = local_data_state(restored["data_iter"])
        return step, restored["params"], restored["opt_state"], data_state
    return None


def _warn(message: str) -> None:
    log.warning(message)
    if jax.process_index() == 0:
        print(f"WARNING: {message}", flush=True)
