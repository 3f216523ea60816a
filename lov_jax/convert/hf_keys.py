"""HF <-> lov_jax parameter conversion as one key table (STYLE.md 6).

Every accepted HF layout (REFERENCE.md 9) is first canonicalised by stripping its
prefix (`_PREFIXES`), then one table (`_TABLE`) maps each canonical name to our
param path, an optional layer index (layers are stacked on a leading axis for
`nn.scan`) and a `Transform`. The same table, read backwards, writes HF names.

Canonical scheme: `vision.<siglip name without vision_model.>`,
`projector.linear_{1,2}.*`, `image_newline`, `text.<Qwen2Model name>`, `lm_head.weight`.
"""

from __future__ import annotations

import enum
import math
import os
import re
import threading
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import ml_dtypes  # noqa: F401  (registers "bfloat16" with np.dtype)
import numpy as np

from lov_jax.config import ModelConfig


class CheckpointError(ValueError):
    """A checkpoint does not match the config; the message lists every problem."""


class Transform(enum.Enum):
    """HF tensor -> one layer of our leaf. `t` below is our per-layer shape."""

    IDENTITY = "identity"
    LINEAR = "linear"  # [out, in] -> [in, out]
    HEADS_QKV = "heads_qkv"  # [n*h, D] -> [D, n, h]
    HEADS_BIAS = "heads_bias"  # [n*h] -> [n, h]
    HEADS_O = "heads_o"  # [D, n*h] -> [n, h, D]
    CONV = "conv"  # OIHW [O, I, kh, kw] -> HWIO [kh, kw, I, O]

    def hf_shape(self, t: tuple[int, ...]) -> tuple[int, ...]:
        if self is Transform.LINEAR:
            return t[::-1]
        if self is Transform.HEADS_QKV:
            return (math.prod(t[1:]), t[0])
        if self is Transform.HEADS_BIAS:
            return (math.prod(t),)
        if self is Transform.HEADS_O:
            return (t[-1], math.prod(t[:-1]))
        if self is Transform.CONV:
            return (t[3], t[2], t[0], t[1])
        return t

    def to_ours(self, x: np.ndarray, t: tuple[int, ...]) -> np.ndarray:
        if self is Transform.CONV:
            return x.transpose(2, 3, 1, 0)
        if self in (Transform.LINEAR, Transform.HEADS_QKV, Transform.HEADS_O):
            x = x.T
        return x.reshape(t)

    def to_hf(self, y: np.ndarray) -> np.ndarray:
        if self is Transform.CONV:
            y = y.transpose(3, 2, 0, 1)
        elif self is Transform.LINEAR:
            y = y.T
        elif self is Transform.HEADS_QKV:
            y = y.reshape(y.shape[0], -1).T
        elif self is Transform.HEADS_O:
            y = y.reshape(-1, y.shape[-1]).T
        elif self is Transform.HEADS_BIAS:
            y = y.reshape(-1)
        return np.ascontiguousarray(y)


T = Transform
_QKV = ("q_proj", "k_proj", "v_proj")

# Per-layer rows: (HF name suffix, our path suffix, transform).
_VISION_LAYER = (
    *((f"{n}.weight", f"{n}/scale", T.IDENTITY) for n in ("layer_norm1", "layer_norm2")),
    *((f"{n}.bias", f"{n}/bias", T.IDENTITY) for n in ("layer_norm1", "layer_norm2")),
    *((f"self_attn.{n}.weight", f"self_attn/{n}/kernel", T.HEADS_QKV) for n in _QKV),
    *((f"self_attn.{n}.bias", f"self_attn/{n}/bias", T.HEADS_BIAS) for n in _QKV),
    ("self_attn.out_proj.weight", "self_attn/out_proj/kernel", T.HEADS_O),
    ("self_attn.out_proj.bias", "self_attn/out_proj/bias", T.IDENTITY),
    *((f"mlp.{n}.weight", f"mlp/{n}/kernel", T.LINEAR) for n in ("fc1", "fc2")),
    *((f"mlp.{n}.bias", f"mlp/{n}/bias", T.IDENTITY) for n in ("fc1", "fc2")),
)
_TEXT_LAYER = (
    *(
        (f"{n}.weight", f"{n}/scale", T.IDENTITY)
        for n in ("input_layernorm", "post_attention_layernorm")
    ),
    *((f"self_attn.{n}.weight", f"self_attn/{n}/kernel", T.HEADS_QKV) for n in _QKV),
    *((f"self_attn.{n}.bias", f"self_attn/{n}/bias", T.HEADS_BIAS) for n in _QKV),
    ("self_attn.o_proj.weight", "self_attn/o_proj/kernel", T.HEADS_O),
    *(
        (f"mlp.{n}.weight", f"mlp/{n}/kernel", T.LINEAR)
        for n in ("gate_proj", "up_proj", "down_proj")
    ),
)

_VISION = (
    ("embeddings.patch_embedding.weight", "embeddings/patch_embedding/kernel", T.CONV),
    ("embeddings.patch_embedding.bias", "embeddings/patch_embedding/bias", T.IDENTITY),
    ("embeddings.position_embedding.weight", "embeddings/position_embedding/embedding", T.IDENTITY),
    *((f"encoder.layers.{{layer}}.{a}", f"encoder/layers/{b}", tf) for a, b, tf in _VISION_LAYER),
    ("post_layernorm.weight", "post_layernorm/scale", T.IDENTITY),
    ("post_layernorm.bias", "post_layernorm/bias", T.IDENTITY),
)
_TEXT = (
    ("embed_tokens.weight", "embed_tokens/embedding", T.IDENTITY),
    *((f"layers.{{layer}}.{a}", f"layers/{b}", tf) for a, b, tf in _TEXT_LAYER),
    ("norm.weight", "norm/scale", T.IDENTITY),
)

# (canonical HF name, our path, transform). `{layer}` marks a leaf stacked on axis 0.
_TABLE: tuple[tuple[str, str, Transform], ...] = (
    *((f"vision.{a}", f"vision_tower/{b}", tf) for a, b, tf in _VISION),
    ("projector.linear_1.weight", "multi_modal_projector/linear_1/kernel", T.LINEAR),
    ("projector.linear_1.bias", "multi_modal_projector/linear_1/bias", T.IDENTITY),
    ("projector.linear_2.weight", "multi_modal_projector/linear_2/kernel", T.LINEAR),
    ("projector.linear_2.bias", "multi_modal_projector/linear_2/bias", T.IDENTITY),
    ("image_newline", "image_newline", T.IDENTITY),
    *((f"text.{a}", f"language_model/{b}", tf) for a, b, tf in _TEXT),
    ("lm_head.weight", "language_model/lm_head/kernel", T.LINEAR),
)

_EMBED = "language_model/embed_tokens/embedding"
_LM_HEAD = "language_model/lm_head/kernel"


def _compile(name: str) -> re.Pattern:
    return re.compile(re.escape(name).replace(r"\{layer\}", r"(?P<layer>\d+)") + "$")


_RULES = tuple((_compile(name), name, path, tf) for name, path, tf in _TABLE)

# Input prefix -> canonical prefix; first match wins, so longer/more specific first.
# (lmms-lab, 4.52+ in-memory `model.*`, legacy llava-hf, v5.6+ without `vision_model.`)
_PREFIXES: tuple[tuple[re.Pattern, str], ...] = tuple(
    (re.compile(p), r)
    for p, r in (
        (r"^model\.vision_tower\.vision_tower\.(vision_model\.)?", "vision."),
        (r"^(model\.)?vision_tower\.(vision_model\.)?", "vision."),
        (r"^model\.mm_projector\.0\.", "projector.linear_1."),
        (r"^model\.mm_projector\.2\.", "projector.linear_2."),
        (r"^(model\.)?multi_modal_projector\.", "projector."),
        (r"^(model\.)?image_newline$", "image_newline"),
        (r"^(language_model\.)?lm_head\.", "lm_head."),
        (r"^(language_model\.model|model\.language_model|language_model|model)\.", "text."),
    )
)
_DROPPED = re.compile(r"(^|\.)rotary_emb\.inv_freq$")

# Canonical prefix -> output prefix for `params_to_hf`.
#   "hf": what the installed transformers (5.6+) `save_pretrained` writes.
#   "hf_legacy": llava-hf hub files (transformers 4.45), loadable by 4.x and 5.x.
#   "lmms_lab": the original LLaVA-NeXT checkpoints.
LAYOUTS: dict[str, dict[str, str]] = {
    "hf": {
        "vision.": "vision_tower.",
        "projector.": "multi_modal_projector.",
        "image_newline": "image_newline",
        "text.": "language_model.model.",
        "lm_head.": "language_model.lm_head.",
    },
    "hf_legacy": {
        "vision.": "vision_tower.vision_model.",
        "projector.": "multi_modal_projector.",
        "image_newline": "image_newline",
        "text.": "language_model.model.",
        "lm_head.": "language_model.lm_head.",
    },
    "lmms_lab": {
        "vision.": "model.vision_tower.vision_tower.vision_model.",
        "projector.linear_1.": "model.mm_projector.0.",
        "projector.linear_2.": "model.mm_projector.2.",
        "image_newline": "model.image_newline",
        "text.": "model.",
        "lm_head.": "lm_head.",
    },
}


def param_shapes(cfg: ModelConfig) -> dict:
    """Nested dict of our param shapes (layers stacked on axis 0)."""
    v, t = cfg.vision, cfg.text
    D, Iv, Lv, nv, hv = v.hidden_size, v.intermediate_size, v.num_layers, v.num_heads, v.head_dim
    H, It, Lt, V = t.hidden_size, t.intermediate_size, t.num_layers, t.vocab_size
    nh, kv, hd = t.num_heads, t.num_kv_heads, t.head_dim
    P, C = v.patch_size, v.num_channels
    vattn = {n: {"kernel": (Lv, D, nv, hv), "bias": (Lv, nv, hv)} for n in _QKV}
    vattn["out_proj"] = {"kernel": (Lv, nv, hv, D), "bias": (Lv, D)}
    tattn = {
        "q_proj": {"kernel": (Lt, H, nh, hd), "bias": (Lt, nh, hd)},
        "k_proj": {"kernel": (Lt, H, kv, hd), "bias": (Lt, kv, hd)},
        "v_proj": {"kernel": (Lt, H, kv, hd), "bias": (Lt, kv, hd)},
        "o_proj": {"kernel": (Lt, nh, hd, H)},
    }
    lm = {
        "embed_tokens": {"embedding": (V, H)},
        "layers": {
            "input_layernorm": {"scale": (Lt, H)},
            "post_attention_layernorm": {"scale": (Lt, H)},
            "self_attn": tattn,
            "mlp": {
                "gate_proj": {"kernel": (Lt, H, It)},
                "up_proj": {"kernel": (Lt, H, It)},
                "down_proj": {"kernel": (Lt, It, H)},
            },
        },
        "norm": {"scale": (H,)},
    }
    if not t.tie_word_embeddings:
        lm["lm_head"] = {"kernel": (H, V)}
    return {
        "vision_tower": {
            "embeddings": {
                "patch_embedding": {"kernel": (P, P, C, D), "bias": (D,)},
                "position_embedding": {"embedding": (v.num_patches, D)},
            },
            "encoder": {
                "layers": {
                    "layer_norm1": {"scale": (Lv, D), "bias": (Lv, D)},
                    "layer_norm2": {"scale": (Lv, D), "bias": (Lv, D)},
                    "self_attn": vattn,
                    "mlp": {
                        "fc1": {"kernel": (Lv, D, Iv), "bias": (Lv, Iv)},
                        "fc2": {"kernel": (Lv, Iv, D), "bias": (Lv, D)},
                    },
                },
            },
            "post_layernorm": {"scale": (D,), "bias": (D,)},
        },
        "multi_modal_projector": {
            "linear_1": {"kernel": (D, H), "bias": (H,)},
            "linear_2": {"kernel": (H, H), "bias": (H,)},
        },
        "image_newline": (H,),
        "language_model": lm,
    }


def flatten(tree: Mapping) -> dict[str, Any]:
    """{"a": {"b": x}} -> {"a/b": x}."""
    out = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            out.update({f"{k}/{kk}": vv for kk, vv in flatten(v).items()})
        else:
            out[k] = v
    return out


def unflatten(flat: Mapping[str, Any]) -> dict:
    out: dict = {}
    for path, v in flat.items():
        *parents, leaf = path.split("/")
        node = out
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = v
    return out


def canonical_name(hf_name: str) -> str | None:
    """Any accepted layout's name -> canonical name (None: unknown prefix)."""
    for pattern, repl in _PREFIXES:
        if pattern.match(hf_name):
            return pattern.sub(repl, hf_name, count=1)
    return None


def lookup(hf_name: str) -> tuple[str, int | None, Transform] | None:
    """HF name in any layout -> (our path, layer index or None, transform)."""
    canon = canonical_name(hf_name)
    if canon is None:
        return None
    for pattern, _, path, tf in _RULES:
        m = pattern.match(canon)
        if m:
            layer = m.groupdict().get("layer")
            return path, (None if layer is None else int(layer)), tf
    return None


def _hf_name(name: str, layer: int | None, layout: str) -> str:
    name = name.format(layer=layer)
    for canon_prefix, out_prefix in LAYOUTS[layout].items():
        if name.startswith(canon_prefix):
            return out_prefix + name[len(canon_prefix) :]
    raise AssertionError(name)


def _entries(cfg: ModelConfig) -> Iterator[tuple[str, str, int | None, Transform]]:
    """(canonical name template, path, layer, transform) for every tensor of `cfg`."""
    flat = flatten(param_shapes(cfg))
    for _, name, path, tf in _RULES:
        if path not in flat:
            continue  # lm_head when tied
        if "{layer}" in name:
            yield from ((name, path, i, tf) for i in range(flat[path][0]))
        else:
            yield name, path, None, tf


def _to_numpy(x: Any) -> np.ndarray:
    if callable(x):
        x = x()
    if hasattr(x, "detach"):  # torch.Tensor: numpy() has no bfloat16
        import torch

        x = x.detach().cpu()
        if x.dtype == torch.bfloat16:
            return x.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        return x.numpy()
    return np.asarray(x)


def _shape(x: Any) -> tuple[int, ...]:
    return tuple(int(d) for d in x.shape)


_WORKERS = min(8, os.cpu_count() or 1)  # conversion threads (hf_to_params)


def hf_to_params(
    tensors: Mapping[str, Any],
    cfg: ModelConfig,
    *,
    dtype: str | np.dtype | None = None,
) -> dict:
    """HF state dict (any layout of REFERENCE.md 9) -> nested dict of numpy arrays.

    Values may be arrays, torch tensors, or zero-argument callables returning one.
    Keeps each source dtype unless `dtype` ("float32", "bfloat16", ...) is given.
    Raises one CheckpointError listing every unknown, missing, misshapen or
    doubly-provided tensor.

    Tensors are read and written into their leaves by `_WORKERS` threads: numpy
    releases the GIL while copying, and the transposes of 16-bit kernels are the slow
    part (measured 4.9 s -> 1.5 s for OV-0.5B on 2 cores). Each worker fetches its own
    tensor, so a lazy mapping is read one tensor per worker at a time.
    """
    out_dtype = None if dtype is None else np.dtype(dtype)
    shapes = flatten(param_shapes(cfg))
    tied = cfg.text.tie_word_embeddings
    errors: list[str] = []
    out: dict[str, np.ndarray] = {}
    filled: dict[tuple[str, int | None], str] = {}
    tied_head: tuple[str, np.ndarray] | None = None
    jobs: list[tuple[str, str, int | None, Transform, tuple[int, ...]]] = []

    for key in tensors:
        if _DROPPED.search(key):
            continue
        hit = lookup(key)
        if hit is None:
            errors.append(f"unknown key {key!r}")
            continue
        path, layer, tf = hit
        if (path, layer) in filled:
            at = "" if layer is None else f" layer {layer}"
            errors.append(f"duplicate: {filled[path, layer]!r} and {key!r} both fill {path}{at}")
            continue
        filled[path, layer] = key
        if path == _LM_HEAD and tied:
            tied_head = (key, _to_numpy(tensors[key]))  # checked against embed below
            continue
        full = shapes[path]
        if layer is not None and layer >= full[0]:
            errors.append(f"{key!r}: layer {layer} out of range, config has {full[0]} layers")
            continue
        jobs.append((key, path, layer, tf, full))

    alloc = threading.Lock()

    def fill(job) -> str | None:
        key, path, layer, tf, full = job
        t = full[1:] if layer is not None else full
        x = _to_numpy(tensors[key])
        if _shape(x) != tf.hf_shape(t):
            return f"shape mismatch {key!r}: expected {list(tf.hf_shape(t))}, got {list(_shape(x))}"
        if tf is not Transform.IDENTITY:
            x = np.array(x)  # sequential read first; transposing a file mapping faults ~3x slower
        y = tf.to_ours(x, t)
        if layer is None:
            out[path] = np.array(y, dtype=out_dtype or y.dtype)  # owned copy, not a file view
            return None
        with alloc:
            if path not in out:
                out[path] = np.empty(full, dtype=out_dtype or y.dtype)
        out[path][layer] = y
        return None

    with ThreadPoolExecutor(_WORKERS) as pool:
        errors += [e for e in pool.map(fill, jobs) if e is not None]

    for name, path, layer, _ in _entries(cfg):
        if (path, layer) not in filled:
            at = "" if layer is None else f" layer {layer}"
            errors.append(f"missing {path}{at} (e.g. {_hf_name(name, layer, 'hf')!r})")
    if tied_head is not None and _EMBED in out:
        key, head = tied_head
        if head.shape != out[_EMBED].shape or not np.array_equal(head, out[_EMBED]):
            errors.append(
                f"{key!r} differs from embed_tokens but text.tie_word_embeddings=True "
                "(load with an untied config)"
            )
    if errors:
        raise CheckpointError(
            f"checkpoint does not match config ({len(errors)} problems):\n  " + "\n  ".join(errors)
        )
    return unflatten(out)


def params_to_hf(params: Mapping, cfg: ModelConfig, *, layout: str = "hf") -> dict[str, np.ndarray]:
    """Inverse of `hf_to_params`: nested params -> {HF name: array} in `layout` (LAYOUTS).

    The default writes what the installed transformers' `save_pretrained` writes; a
    tied model gets no lm_head tensor (transformers re-ties on load).
    """
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; choose from {sorted(LAYOUTS)}")
    flat = {k: np.asarray(v) for k, v in flatten(params).items()}  # one host copy per leaf
    shapes = flatten(param_shapes(cfg))
    errors = [f"unexpected param {p}" for p in sorted(set(flat) - set(shapes))]
    errors += [f"missing param {p}" for p in sorted(set(shapes) - set(flat))]
    errors += [
        f"shape mismatch {p}: expected {list(shapes[p])}, got {list(_shape(flat[p]))}"
        for p in sorted(set(flat) & set(shapes))
        if _shape(flat[p]) != shapes[p]
    ]
    if errors:
        raise CheckpointError("params do not match config:\n  " + "\n  ".join(errors))
    out: dict[str, np.ndarray] = {}
    for name, path, layer, tf in _entries(cfg):
        y = flat[path] if layer is None else flat[path][layer]
        out[_hf_name(name, layer, layout)] = tf.to_hf(y)
    return out


def hf_entries(
    cfg: ModelConfig, layout: str = "hf"
) -> Iterator[tuple[str, str, int | None, Transform]]:
    """(HF name in `layout`, our path, layer or None, transform) for every tensor of `cfg`.

    Same order as `params_to_hf`; all layers of one leaf are consecutive, so a writer
    can stream leaf by leaf.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; choose from {sorted(LAYOUTS)}")
    for name, path, layer, tf in _entries(cfg):
        yield _hf_name(name, layer, layout), path, layer, tf


def check_hf_shapes(shapes: Mapping[str, tuple[int, ...]], cfg: ModelConfig) -> list[str]:
    """Every problem `hf_to_params` would report that is visible from names + shapes alone.

    Lets a converter refuse bad input before reading any tensor data (the tied-head
    equality check still needs the data).
    """
    full = flatten(param_shapes(cfg))
    errors: list[str] = []
    filled: dict[tuple[str, int | None], str] = {}
    for key, shape in shapes.items():
        if _DROPPED.search(key):
            continue
        hit = lookup(key)
        if hit is None:
            errors.append(f"unknown key {key!r}")
            continue
        path, layer, tf = hit
        at = "" if layer is None else f" layer {layer}"
        if (path, layer) in filled:
            errors.append(f"duplicate: {filled[path, layer]!r} and {key!r} both fill {path}{at}")
            continue
        filled[path, layer] = key
        if path == _LM_HEAD and cfg.text.tie_word_embeddings:
            t = full[_EMBED][::-1]  # a tied head must match the embedding
        elif layer is not None and layer >= full[path][0]:
            errors.append(f"{key!r}: layer {layer} out of range, config has {full[path][0]} layers")
            continue
        else:
            t = full[path][1:] if layer is not None else full[path]
        if tuple(shape) != tf.hf_shape(t):
            errors.append(
                f"shape mismatch {key!r}: expected {list(tf.hf_shape(t))}, got {list(shape)}"
            )
    for name, path, layer, _ in _entries(cfg):
        if (path, layer) not in filled:
            at = "" if layer is None else f" layer {layer}"
            errors.append(f"missing {path}{at} (e.g. {_hf_name(name, layer, 'hf')!r})")
    return errors
