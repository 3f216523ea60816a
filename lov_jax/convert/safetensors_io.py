"""Lazy safetensors reading (single file or sharded dir), writing, and HF checkpoint load.

We parse the safetensors header ourselves and memory-map the data: safetensors'
numpy backend (0.8) cannot return bfloat16, and every hub OV checkpoint is 16-bit.
Format: u64-LE header length n, n bytes of JSON {name: {dtype, shape,
data_offsets: [begin, end]}, "__metadata__": {...}}, then the data block; offsets
are relative to the data block, little-endian, C order.
"""

from __future__ import annotations

import dataclasses
import json
import math
import mmap
import os
import re
import struct
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path

import ml_dtypes
import numpy as np

from lov_jax.config import ModelConfig
from lov_jax.convert.hf_keys import (
    CheckpointError,
    canonical_name,
    hf_to_params,
    llm_canonical_names,
)

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
_MAX_HEADER = 100 * 2**20

_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"),
    "U32": np.dtype("<u4"),
    "U16": np.dtype("<u2"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
_NAMES = {v: k for k, v in _DTYPES.items()}


class _File:
    """One .safetensors file: validated header, data memory-mapped on first access.

    With `keep_pages=False` each `get` first drops the pages of the tensor the same
    thread got before from this process (MADV_DONTNEED: harmless for a read-only file
    mapping, a later access faults them in again). Touched pages of a mapping count
    towards RSS for as long as it lives, which would double the peak of a
    whole-checkpoint conversion; a pread copy instead costs ~2x the time here.
    """

    def __init__(self, path: Path, keep_pages: bool = True):
        self.path = path
        self.keep_pages = keep_pages
        self._last = threading.local()  # .span: (offset, length) of this thread's last get
        try:
            size = path.stat().st_size
            with open(path, "rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    raise CheckpointError(f"{path}: truncated ({size} bytes, no header)")
                (n,) = struct.unpack("<Q", head)
                if n > min(_MAX_HEADER, size - 8):
                    raise CheckpointError(f"{path}: header length {n} exceeds file size {size}")
                header = json.loads(f.read(n))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path}: cannot read safetensors header: {e}") from e
        header.pop("__metadata__", None)
        self.start, data_size = 8 + n, size - 8 - n
        self.entries: dict[str, tuple[np.dtype, tuple[int, ...], int]] = {}
        problems = []
        for name, e in header.items():
            try:
                dtype, shape, (begin, end) = (
                    _DTYPES[e["dtype"]],
                    tuple(e["shape"]),
                    e["data_offsets"],
                )
            except (KeyError, TypeError, ValueError) as err:
                problems.append(f"{name!r}: bad header entry {e!r} ({err!r})")
                continue
            if end - begin != math.prod(shape) * dtype.itemsize:
                problems.append(f"{name!r}: {e['dtype']}{list(shape)} needs {end - begin} bytes")
            elif end > data_size:
                problems.append(f"{name!r}: ends at byte {end} but data block has {data_size}")
            else:
                self.entries[name] = (dtype, shape, begin)
        if problems:
            raise CheckpointError(f"{path}: truncated or corrupt:\n  " + "\n  ".join(problems))
        self._mm: mmap.mmap | None = None
        self._open_lock = threading.Lock()

    def get(self, name: str) -> np.ndarray:
        dtype, shape, begin = self.entries[name]
        with self._open_lock:
            if self._mm is None:
                with open(self.path, "rb") as f:
                    self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        count = math.prod(shape)
        if not self.keep_pages:
            last = getattr(self._last, "span", None)
            if last is not None:
                self._mm.madvise(mmap.MADV_DONTNEED, *last)
            lo = (self.start + begin) // mmap.PAGESIZE * mmap.PAGESIZE
            hi = self.start + begin + count * dtype.itemsize
            self._last.span = (lo, hi - lo) if hi > lo else None
        x = np.frombuffer(self._mm, dtype=dtype, count=count, offset=self.start + begin)
        return x.reshape(shape)  # read-only view of the mapped file


class SafetensorsCheckpoint(Mapping):
    """Lazy {tensor name: read-only np.ndarray} over one or more safetensors files."""

    def __init__(self, files: Mapping[str, _File], stored: Mapping[str, str] | None = None):
        self._where = files
        self._stored = stored or {}  # our name -> the name in its file (see `renamed`)

    def _key(self, name: str) -> str:
        return self._stored.get(name, name)

    def __getitem__(self, name: str) -> np.ndarray:
        return self._where[name].get(self._key(name))

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._where[name].entries[self._key(name)][1]

    def dtype(self, name: str) -> np.dtype:
        return self._where[name].entries[self._key(name)][0]

    def file_of(self, name: str) -> Path:
        return self._where[name].path

    def merged(self, other: SafetensorsCheckpoint, prefix: str) -> SafetensorsCheckpoint:
        """This checkpoint plus `other`'s tensors named `prefix + name`."""
        where, stored = dict(self._where), dict(self._stored)
        for name in other:
            where[prefix + name] = other._where[name]
            stored[prefix + name] = other._key(name)
        return SafetensorsCheckpoint(where, stored)


def read_safetensors(path: str | os.PathLike, *, keep_pages: bool = True) -> SafetensorsCheckpoint:
    """A `.safetensors` file, or a dir holding `model.safetensors.index.json` or one file.

    Every shard's header is checked before raising, so one error lists all bad files.
    `keep_pages=False`: only the latest tensor read stays resident (see `_File`).
    """
    path = Path(path)
    if path.is_file():
        f = _File(path, keep_pages)
        return SafetensorsCheckpoint({name: f for name in f.entries})
    index = path / INDEX_NAME
    if index.is_file():
        try:
            weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        except (OSError, KeyError, TypeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{index}: not a safetensors index ({e!r})") from e
        shards = sorted(set(weight_map.values()))
        missing = [s for s in shards if not (path / s).is_file()]
        if missing:
            raise CheckpointError(f"{index} names shards that do not exist: {missing}")
        opened, problems = {}, []
        for s in shards:
            try:
                opened[s] = _File(path / s, keep_pages)
            except CheckpointError as e:
                problems.append(str(e))
        if problems:
            raise CheckpointError("\n".join(problems))
        absent = [f"{k!r} (in {s})" for k, s in weight_map.items() if k not in opened[s].entries]
        if absent:
            raise CheckpointError(f"{index}: tensors missing from their shard: {absent}")
        return SafetensorsCheckpoint({k: opened[s] for k, s in weight_map.items()})
    if (path / SINGLE_NAME).is_file():
        return read_safetensors(path / SINGLE_NAME, keep_pages=keep_pages)
    pickles = sorted(p.name for p in path.glob("pytorch_model*.bin"))
    if pickles:  # e.g. the released liuhaotian LLaVA-1.5 checkpoints
        raise CheckpointError(
            f"{path}: no {SINGLE_NAME} or {INDEX_NAME}, only PyTorch pickles {pickles}: "
            "re-save them as safetensors (safetensors.torch.save_file per shard, or "
            "transformers' save_pretrained) first; pickles are never loaded here"
        )
    raise CheckpointError(f"{path}: no {SINGLE_NAME} or {INDEX_NAME}")


def _parse_size(size: int | str) -> int:
    """Bytes from an int or "100KB" / "5GB" (decimal) / "2GiB" (binary), as transformers."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)B\s*", size.upper().replace("IB", "iB"))
    if not m:
        raise ValueError(f"cannot parse size {size!r}")
    base = 1024 if m.group(3) else 1000
    return int(float(m.group(1)) * base ** " KMGT".index(m.group(2) or " "))


def write_safetensors(
    tensors: Mapping[str, np.ndarray], out_dir: str | os.PathLike, max_shard_size: int | str = "5GB"
) -> list[Path]:
    """Write HF-style `model.safetensors`, or shards plus `model.safetensors.index.json`.

    Tensors are packed in the given order; a tensor larger than `max_shard_size`
    gets a shard of its own. Returns the written files.
    """
    from safetensors.numpy import save_file

    limit = _parse_size(max_shard_size)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    shards: list[dict[str, np.ndarray]] = [{}]
    used = 0
    for name, x in tensors.items():
        x = np.ascontiguousarray(x)
        if x.dtype not in _NAMES:
            raise ValueError(f"{name!r}: dtype {x.dtype} has no safetensors equivalent")
        if shards[-1] and used + x.nbytes > limit:
            shards.append({})
            used = 0
        shards[-1][name] = x
        used += x.nbytes
    for stale in [out_dir / INDEX_NAME, *out_dir.glob("model*.safetensors")]:
        stale.unlink(missing_ok=True)  # never leave a mix of old and new shards
    names = (
        [SINGLE_NAME]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    for shard, fname in zip(shards, names, strict=True):
        save_file(shard, str(out_dir / fname), metadata={"format": "pt"})
    if len(shards) > 1:
        index = {
            "metadata": {"total_size": sum(x.nbytes for s in shards for x in s.values())},
            "weight_map": {k: f for s, f in zip(shards, names, strict=True) for k in s},
        }
        (out_dir / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return [out_dir / f for f in names]


# Where an original LLaVA checkpoint's tower tensors are named when they come from the
# `mm_vision_tower` dir (a CLIPVisionModel's `vision_model.*` / `embeddings.*` names).
ORIGINAL_TOWER_PREFIX = "model.vision_tower.vision_tower."


def read_hf_dir(
    hf_dir: str | os.PathLike, *, keep_pages: bool = True
) -> tuple[dict, SafetensorsCheckpoint, int]:
    """(config.json dict, lazy tensors, the checkpoint's tower depth) of an HF or original
    LLaVA dir; reads headers only.

    An original (haotian-liu) checkpoint usually holds no tower weights: its code loads
    them from `mm_vision_tower` (lov_jax/architectures.py); when that names a local dir,
    its safetensors are read here as the tower's."""
    from lov_jax import architectures

    hf_dir = Path(hf_dir)
    path = hf_dir / "config.json"
    try:
        hf_cfg = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: cannot read ({e})") from e
    tensors = read_safetensors(hf_dir, keep_pages=keep_pages)
    try:
        depth = architectures.tower_layers(hf_cfg, hf_dir)
        if architectures.is_original(hf_cfg):
            _, tower_dir = architectures.tower_config(hf_cfg["mm_vision_tower"], hf_dir, str(path))
            has_tower = any((canonical_name(k) or "").startswith("vision.") for k in tensors)
            if not has_tower and tower_dir is None:
                raise CheckpointError(
                    f"{path}: the checkpoint holds no vision tower weights and mm_vision_tower "
                    f"{hf_cfg['mm_vision_tower']!r} is no local directory (the original code "
                    "downloads it): save that tower there (CLIPVisionModel.save_pretrained) "
                    "and set mm_vision_tower to its path"
                )
            if not has_tower:
                tower = read_safetensors(tower_dir, keep_pages=keep_pages)
                tensors = tensors.merged(tower, ORIGINAL_TOWER_PREFIX)
    except ValueError as e:
        raise CheckpointError(str(e)) from e
    return hf_cfg, tensors, depth


def hf_model_config(hf_cfg: dict, tensors: SafetensorsCheckpoint, hf_dir: Path) -> ModelConfig:
    """ModelConfig from a config.json dict, with vocab size and tying read off the tensors
    and the special ids from the directory's files (`lov_jax.token_ids.read_token_ids`).

    `text.vocab_size` comes from the embedding tensor, not config.json (the lmms-lab
    7B config lacks it, docs/reference.md 1.3). When config.json has no tie flag, the
    model is tied iff the checkpoint has no lm_head tensor.
    """
    from lov_jax import architectures
    from lov_jax.token_ids import TokenIdError, read_token_ids

    cfg = architectures.from_hf_config(hf_cfg, checkpoint_dir=hf_dir)
    head_name, embed_name = llm_canonical_names(cfg)
    canon = {canonical_name(k): k for k in tensors}
    text_over = {}
    embed = canon.get(embed_name)
    if embed is not None:
        text_over["vocab_size"] = tensors.shape(embed)[0]
    flags = hf_cfg if architectures.is_original(hf_cfg) else hf_cfg.get("text_config", {})
    if "tie_word_embeddings" not in flags:
        text_over["tie_word_embeddings"] = head_name not in canon
    text = dataclasses.replace(cfg.text, **text_over)
    try:
        ids = read_token_ids(
            hf_dir, hf_cfg, load_checkpoint_tokenizer(hf_dir), vocab_size=text.vocab_size
        )
    except TokenIdError as e:
        if not architectures.is_original(hf_cfg) or "image" not in str(e):
            raise
        raise TokenIdError(
            f"{e}. Original LLaVA code marks images with the out-of-vocabulary id -200 "
            "(IMAGE_TOKEN_INDEX) and its tokenizer has no '<image>': add an '<image>' token "
            "to tokenizer.json with an id inside the embedding table (llava-hf's converter "
            "appends it and pads the table)"
        ) from e
    return cfg.replace(text=text, token_ids=ids)


def load_checkpoint_tokenizer(directory: str | os.PathLike):
    """The `tokenizers.Tokenizer` of a checkpoint dir's tokenizer.json, or None."""
    from data_pipelines.tokenizer import load_tokenizer

    path = Path(directory) / "tokenizer.json"
    return load_tokenizer(path) if path.is_file() else None


def load_hf_checkpoint(
    hf_dir: str | os.PathLike, dtype: str | np.dtype | None = None, *, keep_pages: bool = True
) -> tuple[ModelConfig, dict]:
    """HF or original LLaVA dir (config.json + safetensors) -> (ModelConfig, numpy params)."""
    hf_dir = Path(hf_dir)
    hf_cfg, tensors, depth = read_hf_dir(hf_dir, keep_pages=keep_pages)
    cfg = hf_model_config(hf_cfg, tensors, hf_dir)
    return cfg, hf_to_params(tensors, cfg, dtype=dtype, tower_layers=depth)
