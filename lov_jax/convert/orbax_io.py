"""Orbax checkpoints of lov_jax params: the one layout conversion and training share.

One checkpoint ("step directory") is an Orbax composite checkpoint:

    <ckpt>/
      _CHECKPOINT_METADATA   Orbax: item name -> handler
      params/                PyTree item: the nested params dict in our layout
                             (`abstract_params`: kernels [in, out], heads split,
                             layers stacked on axis 0). OCDBT + zarr, saved without
                             shardings required on restore: pass target shardings
                             (`sharding.params_sharding`) and it restores onto any mesh.
                             Training writes it with `ocp.args.StandardSave`, conversion
                             with `PyTreeSave` (same files; no compression, no host copy).
      config/                JSON item: {"model": ModelConfig.to_hf_config(), ...}
                             (training adds "stage"); a bare config.json dict is read too.
      assets/                optional plain files: tokenizer / processor / chat template /
                             generation config (`io_utils.ASSET_FILES`), copied verbatim.
      opt_state/, data_iter/ training only; ignored here.

`lov-jax convert hf-to-orbax` writes exactly one such directory. A training run's
`ocp.CheckpointManager` root holds one per step, `<root>/<step>/`, with the items
named `params` and `config` (and others); `resolve_checkpoint` accepts a step dir,
a manager root (latest step or an explicit one) or a workdir whose `checkpoints/`
is a manager root. Assets are looked up in the step dir, then the manager root,
then the workdir (training copies the tokenizer files to one of these).

`readable_step_dir` is `resolve_checkpoint` plus a read-back check (every param leaf
readable, of its stored shape and finite) that falls back step by step past corrupt
steps with one warning each (lov_jax/train/checkpoint.py quarantines them on resume).

The vocabulary size and tying come from the stored shapes (embedding rows; an
`lm_head` leaf or not), overriding the config (docs/reference.md 1.3).
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from lov_jax.config import ModelConfig
from lov_jax.convert.hf_keys import (
    CheckpointError,
    check_params,
    flatten,
    llm_leaves,
    unflatten,
)
from lov_jax.convert.io_utils import copy_assets
from lov_jax.convert.safetensors_io import load_checkpoint_tokenizer
from lov_jax.token_ids import TokenIds, read_token_ids

log = logging.getLogger(__name__)

PARAMS, CONFIG, ASSETS = "params", "config", "assets"
_STEP = re.compile(r"^(?:.*_)?(\d+)$")  # "123" (Orbax default) or "<prefix>_123"


def _params_handler() -> ocp.PyTreeCheckpointHandler:
    # Orbax deep-copies numpy leaves before writing and zstd-compresses chunks; each
    # costs a full extra copy of the params in RAM (measured 2-3x peak), and random
    # or trained 16-bit weights barely compress. Our leaves are never mutated while saving.
    # Params trees hold only numpy and jax arrays (the leaf types this handler saves).
    th = ocp.type_handlers
    reg = th.create_type_handler_registry(
        (np.ndarray, th.NumpyHandler(deepcopy_host_arrays=False)),
        (jax.Array, th.ArrayHandler()),
    )
    return ocp.PyTreeCheckpointHandler(type_handler_registry=reg, use_compression=False)


# OCDBT data files (and so zarr chunks) of at most 8 MiB. Orbax's default writes each
# leaf as one chunk that TensorStore buffers whole: saving 8.7 GB of 7B-sized bf16
# leaves peaked at +7.4 GB RSS in 23 s; with 8 MiB files, +0.33 GB in 13 s (64 MiB:
# +0.95 GB; OV-0.5B hf-to-orbax peaks 1.98 / 2.85 / 2.15 GB at default / 64 / 8 MiB).
# Chunking does not constrain the restore sharding.
_DATA_FILE_BYTES = 8 * 2**20


def config_json(cfg: ModelConfig) -> dict:
    """The `config` item of a converted checkpoint (training adds its own keys): the HF
    config dict and the checkpoint's special ids (lov_jax/token_ids.py)."""
    return {"model": cfg.to_hf_config(), "token_ids": cfg.ids.to_json()}


def save_checkpoint(
    path: str | Path, params: Mapping, cfg: ModelConfig, assets_from: Path | None = None
) -> Path:
    """Write one step directory at `path` (must not exist). Leaves: numpy or jax arrays."""
    path = Path(path).absolute()
    handler = ocp.CompositeCheckpointHandler(
        **{PARAMS: _params_handler(), CONFIG: ocp.JsonCheckpointHandler()}
    )
    with ocp.Checkpointer(handler) as ckptr:
        ckptr.save(
            path,
            ocp.args.Composite(
                **{
                    PARAMS: ocp.args.PyTreeSave(
                        params, ocdbt_target_data_file_size=_DATA_FILE_BYTES
                    ),
                    CONFIG: ocp.args.JsonSave(config_json(cfg)),
                }
            ),
        )
    copy_assets(assets_from, path / ASSETS)
    return path


class CorruptCheckpoint(CheckpointError):
    """A step that cannot be read back as written (unreadable, misshapen or non-finite)."""


# ---- locating a checkpoint -----------------------------------------------------------


def _is_step_dir(p: Path) -> bool:
    return (p / PARAMS).is_dir()


def step_dirs(root: Path) -> dict[int, Path]:
    """{step: dir} of committed steps in a CheckpointManager root (tmp dirs never match)."""
    out = {}
    if root.is_dir():
        for p in root.iterdir():
            m = _STEP.match(p.name)
            if m and _is_step_dir(p):
                out[int(m.group(1))] = p
    return out


def is_orbax_checkpoint(path: str | Path) -> bool:
    p = Path(path)
    return _is_step_dir(p) or bool(step_dirs(p)) or bool(step_dirs(p / "checkpoints"))


def resolve_checkpoint(path: str | Path, step: int | None = None) -> Path:
    """A step dir, a CheckpointManager root or a training workdir -> the step dir to read."""
    p = Path(path).absolute()
    if _is_step_dir(p):
        if step is not None:
            raise CheckpointError(f"{p} is a single checkpoint; --step {step} does not apply")
        return p
    for root in (p, p / "checkpoints"):
        steps = step_dirs(root)
        if not steps:
            continue
        if step is None:
            return steps[max(steps)]
        if step not in steps:
            raise CheckpointError(f"{root}: no step {step}; available steps {sorted(steps)}")
        return steps[step]
    raise CheckpointError(
        f"{p}: not an Orbax checkpoint (no {PARAMS}/ item, no step directories here or in "
        "checkpoints/)"
    )


def find_assets(step_dir: Path) -> Path | None:
    """The first `assets/` of: step dir, manager root, workdir (see module docstring)."""
    for d in (step_dir, step_dir.parent, step_dir.parent.parent):
        if (d / ASSETS).is_dir():
            return d / ASSETS
    return None


# ---- reading -------------------------------------------------------------------------


def param_metadata(step_dir: Path) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """{param path: (shape, dtype)} as stored, without reading any array data."""
    with ocp.Checkpointer(ocp.PyTreeCheckpointHandler()) as ckptr:
        tree = ckptr.metadata(step_dir / PARAMS).item_metadata.tree
    return {
        k: (tuple(int(d) for d in m.shape), np.dtype(m.dtype)) for k, m in flatten(tree).items()
    }


def read_config(step_dir: Path, meta: Mapping[str, tuple] | None = None) -> ModelConfig:
    """ModelConfig from the `config` item, vocab size and tying from the stored shapes."""
    if not (step_dir / CONFIG).is_dir():
        raise CheckpointError(f"{step_dir}: no {CONFIG}/ item (the model config)")
    with ocp.Checkpointer(ocp.JsonCheckpointHandler()) as ckptr:
        stored = ckptr.restore(step_dir / CONFIG)
    hf = stored.get("model", stored) if isinstance(stored, dict) else None
    if not isinstance(hf, dict) or "text_config" not in hf:
        raise CheckpointError(f"{step_dir / CONFIG}: no model config (expected a 'model' key)")
    from lov_jax import architectures

    cfg = architectures.from_hf_config(hf, source=str(step_dir / CONFIG))
    meta = param_metadata(step_dir) if meta is None else meta
    head, embed = llm_leaves(cfg)  # the LLM family's leaf names
    over: dict[str, Any] = {"tie_word_embeddings": head not in meta}
    if embed in meta:
        over["vocab_size"] = meta[embed][0][0]
    text = dataclasses.replace(cfg.text, **over)
    if "token_ids" in stored:
        ids = TokenIds.from_json(stored["token_ids"], f"{step_dir / CONFIG}: token_ids")
    else:  # a bare config.json dict: the ids from it, generation_config.json and assets/
        assets = find_assets(step_dir)
        tok = None if assets is None else load_checkpoint_tokenizer(assets)
        ids = read_token_ids(
            step_dir, hf, tok, vocab_size=text.vocab_size, asset_dirs=[assets] if assets else []
        )
    ids.check(text.vocab_size, f"{step_dir / CONFIG}: token_ids")
    return cfg.replace(text=text, token_ids=ids)


def check_metadata(meta: Mapping[str, tuple], cfg: ModelConfig) -> list[str]:
    """Every unexpected, missing or misshapen param leaf."""
    return check_params({p: shape for p, (shape, _) in meta.items()}, cfg)


def restore_leaf(step_dir: Path, path: str, dtype: Any = None) -> np.ndarray:
    """One param leaf as a host numpy array (Orbax partial restore: reads only that leaf)."""
    item = unflatten({path: 0})
    args = unflatten({path: ocp.RestoreArgs(restore_type=np.ndarray, dtype=dtype)})
    with ocp.Checkpointer(ocp.PyTreeCheckpointHandler()) as ckptr:
        tree = ckptr.restore(
            step_dir / PARAMS,
            args=ocp.args.PyTreeRestore(item=item, restore_args=args, partial_restore=True),
        )
    return flatten(tree)[path]


def restore_params(
    step_dir: Path,
    cfg: ModelConfig,
    meta: Mapping[str, tuple],
    *,
    dtype: Any = None,
    mesh: jax.sharding.Mesh | None = None,
) -> dict:
    """The params item: numpy arrays, or jax arrays laid out by our rules table on `mesh`.

    `dtype` casts while reading (default: the stored dtype). Extra items of a training
    step (optimizer state, iterator state) are never read.
    """
    if mesh is None:
        args = {p: ocp.RestoreArgs(restore_type=np.ndarray, dtype=dtype) for p in meta}
        item = {p: 0 for p in meta}
    else:
        from lov_jax.models.llava_onevision import abstract_params
        from lov_jax.sharding import params_sharding

        shardings = flatten(params_sharding(abstract_params(cfg), mesh))
        item = {
            p: jax.ShapeDtypeStruct(shape, np.dtype(dtype or dt), sharding=shardings[p])
            for p, (shape, dt) in meta.items()
        }
        args = ocp.checkpoint_utils.construct_restore_args(item)
    with ocp.Checkpointer(ocp.PyTreeCheckpointHandler()) as ckptr:
        return ckptr.restore(
            step_dir / PARAMS,
            args=ocp.args.PyTreeRestore(item=unflatten(item), restore_args=unflatten(args)),
        )


# ---- verified reading (generate / eval / convert on a training workdir) -------------


def readable_step_dir(path: str | Path, step: int | None = None, *, finite: bool = True) -> Path:
    """`resolve_checkpoint`, verified: the newest step whose config, metadata and
    params read back finite, falling back step by step with one warning each (nothing is
    moved: readers never change a workdir). An explicit `step` is verified, never
    replaced: a corrupt one is a CorruptCheckpoint naming the steps there are.

    `finite=False` skips the finiteness check (export checks numbers per tensor itself).
    Verifying reads the params once more (host memory for one copy of them)."""
    first = resolve_checkpoint(path, step)
    steps = step_dirs(first.parent)
    if step is not None or (Path(path) / PARAMS).is_dir():
        candidates = [(step, first)]  # an explicit step, a step dir or a converted checkpoint
    else:
        candidates = sorted(steps.items(), reverse=True)
    for i, (s, step_dir) in enumerate(candidates):
        try:
            verify_step_dir(step_dir, finite=finite)
        except Exception as err:  # noqa: BLE001 - any read failure of the step: corrupt
            if len(candidates) == 1:
                others = f"; steps there: {sorted(steps)}" if steps else ""
                message = corrupt_message(s, step_dir, err, "cannot read it") + others
                raise CorruptCheckpoint(message) from err
            left = candidates[i + 1 :]
            nxt = f"falling back to step {left[0][0]}" if left else "no earlier step"
            warn(corrupt_message(s, step_dir, err, f"left in place; {nxt}"))
            continue
        return step_dir
    raise CorruptCheckpoint(f"{first.parent}: every checkpoint step is corrupt (warned above)")


def verify_step_dir(step_dir: Path, finite: bool = True) -> None:
    """Config and params of one step dir read back, each param leaf of its stored shape
    and finite (one restore of the params as host arrays)."""
    meta = param_metadata(step_dir)
    cfg = read_config(step_dir, meta)
    params = flatten(restore_params(step_dir, cfg, meta))
    for path, (shape, _) in meta.items():
        leaf = params.get(path)
        if leaf is None or leaf.shape != shape:
            got = None if leaf is None else leaf.shape
            raise CorruptCheckpoint(f"{path} read as {got}, saved as {shape}")
        if finite and np.issubdtype(leaf.dtype, np.inexact) and not np.isfinite(leaf).all():
            raise CorruptCheckpoint(f"{path} holds non-finite values")


def one_line(err: BaseException, limit: int = 300) -> str:
    text = " ".join(str(err).split())
    text = text if len(text) <= limit else text[: limit - 3] + "..."
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def corrupt_message(step: int | None, step_dir: Path, err: BaseException, action: str) -> str:
    """The one warning a corrupt step gets (training and readers alike)."""
    what = f"checkpoint step {step} ({step_dir})" if step is not None else f"checkpoint {step_dir}"
    return f"{what} is corrupt ({one_line(err)}); {action}"


def warn(message: str) -> None:
    """One warning line on process 0's stdout (the log elsewhere), e.g. a corrupt step."""
    if jax.process_index() == 0:
        print(f"WARNING: {message}", flush=True)
    else:
        log.info(message)
