"""Random-access record sources: LLaVA json/jsonl, data yaml mixtures, parquet, ArrayRecord.

Every source has `__len__` and `__getitem__(i) -> record dict` (Grain's
`RandomAccessDataSource` protocol; `grain.MapDataset.source(src)` takes it as is). A
record is the LLaVA layout (docs/reference.md 7.3):

    {"id": str, "image": ref | [ref, ...] (optional), "video": ref (optional),
     "conversations": [{"from": "human"|"gpt", "value": str}, ...]}

with media references resolved: relative paths are joined to the source's
`image_folder` / `video_folder` (orig `os.path.join(folder, file)`), embedded media
stay bytes or {bytes, path}. Sources add two bookkeeping keys, `_source` (file the
record came from) and `_index` (its position there), used in error messages.
"""

from __future__ import annotations

import bisect
import collections
import dataclasses
import glob
import json
import math
import os
import random
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

SOURCE_KEY = "_source"
INDEX_KEY = "_index"


class RecordSource(Protocol):
    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> dict: ...


def _resolve(ref: Any, folder: str | None) -> Any:
    if folder is None:
        return ref
    if isinstance(ref, str):
        return os.path.join(folder, ref)
    if isinstance(ref, list):
        return [_resolve(r, folder) for r in ref]
    if isinstance(ref, dict) and ref.get("bytes") is None and isinstance(ref.get("path"), str):
        return {**ref, "path": os.path.join(folder, ref["path"])}
    return ref


def resolve_media(record: dict, image_folder: str | None, video_folder: str | None) -> dict:
    """Shallow copy with `image` / `video` paths joined to their folders."""
    out = dict(record)
    if out.get("image") is not None:
        out["image"] = _resolve(out["image"], image_folder)
    if out.get("video") is not None:
        out["video"] = _resolve(out["video"], video_folder)
    return out


# ---- sampling strategies (LLaVA-NeXT data yaml) ------------------------------------------


def apply_sampling_strategy(n: int, strategy: str | None, seed: int = 0) -> np.ndarray:
    """Indices into n records for a LLaVA-NeXT `sampling_strategy`.

    "all" | "first:N" | "end:N" | "random:N", N an int or "P%" (ceil(P * n / 100), as
    orig). random:N = the first N of a shuffle seeded by `seed` (orig uses the unseeded
    global `random`); the shuffled order is kept, as orig.
    """
    if strategy is None or strategy == "all":
        return np.arange(n)
    kind, sep, number = strategy.partition(":")
    if not sep or kind not in ("first", "end", "random"):
        raise ValueError(f"unknown sampling_strategy {strategy!r}")
    number = number.strip()
    if number.endswith("%"):
        count = math.ceil(float(number[:-1]) * n / 100)
    else:
        count = int(number)
    count = max(0, min(count, n))
    if kind == "first":
        return np.arange(count)
    if kind == "end":
        return np.arange(n - count, n)
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return np.asarray(order[:count], dtype=np.int64)


# ---- json / jsonl ------------------------------------------------------------------------


def expand_braces(pattern: str) -> list[str]:
    """'data/{a,b}.json' -> ['data/a.json', 'data/b.json'] (orig `data_path` pattern)."""
    match = re.search(r"\{([^{}]*)\}", pattern)
    if match is None:
        return [pattern]
    head, tail = pattern[: match.start()], pattern[match.end() :]
    return [p for alt in match.group(1).split(",") for p in expand_braces(head + alt + tail)]


def read_json_records(path: str | Path) -> list[dict]:
    """A json list (or a single object) or jsonl file -> list of dicts."""
    path = str(path)
    with open(path, encoding="utf-8") as f:
        if path.endswith(".jsonl"):
            records = [json.loads(line) for line in f if line.strip()]
        else:
            data = json.load(f)
            records = data if isinstance(data, list) else [data]
    for i, r in enumerate(records):
        if not isinstance(r, dict):
            raise ValueError(f"{path}: record {i} is a {type(r).__name__}, not an object")
    return records


class JsonSource:
    """LLaVA records from json (a list) / jsonl files, optionally subsampled."""

    def __init__(
        self,
        path: str | Path | Sequence[str | Path],
        image_folder: str | None = None,
        video_folder: str | None = None,
        sampling_strategy: str | None = "all",
        seed: int = 0,
    ):
        paths = [path] if isinstance(path, (str, Path)) else list(path)
        files = [f for p in paths for f in expand_braces(str(p))]
        self.records: list[dict] = []
        self.origin: list[tuple[str, int]] = []
        for f in files:
            recs = read_json_records(f)
            self.records += recs
            self.origin += [(f, i) for i in range(len(recs))]
        self.indices = apply_sampling_strategy(len(self.records), sampling_strategy, seed)
        self.image_folder, self.video_folder = image_folder, video_folder
        self.name = ",".join(files)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> dict:
        j = int(self.indices[index])
        record = resolve_media(self.records[j], self.image_folder, self.video_folder)
        record[SOURCE_KEY], record[INDEX_KEY] = self.origin[j]
        return record

    def __repr__(self) -> str:
        return f"JsonSource({self.name!r}, {len(self)} records)"


# ---- combinations ------------------------------------------------------------------------


class ConcatSource:
    """Sources back to back (orig: all yaml entries' sampled records concatenated)."""

    def __init__(self, sources: Sequence[RecordSource]):
        self.sources = list(sources)
        self.offsets = np.cumsum([0] + [len(s) for s in self.sources]).tolist()

    def __len__(self) -> int:
        return self.offsets[-1]

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < len(self):
            raise IndexError(index)
        k = bisect.bisect_right(self.offsets, index) - 1
        return self.sources[k][index - self.offsets[k]]


class WeightedSource:
    """A fixed-length random-access mixture: position i draws source k with probability
    weights[k] (one seeded draw per position); source k's records are visited in a
    seeded permutation per pass, so a small source repeats and a large one is subsampled.

    num_records defaults to the total length of the sources.
    """

    def __init__(
        self,
        sources: Sequence[RecordSource],
        weights: Sequence[float],
        num_records: int | None = None,
        seed: int = 0,
    ):
        if len(sources) != len(weights) or not sources:
            raise ValueError("need one weight per source")
        w = np.asarray(weights, np.float64)
        if (w < 0).any() or w.sum() <= 0:
            raise ValueError(f"mixture weights must be >= 0 and not all 0, got {weights}")
        self.sources, self.seed = list(sources), seed
        for s, wk in zip(self.sources, w, strict=True):
            if wk > 0 and len(s) == 0:
                raise ValueError(f"source {s!r} is empty but has weight {wk}")
        n = sum(len(s) for s in self.sources) if num_records is None else num_records
        rng = np.random.default_rng(seed)
        self.choice = rng.choice(len(w), size=n, p=w / w.sum()).astype(np.int32)
        # rank of position i among the positions that drew the same source
        self.rank = np.zeros(n, np.int64)
        for k in range(len(w)):
            sel = self.choice == k
            self.rank[sel] = np.arange(int(sel.sum()))
        self._perms: dict[tuple[int, int], np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.choice)

    def _perm(self, k: int, epoch: int) -> np.ndarray:
        key = (k, epoch)
        if key not in self._perms:
            rng = np.random.default_rng([self.seed, k, epoch])
            self._perms[key] = rng.permutation(len(self.sources[k]))
            if len(self._perms) > 4 * len(self.sources):
                self._perms.pop(next(iter(self._perms)))
        return self._perms[key]

    def __getitem__(self, index: int) -> dict:
        k, r = int(self.choice[index]), int(self.rank[index])
        size = len(self.sources[k])
        return self.sources[k][int(self._perm(k, r // size)[r % size])]


@dataclasses.dataclass
class Mixture:
    """A data yaml: its sources (strategies applied) and optional per-source weights."""

    sources: list[RecordSource]
    weights: list[float] | None = None

    def concat(self) -> ConcatSource:
        return ConcatSource(self.sources)

    def weighted(self, num_records: int | None = None, seed: int = 0) -> WeightedSource:
        weights = self.weights or [float(len(s)) for s in self.sources]
        return WeightedSource(self.sources, weights, num_records, seed)

    def source(self, seed: int = 0) -> RecordSource:
        """Weighted if the yaml gave weights, else the orig concatenation."""
        return self.concat() if self.weights is None else self.weighted(seed=seed)


def load_yaml_mixture(
    path: str | Path,
    image_folder: str | None = None,
    video_folder: str | None = None,
    seed: int = 0,
) -> Mixture:
    """LLaVA-NeXT data yaml: `datasets: [{json_path, sampling_strategy}]`.

    Optional per-entry keys (extensions): `weight`, `image_folder`, `video_folder`
    (override the arguments), and `parquet_path` / `array_record_path` instead of
    `json_path`. Relative paths in the yaml are taken as written (orig), i.e. relative
    to the working directory. Either every entry has a weight or none.
    """
    import yaml

    with open(path, encoding="utf-8") as f:
        spec = yaml.safe_load(f)
    entries = spec.get("datasets") if isinstance(spec, dict) else None
    if not entries:
        raise ValueError(f"{path}: expected `datasets: [{{json_path, sampling_strategy}}, ...]`")
    sources, weights = [], []
    for k, entry in enumerate(entries):
        img = entry.get("image_folder", image_folder)
        vid = entry.get("video_folder", video_folder)
        strategy = entry.get("sampling_strategy", "all")
        if "json_path" in entry:
            src: RecordSource = JsonSource(entry["json_path"], img, vid, strategy, seed + k)
        elif "parquet_path" in entry:
            src = ParquetSource(entry["parquet_path"], img, vid)
        elif "array_record_path" in entry:
            src = ArrayRecordSource(entry["array_record_path"], img, vid)
        else:
            raise ValueError(f"{path}: dataset entry {k} has no json_path")
        if strategy not in (None, "all") and not isinstance(src, JsonSource):
            src = SubsetSource(src, apply_sampling_strategy(len(src), strategy, seed + k))
        sources.append(src)
        weights.append(entry.get("weight"))
    given = [w is not None for w in weights]
    if any(given) and not all(given):
        raise ValueError(f"{path}: give a weight to every dataset entry or to none")
    return Mixture(sources, [float(w) for w in weights] if all(given) else None)


def open_source(
    path: str | Path,
    image_folder: str | None = None,
    video_folder: str | None = None,
    seed: int = 0,
) -> RecordSource:
    """A `data_path` as orig takes it (json, jsonl, `{a,b}.json`, yaml) plus parquet and
    ArrayRecord files (`*.parquet`, `*.array_record*`, globs allowed for those)."""
    p = str(path)
    if p.endswith((".yaml", ".yml")):
        return load_yaml_mixture(p, image_folder, video_folder, seed).source(seed)
    if p.endswith(".parquet") or (os.path.isdir(p) and glob.glob(os.path.join(p, "*.parquet"))):
        return ParquetSource(p, image_folder, video_folder)
    if ".array_record" in p:
        return ArrayRecordSource(p, image_folder, video_folder)
    return JsonSource(p, image_folder, video_folder)


class SubsetSource:
    def __init__(self, source: RecordSource, indices: Sequence[int]):
        self.source, self.indices = source, np.asarray(indices, np.int64)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> dict:
        return self.source[int(self.indices[index])]


# ---- parquet (LLaVA-OneVision-Data release layout) ------------------------------------------


def _glob_files(path: str | Path | Sequence[str | Path], suffix: str) -> list[str]:
    paths = [path] if isinstance(path, (str, Path)) else list(path)
    files: list[str] = []
    for p in map(str, paths):
        if os.path.isdir(p):
            files += sorted(glob.glob(os.path.join(p, f"*{suffix}*")))
        elif any(c in p for c in "*?["):
            files += sorted(glob.glob(p))
        else:
            files.append(p)
    if not files:
        raise FileNotFoundError(f"no {suffix} files in {path}")
    return files


class ParquetSource:
    """Parquet with embedded images: columns `id`, `image` (struct {bytes, path} or
    binary; null for text-only), `conversations` (list of {from, value}); any other
    columns are passed through.

    Random access reads one row group and keeps the last `cache_row_groups` decoded;
    sequential-ish access (or a shuffle buffer) is cheap, fully random access over big
    files is not: convert those with `array_record_build`.
    """

    def __init__(
        self,
        path: str | Path | Sequence[str | Path],
        image_folder: str | None = None,
        video_folder: str | None = None,
        cache_row_groups: int = 2,
    ):
        import pyarrow.parquet as pq

        self.files = _glob_files(path, ".parquet")
        self.image_folder, self.video_folder = image_folder, video_folder
        self._groups: list[tuple[int, int]] = []  # (file index, row group)
        starts = [0]
        self._file_starts = []
        for fi, f in enumerate(self.files):
            self._file_starts.append(starts[-1])
            meta = pq.ParquetFile(f).metadata
            for g in range(meta.num_row_groups):
                self._groups.append((fi, g))
                starts.append(starts[-1] + meta.row_group(g).num_rows)
        self._starts = starts
        self._cache: collections.OrderedDict = collections.OrderedDict()
        self._cache_size = cache_row_groups
        self._handles: dict[int, Any] = {}

    def __len__(self) -> int:
        return self._starts[-1]

    def _row_group(self, gi: int):
        if gi in self._cache:
            self._cache.move_to_end(gi)
            return self._cache[gi]
        import pyarrow.parquet as pq

        fi, g = self._groups[gi]
        if fi not in self._handles:
            self._handles[fi] = pq.ParquetFile(self.files[fi])
        table = self._handles[fi].read_row_group(g)
        self._cache[gi] = table
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return table

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < len(self):
            raise IndexError(index)
        gi = bisect.bisect_right(self._starts, index) - 1
        row = index - self._starts[gi]
        record = self._row_group(gi).slice(row, 1).to_pylist()[0]
        for key in ("image", "video"):
            if key in record and record[key] is None:
                del record[key]
        record = resolve_media(record, self.image_folder, self.video_folder)
        fi = self._groups[gi][0]
        record[SOURCE_KEY], record[INDEX_KEY] = self.files[fi], index - self._file_starts[fi]
        return record

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_cache"], state["_handles"] = collections.OrderedDict(), {}
        return state


# ---- ArrayRecord ---------------------------------------------------------------------------


def decode_record_bytes(data: bytes) -> dict:
    """One serialized record (msgpack map, as `array_record_build` writes it)."""
    import msgpack

    return msgpack.unpackb(data, raw=False)


def encode_record_bytes(record: dict) -> bytes:
    import msgpack

    return msgpack.packb(record, use_bin_type=True)


class ArrayRecordSource:
    """ArrayRecord shards written by `array_record_build` (msgpack records with media
    bytes embedded), read with `array_record`'s `ArrayRecordDataSource`."""

    def __init__(
        self,
        path: str | Path | Sequence[str | Path],
        image_folder: str | None = None,
        video_folder: str | None = None,
    ):
        from array_record.python.array_record_data_source import ArrayRecordDataSource

        self.files = _glob_files(path, ".array_record")
        self.image_folder, self.video_folder = image_folder, video_folder
        self._source = ArrayRecordDataSource(self.files)

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> dict:
        record = decode_record_bytes(self._source[index])
        record = resolve_media(record, self.image_folder, self.video_folder)
        record.setdefault(SOURCE_KEY, ",".join(self.files))
        record.setdefault(INDEX_KEY, int(index))
        return record


class TfdsSource:
    """A TFDS dataset prepared with `file_format="array_record"`, via `tfds.data_source`
    (tensorflow-datasets 4.9.10 reads it without TensorFlow, as long as its features
    decode without TF: Text / Tensor / bytes; declare images as bytes, not
    `tfds.features.Image`).

    Feature values become a LLaVA record: bytes of text fields are decoded to str
    (`text_keys`), a `conversations` given as json text is parsed; image bytes stay
    bytes. `field_map` renames features (e.g. {"image_bytes": "image"}).
    """

    def __init__(
        self,
        name: str,
        split: str = "train",
        data_dir: str | None = None,
        field_map: dict[str, str] | None = None,
        text_keys: Sequence[str] = ("id", "conversations"),
        image_folder: str | None = None,
        video_folder: str | None = None,
    ):
        import tensorflow_datasets as tfds

        self.name = f"tfds:{name}/{split}"
        self._source = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
        self.field_map = dict(field_map or {})
        self.text_keys = tuple(text_keys)
        self.image_folder, self.video_folder = image_folder, video_folder

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> dict:
        example = self._source[index]
        record: dict[str, Any] = {}
        for key, value in example.items():
            key = self.field_map.get(key, key)
            if isinstance(value, np.ndarray) and value.dtype == object:
                value = value.tolist()
            if key in self.text_keys and isinstance(value, bytes):
                value = value.decode("utf-8")
            record[key] = value
        if isinstance(record.get("conversations"), str):
            record["conversations"] = json.loads(record["conversations"])
        for key in ("image", "video"):
            if key in record and (record[key] is None or record[key] in (b"", "")):
                del record[key]
        record = resolve_media(record, self.image_folder, self.video_folder)
        record[SOURCE_KEY], record[INDEX_KEY] = self.name, int(index)
        return record
