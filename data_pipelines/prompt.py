"""Placeholder expansion: one `<image>` / `<video>` id -> its exact run of visual tokens."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from lov_jax import visual_layout
from lov_jax.config import ModelConfig


def expand_placeholders(
    ids: Sequence[int], items: Sequence[visual_layout.VisualItem], cfg: ModelConfig
) -> np.ndarray:
    """Replace the i-th placeholder id with `num_tokens(items[i])` copies of it.

    Placeholders and items must agree in number and kind (`video` items go with
    `cfg.ids.video`, all others with `cfg.ids.image`).
    """
    out: list[int] = []
    remaining = list(items)
    visual = cfg.ids.visual
    for pos, tok in enumerate(ids):
        if tok not in visual:
            out.append(int(tok))
            continue
        if not remaining:
            raise ValueError(f"placeholder at token {pos} has no visual item left to fill it")
        item = remaining.pop(0)
        wanted = cfg.ids.placeholder_id(item.kind)
        if tok != wanted:
            raise ValueError(f"placeholder at token {pos} is id {tok} but item is {item.kind!r}")
        out += [int(tok)] * visual_layout.num_tokens(item, cfg)
    if remaining:
        raise ValueError(f"{len(remaining)} visual item(s) have no placeholder in the text")
    return np.asarray(out, np.int32)
