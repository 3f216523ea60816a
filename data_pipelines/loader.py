"""Grain pipeline: records -> Samples (worker processes) -> packed rows -> host batches.

    MapDataset.source(records)            random access, any `len`/`__getitem__` source
      .shuffle(seed)                      global permutation, reseeded every epoch
      [process_index::process_count]      this JAX process's shard (disjoint, covers all)
      .repeat(num_epochs)                 None = forever
      .map(ProcessFn(process))            record -> Sample | Skipped   (decode, template)
      .to_iter_dataset(ReadOptions)       element k of the stream is map_ds[k]
      .mp_prefetch(num_workers)           worker w decodes k = w, w + W, ...; order kept
    PackedBatchIterDataset                main process: balanced greedy packing + batching

Every batch is a dict of numpy arrays in the contract's fixed shapes (docs/design.md 2):
tokens/targets int32[B, L], loss_mask float32[B, L], segment_ids/positions int32[B, L],
pixels uint8[B, N, 384, 384, 3], vis_idx int32[B, L, 4], vis_w float32[B, L, 4].

Packing runs after `mp_prefetch` so the output does not depend on the number of workers.
Iterator state (JSON): the parent's Grain state, the stream index of the next element
and the stream indices of the samples waiting in the packer's window, plus the stats.
On restore the waiting samples are re-made by random access (`map_ds[k]`, at most
`window` of them), so a resumed iterator yields exactly the batches the uninterrupted
one would have. Orbax: `grain.checkpoint.CheckpointSave(it)` / `CheckpointRestore(it)`
(or `save_state` / `restore_state` below); the training loop may equally store
`it.get_state()` as JSON.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import grain
import numpy as np

from data_pipelines.packing import PackConfig, Packer, PackStats, empty_rows, write_row
from data_pipelines.sample import POLICIES, BadSample, Reason, Sample
from data_pipelines.sources import ERROR_KEY
from data_pipelines.workers import die_with_parent
from lov_jax.config import ModelConfig

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class LoaderConfig:
    """Host batch shape, shuffling and worker settings.

    batch_size: B rows per host batch. max_tokens / max_crops: L / N per row.
    num_epochs: None repeats forever. num_workers: decoding processes (0 = in-process).
    read_threads / read_buffer: threads and buffered samples per worker (or in-process).
    on_error: a `sample.POLICIES` name: "skip" (drop, count `skip/<reason>`) or "raise".
    drop_remainder: at the end of a finite stream, drop a partial batch instead of
    completing it with empty rows.
    """

    batch_size: int
    max_tokens: int
    max_crops: int
    seed: int = 0
    shuffle: bool = True
    num_epochs: int | None = 1
    window: int = 128
    balance: float = 2.0
    pad_id: int = 0
    num_workers: int = 0
    worker_buffer_size: int = 2
    read_threads: int = 2
    read_buffer: int = 16
    on_error: str = "skip"
    drop_remainder: bool = False
    log_first_skips: int = 5

    def __post_init__(self):
        if self.on_error not in POLICIES:
            raise ValueError(f"loader on_error={self.on_error!r}: not in {POLICIES}")
        for name, low in (("batch_size", 1), ("max_tokens", 2), ("max_crops", 0), ("window", 1),
                          ("num_workers", 0), ("worker_buffer_size", 1), ("read_threads", 1),
                          ("read_buffer", 1)):  # fmt: skip
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"loader {name}={value!r}: must be an int >= {low}")
        if self.num_epochs is not None and self.num_epochs < 1:
            raise ValueError(f"loader num_epochs={self.num_epochs!r}: >= 1 or None (forever)")

    @property
    def pack(self) -> PackConfig:
        return PackConfig(self.max_tokens, self.max_crops, self.window, self.balance, self.pad_id)


@dataclasses.dataclass(frozen=True)
class Skipped:
    """What a bad record becomes in the stream (counted by the packing iterator)."""

    reason: Reason
    message: str


class ProcessFn:
    """record -> Sample | Skipped: the one place the bad-input policy is applied.

    Under "raise" the BadSample itself propagates (its message names the record).
    Picklable as long as `fn` is (it runs in the workers).
    """

    def __init__(self, fn: Callable[[Any], Sample], on_error: str = "skip"):
        self.fn, self.on_error = fn, on_error

    def __call__(self, record: Any) -> Sample | Skipped:
        try:
            if isinstance(record, dict) and ERROR_KEY in record:  # a line the source could not read
                raise BadSample(Reason.MALFORMED_RECORD, f"malformed_record: {record[ERROR_KEY]}")
            return self.fn(record)
        except BadSample as err:
            if self.on_error == "raise":
                raise
            return Skipped(err.reason, str(err))


class NoSamplesError(ValueError):
    """A whole pass over the data gave no usable sample (every record skipped or too big):
    training on it would loop forever on nothing. The message holds the skip table (a
    ValueError: the message is the whole story, as for other bad inputs)."""


class PackedBatchIterator(grain.DatasetIterator):
    """Pulls Samples from the parent, packs rows, emits batches of B rows.

    `epoch_size` (elements per pass of this shard): once that many have been pulled with
    none usable, `NoSamplesError` with the skip table (never an endless loop)."""

    def __init__(
        self,
        parent: grain.DatasetIterator,
        lookup: Callable[[int], Any] | None,
        cfg: ModelConfig,
        loader: LoaderConfig,
        epoch_size: int | None = None,
        name: str = "",
    ):
        super().__init__(parent)
        self._lookup, self._cfg, self._loader = lookup, cfg, loader
        self._epoch_size, self._name = epoch_size, name
        self._pack = loader.pack
        self._packer = Packer(self._pack)
        self._next_index = 0  # stream index of the next parent element
        self._exhausted = False
        self._first: dict[str, str] = {}  # reason -> first message (for NoSamplesError)

    @property
    def pack_stats(self) -> PackStats:
        return self._packer.stats

    def stats(self) -> dict[str, Any]:
        """Budget fill and skip counters (`skip/<reason>`), for logs."""
        return self._packer.stats.to_dict()

    def _pull(self) -> None:
        try:
            element = next(self._parent)
        except StopIteration:
            self._exhausted = True
            return
        key = self._next_index
        self._next_index += 1
        stats = self._packer.stats
        stats.samples_in += 1
        if isinstance(element, Skipped):
            stats.count_skip(element.reason)
            self._first.setdefault(element.reason, element.message)
            if stats.skipped[element.reason] <= self._loader.log_first_skips:
                log.warning("skipping sample: %s", element.message)
        else:
            reason = self._packer.add(element, key)
            if reason is not None:
                self._first.setdefault(
                    reason, f"sample {element.id} ({element.source}): {element.num_tokens} "
                    f"tokens, {element.num_crops} crops",
                )  # fmt: skip
            if reason is not None and stats.skipped[reason] <= self._loader.log_first_skips:
                log.warning(
                    "dropping sample %s: %s (%d tokens, %d crops; budgets L=%d, N=%d)",
                    element.id, reason, element.num_tokens, element.num_crops,
                    self._pack.max_tokens, self._pack.max_crops,
                )  # fmt: skip
        self._check_alive()

    def _check_alive(self) -> None:
        stats, size = self._packer.stats, self._epoch_size
        usable = stats.samples_in - sum(stats.skipped.values())
        if size is None or usable > 0 or stats.samples_in < size:
            return
        table = "; ".join(
            f"{reason} {n} (first: {self._first.get(reason, 'before a restore')})"
            for reason, n in sorted(stats.skipped.items())
        )
        raise NoSamplesError(
            f"no usable sample in a whole pass over the {size} records of "
            f"{self._name or 'the data'} (row budgets L={self._pack.max_tokens} tokens, "
            f"N={self._pack.max_crops} crops); skipped: {table}"
        )

    def __next__(self) -> dict[str, np.ndarray]:
        b = self._loader.batch_size
        rows: list[list[Sample]] = []
        while len(rows) < b:
            row = self._packer.next_row(flush=self._exhausted)
            if row is not None:
                rows.append([s for _, s in row])
            elif self._exhausted:
                break
            else:
                self._pull()
        if not rows or (len(rows) < b and self._loader.drop_remainder):
            raise StopIteration
        out = empty_rows(b, self._pack, self._cfg)
        for i, row in enumerate(rows):
            t, c = write_row(out, i, row, self._pack, self._cfg)
            self._packer.stats.count_row(t, c, len(row))
        self._packer.stats.rows += b - len(rows)  # empty rows completing the last batch
        return out

    def get_state(self) -> dict[str, Any]:
        return {
            "parent": self._parent.get_state(),
            "next_index": self._next_index,
            "pending": [int(k) for k, _ in self._packer.pending],
            "exhausted": self._exhausted,
            "stats": self._packer.stats.state(),
        }

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        self._next_index = int(state["next_index"])
        self._exhausted = bool(state["exhausted"])
        self._packer = Packer(self._pack, PackStats.from_state(state["stats"]))
        if state["pending"] and self._lookup is None:
            raise ValueError("restoring pending samples needs a random-access `lookup`")
        for k in state["pending"]:
            sample = self._lookup(int(k))
            if not isinstance(sample, Sample):
                raise ValueError(f"stream element {k} was pending but is now {sample!r}")
            self._packer.pending.append((int(k), sample))


class PackedBatchIterDataset(grain.IterDataset):
    """Packs a stream of Samples/Skipped into batches; `lookup(k)` re-makes element k."""

    def __init__(
        self,
        parent: grain.IterDataset,
        cfg: ModelConfig,
        loader: LoaderConfig,
        lookup: Callable[[int], Any] | None = None,
        epoch_size: int | None = None,
        name: str = "",
    ):
        super().__init__(parent)
        self._cfg, self._loader, self._lookup = cfg, loader, lookup
        self._epoch_size, self._name = epoch_size, name

    def __iter__(self) -> PackedBatchIterator:
        return PackedBatchIterator(
            self._parent.__iter__(), self._lookup, self._cfg, self._loader, self._epoch_size,
            self._name,
        )  # fmt: skip

    def __str__(self) -> str:
        p, b = self._loader.pack, self._loader.batch_size
        return f"PackedBatchIterDataset(B={b}, L={p.max_tokens}, N={p.max_crops})"


def _mark_flags_parsed() -> None:
    # Grain's worker processes read absl flags (docs/design.md 7).
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def _shard(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    if process_index is None or process_count is None:
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    return process_index, process_count


def sample_dataset(
    records: Sequence[Any] | grain.MapDataset,
    process: Callable[[Any], Sample],
    loader: LoaderConfig,
    *,
    process_index: int | None = None,
    process_count: int | None = None,
) -> grain.MapDataset:
    """Shuffled, sharded, repeated MapDataset of Sample | Skipped (element k = stream k)."""
    process_index, process_count = _shard(process_index, process_count)
    ds = records if isinstance(records, grain.MapDataset) else grain.MapDataset.source(records)
    if loader.shuffle:
        ds = ds.shuffle(seed=loader.seed)
    ds = ds[process_index::process_count]
    if len(ds) == 0:  # else an endless (repeat) or an empty stream with no word why
        shard = f" for process {process_index} of {process_count}" if process_count > 1 else ""
        raise ValueError(f"no records{shard} in {_name(records)} ({len(records)} records in all)")
    if loader.num_epochs != 1:
        ds = ds.repeat(loader.num_epochs)
    return ds.map(ProcessFn(process, loader.on_error))


def make_dataset(
    records: Sequence[Any] | grain.MapDataset,
    process: Callable[[Any], Sample],
    cfg: ModelConfig,
    loader: LoaderConfig,
    *,
    process_index: int | None = None,
    process_count: int | None = None,
) -> PackedBatchIterDataset:
    """The full pipeline as a Grain IterDataset of host batches (see the module doc).

    process_index / process_count default to `jax.process_index()` / `process_count()`.
    """
    process_index, process_count = _shard(process_index, process_count)
    map_ds = sample_dataset(
        records, process, loader, process_index=process_index, process_count=process_count
    )
    epoch_size = len(range(process_index, len(records), process_count))  # one pass of the shard
    read = grain.ReadOptions(
        num_threads=loader.read_threads, prefetch_buffer_size=loader.read_buffer
    )
    stream = map_ds.to_iter_dataset(read, allow_nones=True)
    if loader.num_workers > 0:
        _mark_flags_parsed()
        stream = stream.mp_prefetch(
            grain.MultiprocessingOptions(
                num_workers=loader.num_workers, per_worker_buffer_size=loader.worker_buffer_size
            ),
            worker_init_fn=die_with_parent,  # data_pipelines/workers.py
        )
    return PackedBatchIterDataset(
        stream, cfg, loader, lookup=map_ds.__getitem__, epoch_size=epoch_size, name=_name(records)
    )


def _name(records: Any) -> str:
    from data_pipelines.sources import source_name

    return "a MapDataset" if isinstance(records, grain.MapDataset) else source_name(records)


def make_loader(
    records: Sequence[Any] | grain.MapDataset,
    process: Callable[[Any], Sample],
    cfg: ModelConfig,
    loader: LoaderConfig,
    **shard: int | None,
) -> PackedBatchIterator:
    """`iter(make_dataset(...))`: batches, `get_state`/`set_state`, `stats()`, `close()`."""
    return iter(make_dataset(records, process, cfg, loader, **shard))


# ---- Orbax ----------------------------------------------------------------------------


def save_state(directory: str | Path, iterator: grain.DatasetIterator) -> None:
    """Write the iterator state with Grain's Orbax handler (one json file per process)."""
    import orbax.checkpoint as ocp

    with ocp.Checkpointer(grain.checkpoint.CheckpointHandler()) as ckptr:
        ckptr.save(Path(directory).absolute(), args=grain.checkpoint.CheckpointSave(iterator))


def restore_state(directory: str | Path, iterator: grain.DatasetIterator) -> grain.DatasetIterator:
    """Restore a state written by `save_state` into `iterator` (in place; also returned)."""
    import orbax.checkpoint as ocp

    with ocp.Checkpointer(grain.checkpoint.CheckpointHandler()) as ckptr:
        return ckptr.restore(
            Path(directory).absolute(), args=grain.checkpoint.CheckpointRestore(iterator)
        )
