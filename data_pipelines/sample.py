"""The unit passed between record processing and packing.

A `Sample` is one training/eval example after media decoding, preprocessing,
chat templating, placeholder expansion and loss masking; the packer only moves
these arrays into rows (DESIGN.md 2) and never looks inside the media.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from lov_jax.visual_layout import VisualItem


@dataclasses.dataclass
class Sample:
    """One example.

    tokens:    int32[T]    ids with every `<image>`/`<video>` expanded to its exact run
    targets:   int32[T]    next-token targets: targets[t] = tokens[t + 1], last = pad id
    loss_mask: float32[T]  1 where targets[t] is trained
    crops:     uint8[n, S, S, 3]  crops/frames of all visual items, in item order
    items:     visual items, in placeholder order (their crops are consecutive in `crops`)
    """

    id: str
    tokens: np.ndarray
    targets: np.ndarray
    loss_mask: np.ndarray
    crops: np.ndarray
    items: list[VisualItem]
    source: str = ""

    def __post_init__(self):
        n = len(self.tokens)
        if len(self.targets) != n or len(self.loss_mask) != n:
            raise ValueError(f"sample {self.id}: tokens/targets/loss_mask lengths differ")

    @property
    def num_tokens(self) -> int:
        return len(self.tokens)

    @property
    def num_crops(self) -> int:
        return len(self.crops)


class SkipSample(Exception):
    """A record that cannot be used; `reason` is a short counter key (e.g. 'missing_image')."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason
