"""Synthetic, resumable host batches in the contract (lov_jax/batch.py), for training tests."""

from __future__ import annotations

import numpy as np

from lov_jax.batch import newline_row


class SyntheticBatches:
    """Deterministic batches in the contract; batch i depends only on (seed, i).

    Row r of batch i holds two packed segments; visual taps point into the row's crops.
    Defaults match the `demo` preset's geometry (112px crops, 8x8 patches).
    """

    def __init__(
        self, rows=2, length=64, crops=1, seed=0, vocab=1000, nan_at=(), image_size=112,
        patches=64,
    ):  # fmt: skip
        self.rows, self.length, self.crops, self.seed, self.vocab = rows, length, crops, seed, vocab
        self.image_size, self.patches = image_size, patches
        self.position = 0
        self.nan_at = set(nan_at)

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        rng = np.random.default_rng([self.seed, self.position])
        b, L, n = self.rows, self.length, self.crops
        tokens = rng.integers(0, self.vocab, (b, L)).astype(np.int32)
        seg = np.zeros((b, L), np.int32)
        seg[:, : L // 2] = 1
        seg[:, L // 2 : L - 4] = 2
        positions = np.where(seg == 1, np.arange(L), np.arange(L) - L // 2).clip(0)
        vis_w = np.zeros((b, L, 4), np.float32)
        vis_w[:, 2:12] = rng.random((b, 10, 4))
        p, size = self.patches, self.image_size
        vis_idx = rng.integers(0, n * p, (b, L, 4)).astype(np.int32)
        vis_idx[:, 12], vis_w[:, 12] = newline_row(n, p), (1, 0, 0, 0)  # an image_newline token
        batch = {
            "tokens": tokens,
            "targets": np.roll(tokens, -1, 1),
            "loss_mask": (seg > 0).astype(np.float32),
            "segment_ids": seg,
            "positions": positions.astype(np.int32),
            "pixels": rng.integers(0, 256, (b, n, size, size, 3), dtype=np.uint8),
            "vis_idx": vis_idx,
            "vis_w": vis_w,
        }
        if self.position in self.nan_at:
            batch["vis_w"] = batch["vis_w"] * np.float32("nan")
        self.position += 1
        return batch

    def get_state(self):
        return {"position": self.position}

    def set_state(self, state):
        self.position = int(state["position"])
