"""Host-side token layout of LLaVA-Mini (numpy only; the model: lov_jax/models/llava_mini.py).

An item (an image, or a video of T frames) is `units` visual units; each unit costs
C^2 = `mini.tokens_per_image` LLM tokens and `mini.crops_per_image` crop slots (HD:
the r x r crops row-major, then the whole image). Its LLM tokens are one contiguous run
of placeholders; token k of the run taps bank row (first unit) * C^2 + k with weight 1,
the other three taps weigh 0 (the batch contract of lov_jax/batch.py, F = C^2 per unit).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from lov_jax.config import ModelConfig


def num_tokens(cfg: ModelConfig, units: int) -> int:
    """LLM tokens of an item of `units` images / frames: units * C^2."""
    return units * cfg.mini.tokens_per_image


def num_crops(cfg: ModelConfig, units: int) -> int:
    """Crop slots of an item of `units` images / frames (HD: r^2 + 1 each)."""
    return units * cfg.mini.crops_per_image


def prefusion_tokens(cfg: ModelConfig, length: int) -> int:
    """Tokens one unit's prefusion runs over in a row of `length`: V + C^2 + L."""
    f, r = cfg.vision.num_features, cfg.mini.resolution_ratio
    v = f if r == 1 else (r * r + 1) * f
    return v + cfg.mini.tokens_per_image + length


def place_taps(
    tokens: np.ndarray,
    placeholder_ids: Sequence[int],
    units: Sequence[int],
    cfg: ModelConfig,
    num_crop_slots: int,
    unit_offset: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """(vis_idx int32[L, 4], vis_w float32[L, 4]) for items of `units` images / frames
    whose placeholders (any of `placeholder_ids`, C^2 per unit, in item order) are in
    `tokens`; their crops fill slots from unit `unit_offset` on."""
    tokens = np.asarray(tokens)
    q, parts = cfg.mini.tokens_per_image, cfg.mini.crops_per_image
    pos = np.flatnonzero(np.isin(tokens, list(placeholder_ids)))
    want = sum(units) * q
    if len(pos) != want:
        raise ValueError(
            f"placeholder count mismatch: tokens hold {len(pos)} visual tokens but items of "
            f"{list(units)} units need {want} ({q} per image / frame)"
        )
    if (unit_offset + sum(units)) * parts > num_crop_slots:
        raise ValueError(
            f"items need {sum(units) * parts} crop slots from unit {unit_offset} but the row "
            f"has only {num_crop_slots}"
        )
    vis_idx = np.zeros((tokens.shape[0], 4), np.int32)
    vis_w = np.zeros((tokens.shape[0], 4), np.float32)
    vis_idx[pos] = (unit_offset * q + np.arange(want))[:, None]
    vis_w[pos, 0] = 1.0
    return vis_idx, vis_w


# ---- visual_layout.VisualItem hooks (the data pipeline and the prompter count and tap
# every item through lov_jax/visual_layout.py, which defers to these for LLaVA-Mini) ----

ITEM_KINDS = ("center_crop", "pad", "video")  # the CLIP processor's square / pad, frames


def item_units(item, cfg: ModelConfig) -> int:
    """Images / frames of a `visual_layout.VisualItem`: 1, or its frame count."""
    if item.kind not in ITEM_KINDS:
        raise ValueError(f"LLaVA-Mini takes {ITEM_KINDS} items, not {item.kind!r}")
    if cfg.mini.resolution_ratio != 1:
        raise ValueError(
            f"resolution_ratio {cfg.mini.resolution_ratio}: the data pipeline has no HD "
            "split (split_image); build HD rows with mini_layout.place_taps"
        )
    return item.num_frames if item.kind == "video" else 1


def item_taps(item, cfg: ModelConfig, crop_offset: int) -> tuple[np.ndarray, np.ndarray]:
    """(idx int32[T, 4], w float32[T, 4]) of an item whose crops start at `crop_offset`."""
    q, parts = cfg.mini.tokens_per_image, cfg.mini.crops_per_image
    count = item_units(item, cfg) * q
    idx = np.zeros((count, 4), np.int32)
    idx[:, 0] = (crop_offset // parts) * q + np.arange(count)
    w = np.zeros((count, 4), np.float32)
    w[:, 0] = 1.0
    return idx, w
