"""`lov-jax convert orbax-to-hf`: an Orbax checkpoint -> a directory `transformers` loads.

Writes safetensors shards (+ `model.safetensors.index.json` when more than one) with
the key layout the installed transformers' `save_pretrained` writes
(`params_to_hf(layout="hf")`; or the llava-hf hub's, or the original LLaVA one),
`config.json` (`ModelConfig.to_hf_config`, whose class loads it: Llava / LlavaNext /
LlavaOnevision), `generation_config.json` and the tokenizer / processor / chat-template
files. A tied model gets no lm_head tensor.

Memory: the shard headers are computed from the stored shapes up front, then each
param leaf is restored alone (Orbax partial restore) and its HF tensors are
appended to the open shard; the peak is about the largest stacked leaf plus one
HF tensor, independent of the model size.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import numpy as np

from lov_jax import architectures
from lov_jax.config import ModelConfig
from lov_jax.convert import io_utils, numerics, orbax_io
from lov_jax.convert.hf_keys import CheckpointError, hf_entries, unused_fill
from lov_jax.convert.safetensors_io import (
    _NAMES,
    INDEX_NAME,
    ORIGINAL_TOWER_PREFIX,
    SINGLE_NAME,
    _parse_size,
)

DTYPES = ("float32", "bfloat16", "float16")
LAYOUTS_OUT = ("hf", "hf_legacy", "original")


class ShardWriter:
    """Streams tensors into safetensors files whose headers are known in advance.

    `plan`: [(name, dtype, shape)] in write order. Shards are cut like
    `write_safetensors` (a tensor that would overflow `max_shard_size` starts a new
    shard); each file is `u64 header length | JSON header (space-padded to 8 bytes)
    | data`, offsets relative to the data block.
    """

    def __init__(self, out_dir: Path, plan: list[tuple[str, np.dtype, tuple]], max_shard_size):
        limit = _parse_size(max_shard_size)
        shards: list[list[tuple[str, np.dtype, tuple]]] = [[]]
        used = 0
        for name, dtype, shape in plan:
            nbytes = int(np.prod(shape)) * dtype.itemsize
            if shards[-1] and used + nbytes > limit:
                shards.append([])
                used = 0
            shards[-1].append((name, dtype, shape))
            used += nbytes
        n = len(shards)
        self.files = (
            [SINGLE_NAME]
            if n == 1
            else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        )
        self.out_dir, self.shards = out_dir, shards
        self.weight_map = {
            name: f for s, f in zip(shards, self.files, strict=True) for name, _, _ in s
        }
        self.total_size = sum(int(np.prod(s)) * d.itemsize for s_ in shards for _, d, s in s_)
        self._expected = iter([(f, e) for s, f in zip(shards, self.files, strict=True) for e in s])
        self._file = None
        self._fname = None

    def _open(self, fname: str) -> None:
        if self._file is not None:
            self._file.close()
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for name, dtype, shape in self.shards[self.files.index(fname)]:
            nbytes = int(np.prod(shape)) * dtype.itemsize
            header[name] = {
                "dtype": _NAMES[dtype],
                "shape": list(shape),
                "data_offsets": [offset, offset + nbytes],
            }
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self._file = open(self.out_dir / fname, "wb")  # noqa: SIM115 - closed in close()
        self._file.write(len(raw).to_bytes(8, "little") + raw)
        self._fname = fname

    def write(self, name: str, x: np.ndarray) -> None:
        fname, (want, dtype, shape) = next(self._expected)
        if (name, x.dtype, tuple(x.shape)) != (want, dtype, tuple(shape)):
            raise AssertionError(f"writer got {name} {x.dtype}{list(x.shape)}, planned {want}")
        if fname != self._fname:
            self._open(fname)
        self._file.write(memoryview(np.ascontiguousarray(x).reshape(-1).view(np.uint8)))

    def close_file(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def write_index(self) -> None:
        if next(self._expected, None) is not None:
            raise AssertionError("not every planned tensor was written")
        if len(self.files) > 1:
            index = {"metadata": {"total_size": self.total_size}, "weight_map": self.weight_map}
            text = json.dumps(index, indent=2, sort_keys=True) + "\n"
            (self.out_dir / INDEX_NAME).write_text(text)


def hf_config_json(cfg: ModelConfig, dtype: np.dtype) -> dict:
    """config.json: our exact config plus the tensor dtype (transformers 5 key `dtype`)."""
    return {**cfg.to_hf_config(), "dtype": str(np.dtype(dtype))}


def write_hf_metadata(
    out: Path, cfg: ModelConfig, dtype: np.dtype, assets: Path | None, layout: str = "hf"
) -> None:
    """config.json, the asset files, and a llava-hf generation_config.json unless copied.

    The "original" layout gets the original's flat config.json and its tower's own
    config.json in ORIGINAL_TOWER_DIR."""
    if layout == "original":
        dt = {"torch_dtype": str(np.dtype(dtype))}
        tower = out / architectures.ORIGINAL_TOWER_DIR
        tower.mkdir(exist_ok=True)
        text = json.dumps({**architectures.tower_to_hf(cfg), **dt}, indent=2) + "\n"
        (tower / "config.json").write_text(text)
        config = {**architectures.to_original_config(cfg), **dt}
    else:
        config = hf_config_json(cfg, dtype)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    copied = io_utils.copy_assets(assets, out)
    if "generation_config.json" not in copied:
        text = json.dumps(generation_config(cfg), indent=2) + "\n"
        (out / "generation_config.json").write_text(text)


def generation_config(cfg: ModelConfig) -> dict:
    """generation_config.json from the checkpoint's ids (eos as a list when several)."""
    ids = cfg.ids
    eos = ids.eos[0] if len(ids.eos) == 1 else list(ids.eos)
    gen = {"bos_token_id": ids.bos, "eos_token_id": eos, "pad_token_id": ids.pad}
    return {k: v for k, v in gen.items() if v is not None}


def orbax_to_hf(
    ckpt: str | Path,
    out: str | Path,
    *,
    step: int | None = None,
    dtype: str | None = None,
    max_shard_size: int | str = "5GB",
    overwrite: bool = False,
    assets: str | Path | None = None,
    layout: str = "hf",
    progress: bool = True,
    allow_nonfinite: bool = False,
) -> io_utils.RunStats:
    """Export an Orbax checkpoint (converted, or a training run's latest / `step`) to HF.

    `layout` (LAYOUTS_OUT): "hf" what the installed transformers writes, "hf_legacy" the
    llava-hf hub names, "original" a haotian-liu / LLaVA-VL checkpoint (flat config.json,
    `model.*` names, the tower as its own model in ORIGINAL_TOWER_DIR, as released
    original checkpoints take theirs from `mm_vision_tower`).
    `dtype` casts the tensors (default: the stored dtype; training stores fp32).
    `assets`: a directory to take tokenizer/processor files from instead of the
    checkpoint's own `assets/`. Raises one CheckpointError listing every problem
    before writing anything; a tensor with NaN / inf or with values `dtype` cannot hold
    is one too, naming each, and nothing appears at `out` (`allow_nonfinite`: a warning
    each, `numerics.NumberCheck`).
    """
    ckpt, out = Path(ckpt).absolute(), Path(out).absolute()
    stats = io_utils.RunStats("orbax-to-hf")
    problems = io_utils.output_problems(out, overwrite, [ckpt])
    if dtype is not None and dtype not in DTYPES:
        problems.append(f"--dtype {dtype!r} not in {DTYPES}")
    if layout not in LAYOUTS_OUT:
        problems.append(f"--layout {layout!r} not in {LAYOUTS_OUT}")
    try:
        _parse_size(max_shard_size)
    except ValueError as e:
        problems.append(str(e))
    step_dir = cfg = meta = None
    try:
        step_dir = orbax_io.readable_step_dir(ckpt, step, finite=False)  # past corrupt steps
        meta = orbax_io.param_metadata(step_dir)
        cfg = orbax_io.read_config(step_dir, meta)
        problems += orbax_io.check_metadata(meta, cfg)
    except (CheckpointError, ValueError, FileNotFoundError) as e:
        problems.append(str(e))
    if assets is not None and not Path(assets).is_dir():
        problems.append(f"--assets {assets}: not a directory")
    io_utils.raise_if(problems, f"cannot export {ckpt}")
    assets = Path(assets) if assets is not None else orbax_io.find_assets(step_dir)

    entries = list(hf_entries(cfg, layout))
    out_dtype = {p: np.dtype(dtype or dt) for p, (_, dt) in meta.items()}
    plan = [
        (
            name,
            out_dtype[path],
            tf.hf_shape(meta[path][0][1:] if layer is not None else meta[path][0]),
        )
        for name, path, layer, tf in entries
    ]
    fill = unused_fill(cfg, layout, next(iter(out_dtype.values())))
    plan += [(name, x.dtype, x.shape) for name, x in fill.items()]
    check = numerics.NumberCheck(None, allow_nonfinite)
    with io_utils.atomic_output(out, overwrite) as tmp:
        tmp.mkdir()
        writer = _Writers(tmp, plan, max_shard_size, layout)
        try:
            with io_utils.progress(len(entries), "orbax-to-hf", progress) as bar:
                for path, group in itertools.groupby(entries, key=lambda e: e[1]):
                    leaf = orbax_io.restore_leaf(step_dir, path)  # stored dtype: checked,
                    for name, _, layer, tf in group:  # then cast per HF tensor
                        y = tf.to_hf(leaf if layer is None else leaf[layer])
                        check(name, y, out_dtype[path])
                        with np.errstate(over="ignore"):  # named by `check`
                            y = y.astype(out_dtype[path], copy=False)
                        writer.write(name, y)
                        stats.tensors += 1
                        stats.bytes += y.nbytes
                        bar.update(1)
                    del leaf
            for name, x in fill.items():
                writer.write(name, x)
                stats.tensors += 1
                stats.bytes += x.nbytes
        finally:
            writer.close_file()
        check.finish(f"cannot export {ckpt}")
        writer.write_index()
        dtypes = set(out_dtype.values())
        dt = dtypes.pop() if len(dtypes) == 1 else np.float32
        write_hf_metadata(tmp, cfg, dt, assets, layout)
    return stats.finish()


class _Writers:
    """One ShardWriter per output dir: the "original" layout's tower tensors go to
    ORIGINAL_TOWER_DIR under the tower model's own names (`vision_model.*`)."""

    def __init__(self, out: Path, plan, max_shard_size, layout: str):
        self._tower = layout == "original"
        plans: dict[str, list] = {"main": [], "tower": []}
        for name, dt, shape in plan:
            where, local = self._route(name)
            plans[where].append((local, dt, shape))
        self.writers = {"main": ShardWriter(out, plans["main"], max_shard_size)}
        if plans["tower"]:
            sub = out / architectures.ORIGINAL_TOWER_DIR
            sub.mkdir()
            self.writers["tower"] = ShardWriter(sub, plans["tower"], max_shard_size)

    def _route(self, name: str) -> tuple[str, str]:
        if self._tower and name.startswith(ORIGINAL_TOWER_PREFIX):
            return "tower", name[len(ORIGINAL_TOWER_PREFIX) :]
        return "main", name

    def write(self, name: str, x: np.ndarray) -> None:
        where, local = self._route(name)
        self.writers[where].write(local, x)

    def close_file(self) -> None:
        for w in self.writers.values():
            w.close_file()

    def write_index(self) -> None:
        for w in self.writers.values():
            w.write_index()
