"""Pack Samples into fixed-shape rows with two budgets: L tokens and N crops (docs/design.md 2).

Rows follow the batch contract (`lov_jax.batch`: keys, dtypes, shapes, bank rows); B
rows are built by `empty_rows` and filled by `write_row`. Within a row:

    tokens, targets, loss_mask   samples back to back, then padding (pad_id / 0 / 0)
    segment_ids, positions       1..S in placement order / 0..T_k-1 inside segment k; 0 on padding
    pixels                       segment k's crops in consecutive slots, zeros after
    vis_idx, vis_w               `place_taps` with the segment's crop offset, so segment k
                                 only taps its own crops (plus the shared newline/zero rows)

The packer never splits a sample. A sample over L tokens or N crops on its own is
dropped with a counted reason ('too_long_tokens' / 'too_many_crops').

Row selection (balanced greedy): keep a window of pending samples in arrival order and
build one row at a time. The oldest pending sample opens the row (so no sample waits
more than `window` rows, which also bounds what a checkpoint must re-read); then,
among the samples that still fit both budgets, repeatedly add the one maximising

    (ft + fc) - balance * |ft - fc|        ft, fc = token / crop fill after adding it

i.e. fill as much as possible while keeping the two budgets in step, since a row whose
crops run out while tokens are left (or the reverse) is wasted. When no pending sample
with crops fits any more, the score degrades to `ft` (largest-first, first-fit on ties),
so text-only data packs like plain first-fit-decreasing. Ties go to the older sample;
everything is deterministic. On an OneVision-like mix at L = 32768, N = 84 this reaches
~97% token / ~92% crop fill (benchmarks/data.py).
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np

from data_pipelines.sample import Reason, Sample, over_budget
from lov_jax.batch import empty_batch
from lov_jax.config import ModelConfig
from lov_jax.visual_layout import place_taps

DROP_REASONS = (Reason.TOO_LONG_TOKENS, Reason.TOO_MANY_CROPS)


@dataclasses.dataclass(frozen=True)
class PackConfig:
    """Row budgets and packer knobs.

    max_tokens: L, tokens per row.  max_crops: N, crop/frame slots per row (may be 0).
    window: pending samples the greedy chooses from.  balance: weight of |ft - fc|.
    pad_id: token id on padding positions (never attended to or trained).
    """

    max_tokens: int
    max_crops: int
    window: int = 128
    balance: float = 2.0
    pad_id: int = 0

    def __post_init__(self):
        if self.max_tokens < 1 or self.max_crops < 0 or self.window < 1:
            raise ValueError(f"bad PackConfig {self}")


def drop_reason(num_tokens: int, num_crops: int, pack: PackConfig) -> Reason | None:
    """Why a sample of this size can never be packed, or None."""
    return over_budget(num_tokens, num_crops, pack.max_tokens, pack.max_crops)


def select_row(tokens: np.ndarray, crops: np.ndarray, pack: PackConfig) -> list[int]:
    """Balanced greedy choice of one row from pending sizes (arrival order).

    tokens, crops: int[P] sizes of the pending samples, each fitting an empty row.
    Returns the chosen positions in placement order (position 0, the oldest, first).
    """
    tokens = np.asarray(tokens, np.int64)
    crops = np.asarray(crops, np.int64)
    if len(tokens) == 0:
        return []
    big_l, big_n = pack.max_tokens, max(pack.max_crops, 1)
    free = np.ones(len(tokens), bool)
    chosen, used_t, used_c = [0], int(tokens[0]), int(crops[0])
    free[0] = False
    while True:
        fits = free & (used_t + tokens <= big_l) & (used_c + crops <= pack.max_crops)
        if not fits.any():
            return chosen
        ft = (used_t + tokens) / big_l
        if (fits & (crops > 0)).any():
            fc = (used_c + crops) / big_n
            score = ft + fc - pack.balance * np.abs(ft - fc)
        else:
            score = ft
        j = int(np.argmax(np.where(fits, score, -np.inf)))  # first maximum: oldest wins ties
        chosen.append(j)
        used_t += int(tokens[j])
        used_c += int(crops[j])
        free[j] = False


# ---- row assembly ----------------------------------------------------------------------


def empty_rows(batch: int, pack: PackConfig, cfg: ModelConfig) -> dict[str, np.ndarray]:
    """All-padding batch of `batch` rows of the row budgets (`lov_jax.batch.empty_batch`)."""
    return empty_batch(batch, pack.max_tokens, pack.max_crops, cfg, pad_id=pack.pad_id)


def write_row(
    out: dict[str, np.ndarray],
    b: int,
    samples: Sequence[Sample],
    pack: PackConfig,
    cfg: ModelConfig,
) -> tuple[int, int]:
    """Place `samples` (in order) into row b of an `empty_rows` batch. Returns (tokens, crops).

    A sample with `parts` takes one segment id per part (positions restart per part); its
    `extras` go to `out[key]` (float32[B, L], created as zeros when first written)."""
    t0 = c0 = 0
    k = 0  # segment id of the last placed (sub-)segment
    for s in samples:
        t, c = s.num_tokens, s.num_crops
        if t0 + t > pack.max_tokens or c0 + c > pack.max_crops:
            raise ValueError(f"samples overflow the row budgets at sample {s.id}")
        sl = slice(t0, t0 + t)
        out["tokens"][b, sl] = s.tokens
        out["targets"][b, sl] = s.targets
        out["loss_mask"][b, sl] = s.loss_mask
        start = t0
        for part in s.parts or (t,):
            k += 1
            out["segment_ids"][b, start : start + part] = k
            out["positions"][b, start : start + part] = np.arange(part, dtype=np.int32)
            start += part
        for key, values in s.extras.items():
            if key not in out:
                out[key] = np.zeros(out["tokens"].shape, np.float32)
            out[key][b, sl] = values
        if c:
            out["pixels"][b, c0 : c0 + c] = s.crops
        idx, w = place_taps(s.tokens, s.items, cfg, pack.max_crops, crop_offset=c0)
        out["vis_idx"][b, sl] = idx
        out["vis_w"][b, sl] = w
        t0, c0 = t0 + t, c0 + c
    return t0, c0


# ---- fill statistics -------------------------------------------------------------------


@dataclasses.dataclass
class PackStats:
    """Counters over emitted rows. Fill = used / (rows * budget); empty tail rows count."""

    samples_in: int = 0  # records seen (skipped and dropped included)
    samples_packed: int = 0
    rows: int = 0
    tokens_used: int = 0
    crops_used: int = 0
    max_tokens: int = 0
    max_crops: int = 0
    skipped: dict[str, int] = dataclasses.field(default_factory=dict)  # reason -> count

    def count_skip(self, reason: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1

    def count_row(self, tokens: int, crops: int, samples: int) -> None:
        self.rows += 1
        self.tokens_used += tokens
        self.crops_used += crops
        self.samples_packed += samples

    @property
    def token_fill(self) -> float:
        return self.tokens_used / max(self.rows * self.max_tokens, 1)

    @property
    def crop_fill(self) -> float:
        return self.crops_used / max(self.rows * self.max_crops, 1)

    def to_dict(self) -> dict[str, Any]:
        """Numbers for logs (`skip/<reason>` keys) and the iterator state."""
        return {
            "samples_in": self.samples_in,
            "samples_packed": self.samples_packed,
            "rows": self.rows,
            "tokens_used": self.tokens_used,
            "crops_used": self.crops_used,
            "token_fill": self.token_fill,
            "crop_fill": self.crop_fill,
            "skipped": sum(self.skipped.values()),
            **{f"skip/{k}": v for k, v in sorted(self.skipped.items())},
        }

    def state(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["skipped"] = dict(sorted(self.skipped.items()))
        return d

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> PackStats:
        return cls(**{**state, "skipped": dict(state["skipped"])})


# ---- the stateful packer ---------------------------------------------------------------


class Packer:
    """Window of pending samples -> rows. Drives `select_row`; holds the stats.

    `add(sample, key)` queues a sample (or drops it with a counted reason); `next_row()`
    returns the (key, sample) list of the next row once the window is full (or always
    with `flush=True`, for the end of the stream). Keys are opaque to the packer (the
    loader uses stream indices so pending samples can be re-read after a restore).
    """

    def __init__(self, pack: PackConfig, stats: PackStats | None = None):
        self.pack = pack
        self.pending: collections.deque[tuple[Any, Sample]] = collections.deque()
        self.stats = stats or PackStats(max_tokens=pack.max_tokens, max_crops=pack.max_crops)

    def add(self, sample: Sample, key: Any = None) -> Reason | None:
        """Queue a sample; returns the drop reason if it can never fit."""
        reason = drop_reason(sample.num_tokens, sample.num_crops, self.pack)
        if reason is not None:
            self.stats.count_skip(reason)
            return reason
        self.pending.append((key, sample))
        return None

    @property
    def ready(self) -> bool:
        return len(self.pending) >= self.pack.window

    def next_row(self, flush: bool = False) -> list[tuple[Any, Sample]] | None:
        if not self.pending or (not flush and not self.ready):
            return None
        pend = list(self.pending)
        sizes = np.array([(s.num_tokens, s.num_crops) for _, s in pend], np.int64)
        chosen = select_row(sizes[:, 0], sizes[:, 1], self.pack)
        taken = set(chosen)
        self.pending = collections.deque(p for i, p in enumerate(pend) if i not in taken)
        return [pend[i] for i in chosen]


def pack_batches(
    samples: Iterable[Sample],
    pack: PackConfig,
    cfg: ModelConfig,
    batch_size: int,
    *,
    stats: PackStats | None = None,
    drop_remainder: bool = False,
) -> Iterator[dict[str, np.ndarray]]:
    """Offline convenience: samples -> batches of `batch_size` packed rows (no Grain).

    The last batch is completed with empty rows unless `drop_remainder`.
    """
    packer = Packer(pack, stats)
    rows: list[list[Sample]] = []

    def drain(flush: bool):
        while (row := packer.next_row(flush)) is not None:
            rows.append([s for _, s in row])
            if len(rows) == batch_size:
                yield _batch(rows)

    def _batch(batch_rows):
        out = empty_rows(batch_size, pack, cfg)
        for b, row in enumerate(batch_rows):
            t, c = write_row(out, b, row, pack, cfg)
            packer.stats.count_row(t, c, len(row))
        packer.stats.rows += batch_size - len(batch_rows)
        batch_rows.clear()
        return out

    for s in samples:
        packer.stats.samples_in += 1
        packer.add(s)
        yield from drain(False)
    yield from drain(True)
    if rows and not drop_remainder:
        yield _batch(rows)
