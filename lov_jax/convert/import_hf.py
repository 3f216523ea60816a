"""`lov-jax convert hf-to-orbax`: HF safetensors (any layout of docs/reference.md 9) -> Orbax.

Memory: tensors are read one at a time into owned buffers (no file mapping kept
alive) and written straight into the stacked leaves, so the peak is about one copy
of the params in the output dtype plus the largest single tensor (~1.1x the
checkpoint when the dtype is kept). Orbax then writes those leaves without copying
them (`orbax_io._params_handler`). With `mesh`, each finished leaf moves to the
devices (sharded by our rules table) and its host copy is dropped.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from lov_jax.config import ModelConfig
from lov_jax.convert import io_utils, numerics, orbax_io
from lov_jax.convert.hf_keys import CheckpointError, check_hf_shapes, flatten, hf_to_params
from lov_jax.convert.safetensors_io import hf_model_config, read_hf_dir

DTYPES = ("float32", "bfloat16", "float16")


class _Counted(Mapping):
    """A lazy tensor mapping that ticks a progress bar and counts bytes per read.

    Thread-safe: `hf_to_params` reads from several threads.
    """

    def __init__(self, tensors: Mapping, bar, stats: io_utils.RunStats, check=None):
        self._t, self._bar, self._stats, self._check = tensors, bar, stats, check
        self._lock = threading.Lock()

    def __getitem__(self, name: str) -> np.ndarray:
        x = self._t[name]
        if self._check is not None:
            self._check(name, x)
        with self._lock:
            self._stats.tensors += 1
            self._stats.bytes += x.nbytes
            self._bar.update(1)
        return x

    def __iter__(self) -> Iterator[str]:
        return iter(self._t)

    def __len__(self) -> int:
        return len(self._t)


def inspect_hf_dir(hf_dir: Path) -> tuple[ModelConfig | None, Any, int | None, list[str]]:
    """(config, lazy tensors, the checkpoint's tower depth, problems) for an HF or original
    LLaVA dir; reads headers only, never data."""
    problems: list[str] = []
    cfg = tensors = depth = None
    try:
        hf_cfg, tensors, depth = read_hf_dir(hf_dir, keep_pages=False)
    except CheckpointError as e:
        problems.append(str(e))
    else:
        try:
            cfg = hf_model_config(hf_cfg, tensors, hf_dir)
        except (ValueError, TypeError) as e:
            where = hf_dir / "config.json"
            problems.append(str(e) if str(where) in str(e) else f"{where}: {e}")
        else:
            shapes = {k: tensors.shape(k) for k in tensors}
            problems += check_hf_shapes(shapes, cfg, depth)
    return cfg, tensors, depth, problems


def _to_mesh(params: dict, cfg: ModelConfig, mesh) -> dict:
    import jax

    from lov_jax.convert.hf_keys import unflatten
    from lov_jax.models.llava_onevision import abstract_params
    from lov_jax.sharding import params_sharding

    shardings = flatten(params_sharding(abstract_params(cfg), mesh))
    flat = flatten(params)
    out = {}
    for path in list(flat):
        out[path] = jax.device_put(flat.pop(path), shardings[path])  # host copy freed here
    return unflatten(out)


def hf_to_orbax(
    hf_dir: str | Path,
    out: str | Path,
    *,
    dtype: str | None = None,
    mesh: str | Any = None,
    overwrite: bool = False,
    progress: bool = True,
    allow_nonfinite: bool = False,
) -> io_utils.RunStats:
    """Convert an HF (llava-hf, transformers 5) or original LLaVA dir into an Orbax
    checkpoint at `out` (orbax_io layout).

    `dtype` (float32/bfloat16/float16) casts the params; default keeps the file's dtype.
    `mesh`: a Mesh or a `--mesh` value ("fsdp=4,tensor=2", `sharding.MESH_HELP`) to place
    (and save) the params sharded.
    Raises one CheckpointError listing every problem before writing anything; a tensor
    with NaN / inf, or with values `dtype` cannot hold, is one too, named, before the
    output appears (`allow_nonfinite`: a warning each, `numerics.NumberCheck`).
    """
    hf_dir, out = Path(hf_dir).absolute(), Path(out).absolute()
    stats = io_utils.RunStats("hf-to-orbax")
    problems = io_utils.output_problems(out, overwrite, [hf_dir])
    if dtype is not None and dtype not in DTYPES:
        problems.append(f"--dtype {dtype!r} not in {DTYPES}")
    cfg, tensors, depth, found = inspect_hf_dir(hf_dir)
    io_utils.raise_if(problems + found, f"cannot convert {hf_dir}")
    if isinstance(mesh, str):
        from lov_jax.sharding import mesh_from_flag

        mesh = mesh_from_flag(mesh)

    used = sum(1 for k in tensors if not k.endswith("rotary_emb.inv_freq"))
    check = numerics.NumberCheck(dtype, allow_nonfinite)
    with io_utils.atomic_output(out, overwrite) as tmp:
        with io_utils.progress(used, "hf-to-orbax", progress) as bar:
            params = hf_to_params(
                _Counted(tensors, bar, stats, check), cfg, dtype=dtype, tower_layers=depth
            )
        check.finish(f"cannot convert {hf_dir}")
        if mesh is not None:
            params = _to_mesh(params, cfg, mesh)
        orbax_io.save_checkpoint(tmp, params, cfg, assets_from=hf_dir)
        del params
    return stats.finish()
