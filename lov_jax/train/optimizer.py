"""Per-module optimizer groups chosen by parameter path (never inside model code).

Groups: `vision` (vision_tower/*), `projector` (multi_modal_projector/*), `llm`
(language_model/*), and `image_newline` joins the group named by
`optim.newline_group` (the original recipe trains it with the LLM); LLaVA-Mini's
`compressor/*` and `prefusion_layers/*` join `projector` (its fixed `pos_embed` is always
frozen). A group not
listed in `optim.trainable` is frozen: its params are not differentiated, get
no optimizer state and are returned bitwise unchanged. That is `optax.set_to_zero`
semantics without allocating zero gradients; since a frozen vision tower has no
differentiated input, autodiff also treats its output as a constant
(= `stop_gradient`), so no backward pass runs through it.
"""

from __future__ import annotations

import difflib
import math

import optax
from flax import traverse_util

GROUPS = ("vision", "projector", "llm")
FROZEN = "frozen"
MINI_PARTS = ("compressor", "prefusion_layers")  # lov_jax/models/llava_mini.py


def group_of(path: tuple[str, ...], newline_group: str = "llm") -> str:
    top = path[0]
    if top == "vision_tower":
        return "vision"
    if top == "multi_modal_projector":
        return "projector"
    if top == "language_model":
        return "llm"
    if top == "image_newline":
        return newline_group
    if top in MINI_PARTS:  # LLaVA-Mini's tune_mm_mlp_adapter trains them with the projector
        return FROZEN if path[-1] == "pos_embed" else "projector"  # pos_embed: a buffer
    raise ValueError(f"parameter {'/'.join(path)} belongs to no optimizer group")


def check_groups(optim) -> None:
    """Every group name the config gives is a known group (a typo would silently freeze
    that group): `optim.trainable` and `optim.newline_group`."""
    trainable = optim.trainable
    if isinstance(trainable, str) or not all(isinstance(g, str) for g in trainable):
        raise ValueError(f"optim.trainable={trainable!r}: a tuple of group names from {GROUPS}")
    for field, names in (
        ("trainable", tuple(trainable)),
        ("newline_group", (optim.newline_group,)),
    ):
        for name in names:
            if name not in GROUPS:
                close = difflib.get_close_matches(name, GROUPS, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise ValueError(
                    f"optim.{field}: unknown optimizer group {name!r}{hint}; the groups are "
                    f"{', '.join(GROUPS)}"
                )


def param_labels(params, optim) -> dict[tuple[str, ...], str]:
    """{flat path: group label or 'frozen'} for every leaf of the nested params."""
    check_groups(optim)
    trainable = set(optim.trainable)
    labels = {}
    for path in traverse_util.flatten_dict(params):
        group = group_of(path, optim.newline_group)
        labels[path] = group if group in trainable else FROZEN
    return labels


def split_params(params, labels):
    """Nested params -> (trainable flat dict, frozen flat dict), keyed by path tuples."""
    flat = traverse_util.flatten_dict(params)
    trainable = {k: v for k, v in flat.items() if labels[k] != FROZEN}
    frozen = {k: v for k, v in flat.items() if labels[k] == FROZEN}
    return trainable, frozen


def merge_params(trainable, frozen):
    return traverse_util.unflatten_dict({**frozen, **trainable})


def group_lrs(optim) -> dict[str, float]:
    projector_lr = optim.lr if optim.projector_lr < 0 else optim.projector_lr
    return {"vision": optim.vision_lr, "projector": projector_lr, "llm": optim.lr}


def schedule(peak_lr: float, total_steps: int, warmup_ratio: float) -> optax.Schedule:
    """Linear warmup from 0 over ceil(ratio * total) steps, then cosine to 0 (HF Trainer)."""
    warmup = math.ceil(warmup_ratio * total_steps)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=peak_lr,
        warmup_steps=warmup,
        decay_steps=max(total_steps, warmup + 1),
        end_value=0.0,
    )


def make_optimizer(optim, total_steps: int, labels) -> tuple[optax.GradientTransformation, dict]:
    """AdamW per group + global-norm clipping over the trainable grads.

    Returns (transformation over the trainable flat dict, {group: schedule}).
    """
    lrs = group_lrs(optim)
    used = sorted({g for g in labels.values() if g != FROZEN})
    schedules = {g: schedule(lrs[g], total_steps, optim.warmup_ratio) for g in used}
    transforms = {
        g: optax.adamw(
            schedules[g], b1=optim.b1, b2=optim.b2, eps=optim.eps, weight_decay=optim.weight_decay
        )
        for g in used
    }
    trainable_labels = {k: v for k, v in labels.items() if v != FROZEN}
    tx = optax.chain(
        optax.clip_by_global_norm(optim.max_grad_norm),
        optax.multi_transform(transforms, trainable_labels),
    )
    return tx, schedules
