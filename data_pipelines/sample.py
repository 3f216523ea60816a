"""The unit passed between record processing and packing.

A `Sample` is one training/eval example after media decoding, preprocessing,
chat templating, placeholder expansion and loss masking; the packer only moves
these arrays into rows (docs/design.md 2) and never looks inside the media.
"""

from __future__ import annotations

import dataclasses
import enum

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
    parts:     token lengths of consecutive sub-segments packed as separate segments of
               one row (a DPO pair: chosen, rejected; lov_jax/post/dpo.py); () = one segment
    extras:    {batch key: float32[T]} per-token values the packer writes into the row
               under that key (zeros elsewhere), e.g. precomputed reference log-probs
    """

    id: str
    tokens: np.ndarray
    targets: np.ndarray
    loss_mask: np.ndarray
    crops: np.ndarray
    items: list[VisualItem]
    source: str = ""
    parts: tuple[int, ...] = ()
    extras: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        n = len(self.tokens)
        if len(self.targets) != n or len(self.loss_mask) != n:
            raise ValueError(f"sample {self.id}: tokens/targets/loss_mask lengths differ")
        if self.parts and (sum(self.parts) != n or min(self.parts) < 1):
            raise ValueError(f"sample {self.id}: parts {self.parts} do not split {n} tokens")
        if any(len(v) != n for v in self.extras.values()):
            raise ValueError(f"sample {self.id}: extras lengths differ from tokens ({n})")

    @property
    def num_tokens(self) -> int:
        return len(self.tokens)

    @property
    def num_crops(self) -> int:
        return len(self.crops)


class Reason(enum.StrEnum):
    """Why an input is unusable: the one closed set of skip-reason names.

    Counted by the loader as `skip/<reason>` (`lov-jax data stats`) and reported by eval.
    """

    MISSING_IMAGE = "missing_image"  # media.py: no such file / entry without bytes or path
    CORRUPT_IMAGE = "corrupt_image"  # media.py: PIL cannot decode it
    MISSING_VIDEO = "missing_video"
    CORRUPT_VIDEO = "corrupt_video"  # PyAV cannot decode it, or frames of several sizes
    EMPTY_VIDEO = "empty_video"  # no frames (header, folder or decode)
    PLACEHOLDER_MISMATCH = "placeholder_mismatch"  # `<image>`/`<video>` count != media count
    MALFORMED_RECORD = "malformed_record"  # field types, roles, missing conversations
    TOO_LONG_TOKENS = "too_long_tokens"  # over the row's L tokens (never truncated)
    TOO_MANY_CROPS = "too_many_crops"  # over the row's N crops
    MISSING_MEDIA = "missing_media"  # eval: a record names a media file that is absent
    BAD_MEDIA = "bad_media"  # eval: the predictor could not encode the record's media
    SCORING_FAILED = "scoring_failed"  # eval: the metric could not score the prediction


# What a bad input does: `skip` drops and counts it under its reason, `raise` raises it.
POLICIES = ("skip", "raise")


class BadSample(Exception):
    """An input that cannot be used: the one bad-input type of data_pipelines.

    `reason` is a `Reason` (an unknown name is a ValueError here, so the set stays
    closed); the message names the culprit (file, record id and index) once the record
    layer has added them (`records.process_record`). Under policy `raise` the loader
    raises this same exception. Not a ValueError: decoders that catch ValueError (PyAV,
    PIL) must not turn one reason into another.
    """

    def __init__(self, reason: Reason | str, message: str):
        super().__init__(message)
        self.reason = Reason(reason)

    def __reduce__(self):  # picklable across Grain worker processes
        return type(self), (self.reason, str(self))


def over_budget(
    num_tokens: int, num_crops: int, max_tokens: int | None, max_crops: int | None
) -> Reason | None:
    """Why a sample of this size can never fit the budgets (None: no limit), or None."""
    if max_tokens is not None and num_tokens > max_tokens:
        return Reason.TOO_LONG_TOKENS
    if max_crops is not None and num_crops > max_crops:
        return Reason.TOO_MANY_CROPS
    return None
