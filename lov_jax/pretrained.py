"""`load_pretrained(path)`: (ModelConfig, params) from an HF directory or an Orbax checkpoint.

Every command that takes a checkpoint goes through here, so each accepts both: an
HF dir (config.json + safetensors, any layout of docs/reference.md 9: llava-hf,
transformers 5 or an original haotian-liu / LLaVA-VL one; the model class, LLaVA-1.5,
NeXT or OneVision, is config.json's, lov_jax/architectures.py) or anything
`orbax_io.resolve_checkpoint` accepts (a converted checkpoint, a training
CheckpointManager root, or its workdir).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lov_jax.config import ModelConfig
from lov_jax.convert.hf_keys import CheckpointError
from lov_jax.convert.safetensors_io import INDEX_NAME, SINGLE_NAME


def is_hf_dir(path: str | Path) -> bool:
    p = Path(path)
    return (p / "config.json").is_file() and (
        (p / SINGLE_NAME).is_file() or (p / INDEX_NAME).is_file()
    )


def load_pretrained(
    path: str | Path,
    dtype: Any = None,
    mesh: Any = None,
    *,
    step: int | None = None,
) -> tuple[ModelConfig, dict]:
    """(config, params) from an HF dir or an Orbax checkpoint, auto-detected.

    params: nested dict in our layout. Without `mesh`, host numpy arrays; with a
    `jax.sharding.Mesh`, jax arrays sharded by `sharding.LOGICAL_AXIS_RULES` (Orbax
    restores each shard straight onto its devices). `dtype` casts (default: as
    stored). `step` picks a step of a training run (default: the latest).
    """
    from lov_jax.convert import orbax_io

    p = Path(path)
    if is_hf_dir(p):
        if step is not None:
            raise CheckpointError(f"{p} is an HF checkpoint; step={step} does not apply")
        from lov_jax.convert.import_hf import _to_mesh
        from lov_jax.convert.safetensors_io import load_hf_checkpoint

        cfg, params = load_hf_checkpoint(p, dtype, keep_pages=False)
        return cfg, (params if mesh is None else _to_mesh(params, cfg, mesh))
    if not orbax_io.is_orbax_checkpoint(p):
        raise CheckpointError(
            f"{p}: neither an HF checkpoint (config.json + {SINGLE_NAME} or {INDEX_NAME}) "
            "nor an Orbax checkpoint (params/ item, or step directories)"
        )
    step_dir = orbax_io.readable_step_dir(p, step)  # past corrupt steps, warned
    meta = orbax_io.param_metadata(step_dir)
    cfg = orbax_io.read_config(step_dir, meta)
    problems = orbax_io.check_metadata(meta, cfg)
    if problems:
        raise CheckpointError(
            f"{step_dir}: params do not match config:\n  " + "\n  ".join(problems)
        )
    return cfg, orbax_io.restore_params(step_dir, cfg, meta, dtype=dtype, mesh=mesh)


def asset_dir(path: str | Path) -> Path:
    """Where a checkpoint keeps its tokenizer / template / processor files: an HF dir
    itself, else the first of `path/assets` and the Orbax checkpoint's `assets/`
    (step dir, manager root or training workdir) that holds a tokenizer.json."""
    from lov_jax.convert import orbax_io

    p = Path(path)
    candidates = [p, p / "assets"]
    if not is_hf_dir(p) and orbax_io.is_orbax_checkpoint(p):
        assets = orbax_io.find_assets(orbax_io.resolve_checkpoint(p))
        candidates += [assets] if assets is not None else []
    for d in candidates:
        if (d / "tokenizer.json").is_file():
            return d
    raise CheckpointError(
        f"{p}: no tokenizer.json (looked in {', '.join(str(d) for d in candidates)}); "
        "copy the checkpoint's tokenizer files there"
    )


def load_tokenizer(path: str | Path):
    """The checkpoint's own `tokenizers.Tokenizer` (tokenizer.json in `asset_dir(path)`).

    There is no fallback: another vocabulary's ids would silently index the wrong
    embedding rows (or past the table)."""
    from data_pipelines.tokenizer import load_tokenizer as load_file

    return load_file(asset_dir(path))
