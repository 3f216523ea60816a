"""The packed batch contract (docs/design.md 2): keys, dtypes, shapes and feature-bank rows.

Every training / eval batch is a dict of fixed-shape arrays, per row b of B:

    tokens       int32[B, L]             ids, placeholders already expanded (pad id after)
    targets      int32[B, L]             next-token targets, shifted inside each sample
    loss_mask    float32[B, L]           1 where the target is trained
    segment_ids  int32[B, L]             1..S per packed sample, 0 = padding
    positions    int32[B, L]             RoPE positions, restart at 0 per segment
    pixels       uint8[B, N, S, S, C]    crops / frames, zero padded (S = image_size)
    vis_idx      int32[B, L, 4]          taps into the row's feature bank
    vis_w        float32[B, L, 4]        tap weights, 0 on text tokens

The train step sees the same arrays with a leading micro-batch axis A ([A, B, ...]).

Feature bank of a row with N crop slots and F = `cfg.vision.num_features` visual tokens
per crop (the tower's output after feature selection: 729 SigLIP, 576 CLIP "default", 577
CLIP "full"; `models.llava_onevision` builds it, `visual_layout` indexes it):

    rows [c*F, (c+1)*F)   projected features of crop slot c
    row  newline_row(N, F) = N*F       image_newline (zeros for LLaVA-1.5, which has none
                                       and never taps it: the same shapes for every family)
    row  zero_row(N, F)    = N*F + 1   zeros: what text and padding positions tap

and, only where `cfg.video` needs them (lov_jax/video_pool.py; `bank_size` counts all):

    row  faster_row(N, cfg) = N*F + 2  LLaVA-Video's `faster_token` (SlowFast)
    rows pooled_start(N, cfg, s) + c*h*h + j   crop slot c pooled s x s (average / max),
                                       h = floor(P/s), one section per device stride
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from lov_jax import video_pool
from lov_jax.config import ModelConfig

TAPS = 4  # bank rows one visual token combines (bilinear: 4 neighbours)

# key -> (dtype, dims); dims name the sizes of `shapes()`.
FIELDS: dict[str, tuple[type, tuple[str, ...]]] = {
    "tokens": (np.int32, ("B", "L")),
    "targets": (np.int32, ("B", "L")),
    "loss_mask": (np.float32, ("B", "L")),
    "segment_ids": (np.int32, ("B", "L")),
    "positions": (np.int32, ("B", "L")),
    "pixels": (np.uint8, ("B", "N", "S", "S", "C")),
    "vis_idx": (np.int32, ("B", "L", "T")),
    "vis_w": (np.float32, ("B", "L", "T")),
}
KEYS = tuple(FIELDS)


def newline_row(num_crops: int, num_features: int) -> int:
    """Bank row of `image_newline` in a row of `num_crops` crop slots of `num_features`."""
    return num_crops * num_features


def zero_row(num_crops: int, num_features: int) -> int:
    """Bank row of zeros: the tap of every text and padding position."""
    return num_crops * num_features + 1


def bank_rows(num_crops: int, num_features: int) -> int:
    """Rows of a row's feature bank: the crops' features, the newline, the zero row."""
    return num_crops * num_features + 2


def faster_row(num_crops: int, cfg: ModelConfig) -> int:
    """Bank row of the `faster_token` (only when `cfg.video.faster`)."""
    if not cfg.video.faster:
        raise ValueError("this model has no faster_token (video.faster is off)")
    return bank_rows(num_crops, cfg.vision.num_features)


def _pooled_sections(num_crops: int, cfg: ModelConfig) -> dict[int, tuple[int, int]]:
    """device stride -> (first bank row, rows) of its pooled section."""
    start = bank_rows(num_crops, cfg.vision.num_features) + int(cfg.video.faster)
    out, p = {}, cfg.vision.patches_per_side
    for s in video_pool.device_strides(cfg):
        rows = num_crops * video_pool.pooled_side(p, s, cfg.video.pool_mode) ** 2
        out[s] = (start, rows)
        start += rows
    return out


def pooled_start(num_crops: int, cfg: ModelConfig, stride: int) -> int:
    """First bank row of the crops pooled at `stride` (one of video_pool.device_strides)."""
    sections = _pooled_sections(num_crops, cfg)
    if stride not in sections:
        raise ValueError(f"no pooled bank section at stride {stride}; have {sorted(sections)}")
    return sections[stride][0]


def bank_size(num_crops: int, cfg: ModelConfig) -> int:
    """All rows of a row's feature bank under `cfg` (bank_rows + the video rows)."""
    extra = sum(rows for _, rows in _pooled_sections(num_crops, cfg).values())
    return bank_rows(num_crops, cfg.vision.num_features) + int(cfg.video.faster) + extra


def shapes(
    rows: int, length: int, crops: int, cfg: ModelConfig, keys: Sequence[str] = KEYS
) -> dict[str, tuple[int, ...]]:
    """key -> shape of a batch of `rows` rows with L = `length` tokens, N = `crops` slots."""
    size = cfg.vision.image_size
    dims = {"B": rows, "L": length, "N": crops, "S": size, "C": cfg.vision.num_channels}
    dims["T"] = TAPS
    return {k: tuple(dims[d] for d in FIELDS[k][1]) for k in keys}


def empty_batch(
    rows: int,
    length: int,
    crops: int,
    cfg: ModelConfig,
    *,
    pad_id: int,
    keys: Sequence[str] = KEYS,
) -> dict[str, np.ndarray]:
    """All-padding numpy batch: `pad_id` tokens, zeros, taps on the zero row (weight 0)."""
    fill = {"tokens": pad_id, "vis_idx": zero_row(crops, cfg.vision.num_features)}
    return {
        k: np.full(shape, fill.get(k, 0), FIELDS[k][0])
        for k, shape in shapes(rows, length, crops, cfg, keys).items()
    }


def abstract_batch(
    rows: int,
    length: int,
    crops: int,
    cfg: ModelConfig,
    *,
    micro_batches: int | None = None,
    sharding=None,
    keys: Sequence[str] = KEYS,
) -> dict:
    """`jax.ShapeDtypeStruct`s of a batch (nothing allocated): what a step is lowered for.

    `micro_batches` A adds the train step's leading axis; `sharding` is set on every key
    (`sharding.batch_sharding`).
    """
    import jax

    lead = () if micro_batches is None else (micro_batches,)
    return {
        k: jax.ShapeDtypeStruct(lead + shape, FIELDS[k][0], sharding=sharding)
        for k, shape in shapes(rows, length, crops, cfg, keys).items()
    }


def check_batch(batch: dict, cfg: ModelConfig, *, micro_batched: bool = False) -> None:
    """A ValueError listing every way `batch` departs from the contract (keys, dtypes,
    shapes, taps inside the bank); B, L and N are read from `tokens` and `pixels`."""
    problems = []
    if set(batch) != set(KEYS):
        problems.append(f"keys {sorted(batch)} != {sorted(KEYS)}")
    lead = 1 if micro_batched else 0
    if "tokens" in batch and "pixels" in batch:
        rows, length = batch["tokens"].shape[lead : lead + 2]
        crops = batch["pixels"].shape[lead + 1]
        want = shapes(rows, length, crops, cfg, [k for k in KEYS if k in batch])
        for k, shape in want.items():
            got = batch[k]
            if tuple(got.shape[lead:]) != shape:
                problems.append(f"{k}: shape {tuple(got.shape)}, expected [..]{shape}")
            if np.dtype(got.dtype) != np.dtype(FIELDS[k][0]):
                problems.append(f"{k}: dtype {got.dtype}, expected {np.dtype(FIELDS[k][0])}")
        if isinstance(batch.get("vis_idx"), np.ndarray):  # abstract batches have no values
            idx = batch["vis_idx"]
            top = bank_size(crops, cfg)
            if idx.size and (idx.min() < 0 or idx.max() >= top):
                problems.append(f"vis_idx: taps outside the bank rows [0, {top})")
    if problems:
        raise ValueError("batch does not follow lov_jax.batch: " + "; ".join(problems))
