"""Orbax CheckpointManager for training runs.

Layout of `workdir/checkpoints/<step>/` (one Orbax step directory per save):
    params     StandardSave of the nested params tree (fp32 master weights)
    opt_state  StandardSave of the optimizer state (trainable leaves only)
    config     JsonSave: {"model": ModelConfig.to_hf_config(), "stage": the stage ConfigDict,
               "data_fingerprint": {...} (lov_jax/train/resume.py)}
    data_iter  JsonSave: {"process_count": P, "states": {"<process>": iterator state}},
               gathered from every process when the save is issued (exact resume)
The step number is the directory name. Saves are async; only committed steps are listed
(Orbax writes to a temporary name and renames).

Restoring tells two failures apart (`restore_latest`):
  * a structural mismatch with this run (other trainable groups, other shapes) or a
    changed stage config / data: an error saying what differs (`CheckpointMismatch`,
    `resume.ResumeConfigChanged`), never a fresh start over the old run;
  * a corrupt step (Orbax cannot read it, a leaf has the wrong size or is not finite):
    moved to `workdir/quarantine/<step>` (never deleted) with one warning, and the previous
    step is tried; the retrained step is then saved in its place.
Readers (`lov-jax generate / eval / convert` on a training workdir) call
`orbax_io.readable_step_dir`: the same checks and fall-back, same message, nothing moved.
A failed async save is raised at the next training step (`Manager.raise_save_errors`) and
before exit (`Manager.finish`) as one `CheckpointSaveError`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from lov_jax.convert.hf_keys import CheckpointError
from lov_jax.convert.orbax_io import CorruptCheckpoint, corrupt_message, one_line, warn

ITEMS = ("params", "opt_state", "config", "data_iter")
QUARANTINE = "quarantine"


class CheckpointMismatch(CheckpointError):
    """The checkpoint's trees do not fit this run's model / trainable groups."""


class CheckpointSaveError(RuntimeError):
    """An (async) save failed; the step it names was not written."""


def checkpoint_dir(workdir: str | Path) -> Path:
    return Path(workdir).absolute() / "checkpoints"


class Manager(ocp.CheckpointManager):
    """CheckpointManager that remembers the step of its last save, to name it on failure."""

    last_save: int | None = None

    def raise_save_errors(self) -> None:
        """Raise a finished async save's error now (cheap: no waiting)."""
        try:
            self.check_for_errors()
        except Exception as err:  # noqa: BLE001 - Orbax re-raises the writer's error
            raise self._save_error(err) from err

    def finish(self) -> None:
        """Wait for the pending save; its error as one CheckpointSaveError."""
        try:
            self.wait_until_finished()
        except Exception as err:  # noqa: BLE001
            raise self._save_error(err) from err

    def _save_error(self, err: BaseException) -> CheckpointSaveError:
        return CheckpointSaveError(
            f"saving checkpoint step {self.last_save} to {self.directory} failed: "
            f"{one_line(err)}; that step was not written (the steps before it are intact: "
            "free space / fix the cause and rerun to resume from the last saved step)"
        )


def make_manager(workdir: str | Path, keep: int = 3, keep_period: int = 0, async_save=True):
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep,
        keep_period=keep_period or None,
        enable_async_checkpointing=async_save,
        create=True,
    )
    return Manager(checkpoint_dir(workdir), options=options, item_names=ITEMS)


def gather_data_states(local_state: Any) -> dict:
    """Every process's iterator state, captured now (saves are async), keyed by process."""
    import json

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
    if isinstance(manager, Manager):
        manager.finish()  # Orbax waits for the previous save anyway; its error names its step
        manager.last_save = step
    manager.save(
        step,
        args=ocp.args.Composite(
            params=ocp.args.StandardSave(state.params),
            opt_state=ocp.args.StandardSave(state.opt_state),
            config=ocp.args.JsonSave(config),
            data_iter=ocp.args.JsonSave(data_state),
        ),
    )


# ---- restoring -------------------------------------------------------------------------


def restore_latest(manager, abstract_state, run_config: dict | None = None,
                   allow_config_change: bool = False):  # fmt: skip
    """(step, params, opt_state, data_state) from the newest good step, or None (no steps).

    `abstract_state` carries the target shapes, dtypes and shardings (any mesh).
    `run_config` (the `config` item this run would save) is compared with the step's:
    a changed stage config or data fingerprint is `resume.ResumeConfigChanged` unless
    `allow_config_change` (then a warning). Corrupt steps are quarantined (module doc).
    """
    from lov_jax.train import resume

    root = Path(manager.directory)
    for step in sorted(manager.all_steps(), reverse=True):
        step_dir = _manager_step_dir(root, step)
        try:
            saved = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
            saved = saved["config"]
            stored = {
                "params": stored_shapes(step_dir / "params"),
                "opt_state": stored_shapes(step_dir / "opt_state"),
            }
        except Exception as err:  # noqa: BLE001 - metadata Orbax cannot read: corrupt
            _quarantine(manager, step, step_dir, err)
            continue
        wanted = {"params": abstract_state.params, "opt_state": abstract_state.opt_state}
        changes = resume.config_changes(saved, run_config) if run_config else []
        problems = [p for item in wanted for p in tree_diff(item, stored[item], wanted[item])]
        if problems:
            raise CheckpointMismatch(_mismatch_message(step_dir, problems, changes))
        if changes:
            resume.refuse_or_warn(step_dir, changes, allow_config_change)
        try:
            restored = manager.restore(
                step,
                args=ocp.args.Composite(
                    params=ocp.args.StandardRestore(abstract_state.params),
                    opt_state=ocp.args.StandardRestore(abstract_state.opt_state),
                    data_iter=ocp.args.JsonRestore(),
                ),
            )
            verify_tree(restored["params"], abstract_state.params, "params")
            verify_tree(restored["opt_state"], abstract_state.opt_state, "opt_state")
        except Exception as err:  # noqa: BLE001 - unreadable data or bad values: corrupt
            _quarantine(manager, step, step_dir, err)
            continue
        data_state = local_data_state(restored["data_iter"])
        return step, restored["params"], restored["opt_state"], data_state
    return None


def _manager_step_dir(root: Path, step: int) -> Path:
    from lov_jax.convert import orbax_io

    return orbax_io.step_dirs(root).get(step, root / str(step))


def _key(entry) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    return str(entry)


def tree_shapes(tree) -> dict[str, tuple[int, ...]]:
    """{"a/0/b": shape} of every array leaf, keyed the way Orbax names saved leaves."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {"/".join(_key(e) for e in path): tuple(np.shape(x)) for path, x in flat}


def stored_shapes(item_dir: Path) -> dict[str, tuple[int, ...]]:
    """{leaf path: shape} of a saved PyTree item, from its metadata (no array data read)."""
    with ocp.Checkpointer(ocp.PyTreeCheckpointHandler()) as ckptr:
        tree = ckptr.metadata(item_dir).item_metadata.tree
    out: dict[str, tuple[int, ...]] = {}

    def walk(node, prefix):
        if isinstance(node, dict):
            items = node.items()
        elif isinstance(node, list | tuple):
            items = enumerate(node)
        else:
            if node is not None:
                out[prefix[:-1]] = tuple(int(d) for d in node.shape)
            return
        for k, v in items:
            walk(v, f"{prefix}{k}/")

    walk(tree, "")
    return out


def tree_diff(item: str, stored: dict, wanted_tree) -> list[str]:
    """Leaves missing, unexpected or of another shape in a stored item versus this run's."""
    wanted = tree_shapes(wanted_tree)
    out = [f"{item}: this run has {k} {wanted[k]}, the checkpoint does not"
           for k in sorted(set(wanted) - set(stored))]  # fmt: skip
    out += [f"{item}: the checkpoint has {k} {stored[k]}, this run does not"
            for k in sorted(set(stored) - set(wanted))]  # fmt: skip
    out += [f"{item}: {k} is {stored[k]} in the checkpoint, {wanted[k]} in this run"
            for k in sorted(set(stored) & set(wanted)) if stored[k] != wanted[k]]  # fmt: skip
    return out


def _mismatch_message(step_dir: Path, problems: list[str], changes: list[str]) -> str:
    shown = problems[:8] + ([f"... {len(problems) - 8} more"] if len(problems) > 8 else [])
    why = ("\n  the stage config changed: " + "; ".join(changes[:6])) if changes else ""
    workdir = step_dir.parent.parent
    return (
        f"cannot resume from {step_dir}: its trees do not fit this run (nothing was "
        "changed on disk):\n  " + "\n  ".join(shown) + why + "\n  to start a new run from "
        f"its weights only, use a new --workdir with --config.init_from={workdir} "
        "(params only: fresh optimizer state and data stream); to continue the old run, "
        "rerun with its config"
    )


def verify_tree(restored, abstract, item: str) -> None:
    """Every leaf has the shape asked for and only finite values (raises CorruptCheckpoint)."""
    want = tree_shapes(abstract)
    got = tree_shapes(restored)
    bad = [k for k in want if got.get(k) != want[k]]
    if bad:
        raise CorruptCheckpoint(f"{item}: {bad[0]} restored as {got.get(bad[0])}, "
                                f"saved as {want[bad[0]]}")  # fmt: skip
    leaves = [x for x in jax.tree.leaves(restored) if jax.numpy.issubdtype(x.dtype, np.inexact)]
    if leaves:
        finite = jax.device_get(_all_finite(leaves))
        if not all(bool(f) for f in finite):
            names = [k for k, f in zip(_inexact_paths(restored), finite, strict=True) if not f]
            raise CorruptCheckpoint(f"{item}: non-finite values in {', '.join(names[:4])}")


@jax.jit
def _all_finite(leaves):
    return [jax.numpy.isfinite(x).all() for x in leaves]


def _inexact_paths(tree) -> list[str]:
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return ["/".join(_key(e) for e in p) for p, x in flat
            if jax.numpy.issubdtype(x.dtype, np.inexact)]  # fmt: skip


def _quarantine(manager, step: int, step_dir: Path, err: BaseException) -> None:
    dest = quarantine_path(step_dir)
    if jax.process_index() == 0:
        dest.parent.mkdir(parents=True, exist_ok=True)
        step_dir.rename(dest)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(f"lov_jax quarantine {step}")
    manager.reload()  # the step is gone: its retrained save is written, not skipped
    left = [s for s in manager.all_steps() if s < step]
    then = f"falling back to step {max(left)}" if left else "no earlier step: starting at 0"
    warn(corrupt_message(step, step_dir, err, f"moved to {dest}; {then}"))


def quarantine_path(step_dir: Path) -> Path:
    """`workdir/quarantine/<step>` (or `<step>.1`, ... when that is taken)."""
    base = step_dir.parent.parent / QUARANTINE / step_dir.name
    dest, n = base, 0
    while dest.exists():
        n += 1
        dest = base.with_name(f"{base.name}.{n}")
    return dest
