"""Build ArrayRecord shards from any record source (`lov-jax data build`).

Each record is one msgpack map: the LLaVA record with media references replaced by
their bytes (`media.embed_media`: an image or video file -> {bytes, path}, a frame
folder -> {frames: [{bytes, path}, ...], path}); `_source` / `_index` keep the
record's original file and position for error messages. `sources.ArrayRecordSource`
reads the shards back with random access, no media folders needed.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path

from data_pipelines import media
from data_pipelines.sources import RecordSource, encode_record_bytes

log = logging.getLogger(__name__)


@dataclasses.dataclass
class BuildReport:
    files: list[str]
    num_records: int
    num_bytes: int
    missing_media: int  # references left as paths because the file was missing


def shard_paths(out_dir: str | Path, name: str, num_shards: int) -> list[str]:
    return [
        os.path.join(str(out_dir), f"{name}.array_record-{k:05d}-of-{num_shards:05d}")
        for k in range(num_shards)
    ]


def _missing(ref) -> int:
    if isinstance(ref, (str, Path)):
        return 1
    if isinstance(ref, list):
        return sum(_missing(r) for r in ref)
    if isinstance(ref, dict) and "frames" in ref:
        return sum(_missing(r) for r in ref["frames"])
    return 0


def build_array_record(
    source: RecordSource,
    out_dir: str | Path,
    name: str = "data",
    num_shards: int | None = None,
    records_per_shard: int = 4096,
    group_size: int = 1,
) -> BuildReport:
    """Write `source` (in its order) as contiguous ArrayRecord shards.

    `group_size=1` makes every record individually seekable (random access). Missing
    media stay path references, so the reader reports them as `missing_image`/`_video`
    under the same bad-input policy.
    """
    from array_record.python.array_record_module import ArrayRecordWriter

    n = len(source)
    if num_shards is None:
        num_shards = max(1, -(-n // records_per_shard))
    os.makedirs(out_dir, exist_ok=True)
    files = shard_paths(out_dir, name, num_shards)
    bounds = [n * k // num_shards for k in range(num_shards + 1)]
    total_bytes = missing = 0
    for k, path in enumerate(files):
        writer = ArrayRecordWriter(path, f"group_size:{group_size}")
        try:
            for i in range(bounds[k], bounds[k + 1]):
                record = dict(source[i])
                for key in ("image", "video"):
                    if record.get(key) is not None:
                        record[key] = media.embed_media(record[key])
                        missing += _missing(record[key])
                data = encode_record_bytes(record)
                total_bytes += len(data)
                writer.write(data)
        finally:
            writer.close()
    log.info(
        "wrote %d records (%d bytes) to %d shard(s) in %s", n, total_bytes, num_shards, out_dir
    )
    return BuildReport(files, n, total_bytes, missing)
