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
import difflib
import glob
import json
import logging
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
# A record a source could not read (a malformed jsonl line under policy "skip"): its
# value is the message; loader.ProcessFn counts it as `skip/malformed_record`.
ERROR_KEY = "_error"

log = logging.getLogger(__name__)


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


def _bad_line(path: str, line: int, why: str, on_error: str) -> dict:
    """A malformed line: one error naming file:line, or (policy "skip") a placeholder
    record the loader counts as `skip/malformed_record` (loader.ProcessFn)."""
    message = f"{path}:{line}: {why}"
    if on_error == "raise":
        raise ValueError(message)
    return {ERROR_KEY: message}


def read_json_records(path: str | Path, on_error: str = "raise") -> list[dict]:
    """A json list (or a single object) or jsonl file -> list of dicts.

    A jsonl line that is not JSON or not an object: on_error "raise" is one ValueError
    naming file:line; "skip" keeps a placeholder (`ERROR_KEY`) in its place, so the
    loader counts it under `skip/malformed_record` and every other line keeps its index.
    A .json file that does not parse is one error naming file:line:column."""
    if on_error not in ("skip", "raise"):
        raise ValueError(f"on_error {on_error!r} not in ('skip', 'raise')")
    path = str(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"data file not found: {path}")
    records: list[dict] = []
    with open(path, encoding="utf-8") as f:
        if path.endswith(".jsonl"):
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    why = f"invalid JSON ({err.msg}, column {err.colno})"
                    records.append(_bad_line(path, line_no, why, on_error))
                    continue
                if not isinstance(record, dict):
                    why = f"a JSON {type(record).__name__}, not an object"
                    record = _bad_line(path, line_no, why, on_error)
                records.append(record)
            bad = [r[ERROR_KEY] for r in records if ERROR_KEY in r]
            if bad:
                log.warning("%d malformed line(s) will be skipped, first: %s", len(bad), bad[0])
            return records
        try:
            data = json.load(f)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{err.lineno}:{err.colno}: invalid JSON ({err.msg})") from None
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
        on_error: str = "raise",
    ):
        paths = [path] if isinstance(path, (str, Path)) else list(path)
        files = [f for p in paths for f in expand_braces(str(p))]
        self.records: list[dict] = []
        self.origin: list[tuple[str, int]] = []
        for f in files:
            recs = read_json_records(f, on_error)
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


PATH_KEYS = ("json_path", "parquet_path", "array_record_path")
ENTRY_KEYS = (*PATH_KEYS, "sampling_strategy", "weight", "image_folder", "video_folder")


def _unknown(what: str, key: Any, known: Sequence[str]) -> str:
    close = difflib.get_close_matches(str(key), known, n=1, cutoff=0.6)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"unknown {what} {key!r}{hint}; known: {', '.join(known)}"


def _check_entry(entry: Any, where: str) -> str:
    """Validate one `datasets` entry up front; returns its path key."""
    if not isinstance(entry, dict):
        raise ValueError(f"{where}: expected a mapping with json_path, got {entry!r}")
    for key in entry:
        if key not in ENTRY_KEYS:
            raise ValueError(f"{where}: {_unknown('key', key, ENTRY_KEYS)}")
    given = [k for k in PATH_KEYS if k in entry]
    if len(given) != 1:
        raise ValueError(f"{where}: give exactly one of {', '.join(PATH_KEYS)} (got {given})")
    key = given[0]
    if not isinstance(entry[key], str) or not entry[key]:
        raise ValueError(f"{where}: {key} must be a path string, got {entry[key]!r}")
    for name in ("image_folder", "video_folder"):
        if name in entry and not isinstance(entry[name], str):
            raise ValueError(f"{where}: {name} must be a path string, got {entry[name]!r}")
    weight = entry.get("weight")
    if "weight" in entry and (
        isinstance(weight, bool) or not isinstance(weight, int | float) or weight < 0
    ):
        raise ValueError(f"{where}: weight must be a number >= 0, got {weight!r}")
    strategy = entry.get("sampling_strategy", "all")
    try:
        apply_sampling_strategy(1, strategy)
    except (ValueError, TypeError, AttributeError):
        raise ValueError(
            f"{where}: sampling_strategy {strategy!r} is not all | first:N | end:N | "
            "random:N (N an int or P%)"
        ) from None
    if key == "json_path":
        for f in expand_braces(entry[key]):
            if not os.path.isfile(f):
                raise FileNotFoundError(f"{where}: json_path file not found: {f}")
    return key


def load_yaml_mixture(
    path: str | Path,
    image_folder: str | None = None,
    video_folder: str | None = None,
    seed: int = 0,
    on_error: str = "raise",
) -> Mixture:
    """LLaVA-NeXT data yaml: `datasets: [{json_path, sampling_strategy}]`.

    Optional per-entry keys (extensions): `weight`, `image_folder`, `video_folder`
    (override the arguments), and `parquet_path` / `array_record_path` instead of
    `json_path`. Relative paths in the yaml are taken as written (orig), i.e. relative
    to the working directory. Either every entry has a weight or none. Every entry is
    checked before any is read: an unknown key (`ENTRY_KEYS`), a bad value or a missing
    file is one error naming the yaml, the entry and the field. `on_error`: jsonl lines
    (read_json_records).
    """
    import yaml

    if not os.path.isfile(path):
        raise FileNotFoundError(f"data yaml not found: {path}")
    with open(path, encoding="utf-8") as f:
        try:
            spec = yaml.safe_load(f)
        except yaml.YAMLError as err:
            raise ValueError(f"{path}: not valid YAML ({err})") from None
    if isinstance(spec, dict):
        for key in spec:
            if key != "datasets":
                raise ValueError(f"{path}: {_unknown('top-level key', key, ('datasets',))}")
    entries = spec.get("datasets") if isinstance(spec, dict) else None
    if not entries or not isinstance(entries, list):
        raise ValueError(f"{path}: expected `datasets: [{{json_path, sampling_strategy}}, ...]`")
    where = [f"{path}: datasets[{k}]" for k in range(len(entries))]
    keys = [_check_entry(entry, w) for entry, w in zip(entries, where, strict=True)]
    given = ["weight" in entry for entry in entries]
    if any(given) and not all(given):
        raise ValueError(f"{path}: give a weight to every dataset entry or to none")
    sources, weights = [], []
    for k, (entry, key) in enumerate(zip(entries, keys, strict=True)):
        img = entry.get("image_folder", image_folder)
        vid = entry.get("video_folder", video_folder)
        strategy = entry.get("sampling_strategy", "all")
        try:
            if key == "json_path":
                src: RecordSource = JsonSource(
                    entry[key], img, vid, strategy, seed + k, on_error=on_error
                )
            elif key == "parquet_path":
                src = ParquetSource(entry[key], img, vid)
            else:
                src = ArrayRecordSource(entry[key], img, vid)
        except (OSError, ValueError) as err:
            cls = FileNotFoundError if isinstance(err, FileNotFoundError) else ValueError
            raise cls(f"{where[k]} ({key} {entry[key]}): {err}") from err
        if strategy not in (None, "all") and not isinstance(src, JsonSource):
            src = SubsetSource(src, apply_sampling_strategy(len(src), strategy, seed + k))
        sources.append(src)
        weights.append(entry.get("weight"))
    return Mixture(sources, [float(w) for w in weights] if all(given) else None)


def open_source(
    path: str | Path,
    image_folder: str | None = None,
    video_folder: str | None = None,
    seed: int = 0,
    on_error: str = "raise",
) -> RecordSource:
    """A `data_path` as orig takes it (json, jsonl, `{a,b}.json`, yaml) plus parquet and
    ArrayRecord files (`*.parquet`, `*.array_record*`, globs allowed for those).

    `on_error` is the loader's bad-input policy, applied to malformed jsonl lines."""
    p = str(path)
    if not p:
        raise ValueError("no data path given (data.train_path is empty)")
    if p.endswith((".yaml", ".yml")):
        return load_yaml_mixture(p, image_folder, video_folder, seed, on_error).source(seed)
    if p.endswith(".parquet") or (os.path.isdir(p) and glob.glob(os.path.join(p, "*.parquet"))):
        return ParquetSource(p, image_folder, video_folder)
    if ".array_record" in p:
        return ArrayRecordSource(p, image_folder, video_folder)
    return JsonSource(p, image_folder, video_folder, on_error=on_error)


def source_name(source: Any) -> str:
    """The file(s) a source reads, for messages."""
    if isinstance(source, JsonSource | TfdsSource):
        return source.name
    if isinstance(source, ParquetSource | ArrayRecordSource):
        return ",".join(source.files)
    if isinstance(source, ConcatSource | WeightedSource):
        return "+".join(source_name(s) for s in source.sources)
    if isinstance(source, SubsetSource):
        return source_name(source.source)
    name = getattr(source, "name", None)
    return name if isinstance(name, str) else f"an in-memory {type(source).__name__}"


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


# The record layouts a parquet may hold: LLaVA records, or DPO pairs (lov_jax/post/dpo.py).
PARQUET_LAYOUTS = (("conversations",), ("prompt", "chosen", "rejected"))


def _check_columns(file: str, columns: Sequence[str]) -> None:
    """A file-level error when no record layout's columns are all present (otherwise every
    row would be skipped as malformed)."""
    if any(all(c in columns for c in layout) for layout in PARQUET_LAYOUTS):
        return
    missing = [c for c in PARQUET_LAYOUTS[0] if c not in columns]
    raise ValueError(
        f"{file}: parquet has no column {', '.join(map(repr, missing))} (LLaVA records need "
        f"{list(PARQUET_LAYOUTS[0])}, DPO pairs {list(PARQUET_LAYOUTS[1])}); its columns: "
        f"{', '.join(columns) or 'none'}"
    )


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
            if not os.path.isfile(f):
                raise FileNotFoundError(f"parquet file not found: {f}")
            try:
                handle = pq.ParquetFile(f)
            except Exception as err:  # pyarrow's ArrowInvalid & co: not a parquet file
                raise ValueError(f"{f}: cannot read as parquet ({err})") from None
            _check_columns(f, handle.schema_arrow.names)
            meta = handle.metadata
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
        try:
            record = decode_record_bytes(self._source[index])
        except Exception as err:  # msgpack's errors: a damaged record is a counted skip
            where = f"{','.join(self.files)}[{index}]"
            return {ERROR_KEY: f"{where}: cannot decode record ({err})", INDEX_KEY: int(index)}
        if not isinstance(record, dict):
            where = f"{','.join(self.files)}[{index}]"
            return {ERROR_KEY: f"{where}: record is a {type(record).__name__}, not a map"}
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
            try:
                record["conversations"] = json.loads(record["conversations"])
            except json.JSONDecodeError as err:  # one bad example is a counted skip
                why = f"{self.name}[{index}]: conversations is not JSON ({err.msg})"
                return {ERROR_KEY: why, SOURCE_KEY: self.name, INDEX_KEY: int(index)}
        for key in ("image", "video"):
            if key in record and (record[key] is None or record[key] in (b"", "")):
                del record[key]
        record = resolve_media(record, self.image_folder, self.video_folder)
        record[SOURCE_KEY], record[INDEX_KEY] = self.name, int(index)
        return record
