"""HF <-> lov_jax parameter conversion: the families' key tables filled into
`abstract_params` (docs/style.md 6).

Every accepted HF layout (docs/reference.md 9) is first canonicalised by stripping its
prefix (`_PREFIXES`), then the config's families' key tables (lov_jax/convert/key_tables.py,
picked by lov_jax/models/families.py) map each canonical name to our param path, an
optional layer index (layers are stacked on a leading axis for `nn.scan`) and a
`Transform`. The target of every conversion is `jax.eval_shape` of the model's init: its
leaves are the only paths and shapes there are. The same rows, read backwards, write HF
names.

Canonical scheme: `vision.<tower name without vision_model.>`, `projector.<name>`,
`image_newline`, `text.<decoder model name>`, `lm_head.weight`, and LLaVA-Mini's
`mini.compressor.*` / `mini.prefusion_layers.*` (key_tables.MINI).

LLaVA-1.5 / NeXT (CLIP towers): a checkpoint's tower layers after the feature layer
(`tower_layers`, lov_jax/architectures.py) and its pooler-only norms (`unused_names`) are
skipped on import; an export writes those norms as the identity (`unused_fill`), so the
HF class finds every tensor it builds.
"""

from __future__ import annotations

import functools
import os
import re
import threading
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NamedTuple

import ml_dtypes  # noqa: F401  (registers "bfloat16" with np.dtype)
import numpy as np

from lov_jax.config import ModelConfig
from lov_jax.convert.key_tables import Transform


class CheckpointError(ValueError):
    """A checkpoint does not match the config; the message lists every problem."""


# Input prefix -> canonical prefix; first match wins, so longer/more specific first.
# (original haotian-liu / lmms-lab, 4.52+ in-memory `model.*`, legacy llava-hf, v5.6+
# without `vision_model.`). The original projector is an nn.Sequential (`mm_projector.0`,
# GELU at 1, `.2`) or, for `mm_projector_type=linear`, one unindexed nn.Linear.
_PREFIXES: tuple[tuple[re.Pattern, str], ...] = tuple(
    (re.compile(p), r)
    for p, r in (
        (r"^model\.vision_tower\.vision_tower\.(vision_model\.)?", "vision."),
        (r"^model\.(?=(compressor|prefusion_layers)\.)", "mini."),  # LLaVA-Mini
        (r"^(model\.)?vision_tower\.(vision_model\.)?", "vision."),
        (r"^model\.mm_projector\.0\.", "projector.linear_1."),
        (r"^model\.mm_projector\.2\.", "projector.linear_2."),
        (r"^model\.mm_projector\.(?=(weight|bias)$)", "projector.linear_1."),
        (r"^(model\.)?multi_modal_projector\.", "projector."),
        (r"^(model\.)?image_newline$", "image_newline"),
        (r"^(model\.)?faster_token$", "faster_token"),  # LLaVA-Video SlowFast
        (r"^(language_model\.)?lm_head\.", "lm_head."),
        (r"^(language_model\.model|model\.language_model|language_model|model)\.", "text."),
    )
)
_DROPPED = re.compile(r"(^|\.)rotary_emb\.inv_freq$")

# Canonical prefix -> output prefix for `params_to_hf`.
#   "hf": what the installed transformers (5.6+) `save_pretrained` writes.
#   "hf_legacy": llava-hf hub files (transformers 4.45), loadable by 4.x and 5.x.
#   "lmms_lab": the original LLaVA-NeXT / OneVision checkpoints.
#   "original": haotian-liu LLaVA-1.5 / 1.6 (`LlavaLlamaForCausalLM`): the same names.
LAYOUTS: dict[str, dict[str, str]] = {
    "hf": {
        "vision.": "vision_tower.",
        "projector.": "multi_modal_projector.",
        "image_newline": "image_newline",
        "faster_token": "faster_token",
        "mini.": "model.",  # LLaVA-Mini's parts exist in the original layout only
        "text.": "language_model.model.",
        "lm_head.": "language_model.lm_head.",
    },
    "hf_legacy": {
        "vision.": "vision_tower.vision_model.",
        "projector.": "multi_modal_projector.",
        "image_newline": "image_newline",
        "faster_token": "faster_token",
        "mini.": "model.",  # LLaVA-Mini's parts exist in the original layout only
        "text.": "language_model.model.",
        "lm_head.": "language_model.lm_head.",
    },
    "lmms_lab": {
        "vision.": "model.vision_tower.vision_tower.vision_model.",
        "projector.linear_1.": "model.mm_projector.0.",
        "projector.linear_2.": "model.mm_projector.2.",
        "image_newline": "model.image_newline",
        "faster_token": "model.faster_token",
        "mini.": "model.",
        "text.": "model.",
        "lm_head.": "lm_head.",
    },
}
LAYOUTS["original"] = LAYOUTS["lmms_lab"]
# The original's single-Linear projector (`mm_projector_type=linear`) is not a Sequential.
_UNINDEXED_PROJECTOR = {"projector.linear_1.": "model.mm_projector."}
_SEQUENTIAL_LAYOUTS = ("lmms_lab", "original")

# Where each part sits: (canonical prefix, our module path). An LLM table's names are
# `XForCausalLM`'s: `model.*` is the decoder (canonical `text.*`), `lm_head.*` stays.
_VISION = ("vision.", "vision_tower/")
_PROJECTOR = ("projector.", "multi_modal_projector/")
_LLM = "language_model/"
_LLM_CANON = (("model.", "text."), ("lm_head.", "lm_head."))


class _Rule(NamedTuple):
    pattern: re.Pattern
    name: str  # canonical HF name, `{layer}` for a stacked leaf
    path: str
    tf: Transform


def _compile(name: str) -> re.Pattern:
    return re.compile(re.escape(name).replace(r"\{layer\}", r"(?P<layer>\d+)") + "$")


@functools.cache
def _rules(vision: str, projector: str, llm: str, mini: bool = False) -> tuple[_Rule, ...]:
    from lov_jax.convert.key_tables import MINI
    from lov_jax.models import families

    rows = [(_VISION[0] + a, _VISION[1] + b, tf) for a, b, tf in families.vision(vision).keys]
    rows += [
        (_PROJECTOR[0] + a, _PROJECTOR[1] + b, tf)
        for a, b, tf in families.projector(projector).keys
    ]
    rows.append(("image_newline", "image_newline", Transform.IDENTITY))
    rows.append(("faster_token", "faster_token", Transform.IDENTITY))  # video.faster only
    rows += [("mini." + a, b, tf) for a, b, tf in (MINI if mini else ())]
    for a, b, tf in families.llm(llm).keys:
        hf, canon = next((h, c) for h, c in _LLM_CANON if a.startswith(h))
        rows.append((canon + a[len(hf) :], _LLM + b, tf))
    return tuple(_Rule(_compile(name), name, path, tf) for name, path, tf in rows)


def _rules_of(cfg: ModelConfig) -> tuple[_Rule, ...]:
    return _rules(cfg.vision.kind, cfg.projector, cfg.text.kind, cfg.mini is not None)


def unused_names(cfg: ModelConfig) -> tuple[str, ...]:
    """Canonical names a checkpoint of `cfg` may hold that no leaf stores (the tower
    family's `unused`: CLIP's pooler-only post_layernorm); an import skips them."""
    from lov_jax.models import families

    return tuple(_VISION[0] + n for n in families.vision(cfg.vision.kind).unused)


def _tied(cfg: ModelConfig) -> tuple[str, str] | None:
    """(head path, embedding path) when the head is tied: it is then no param of ours."""
    from lov_jax.models import families

    tied = families.llm(cfg.text.kind).tied
    if tied is None or not cfg.text.tie_word_embeddings:
        return None
    return _LLM + tied[0], _LLM + tied[1]


def llm_leaves(cfg: ModelConfig) -> tuple[str, str]:
    """(head path, embedding path) of the config's LLM in our params tree."""
    from lov_jax.models import families

    head, embed = families.llm(cfg.text.kind).tied
    return _LLM + head, _LLM + embed


def llm_canonical_names(cfg: ModelConfig) -> tuple[str, str]:
    """(head, embedding) canonical HF names (`canonical_name`) of the config's LLM."""
    head, embed = llm_leaves(cfg)
    by_path = {r.path: r.name for r in _rules_of(cfg)}
    return by_path[head], by_path[embed]


def _target_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    # Shapes depend on neither the attention kernel nor remat: one traced init per size.
    return _traced_shapes(cfg.replace(attention_impl="xla", remat_policy="none"))


@functools.lru_cache(maxsize=32)
def _traced_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    from lov_jax.models.llava_onevision import abstract_params

    leaves = flatten(abstract_params(cfg, boxed=False))
    return {path: tuple(int(d) for d in x.shape) for path, x in leaves.items()}


def target_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """{param path: shape} of the model `cfg` builds (the conversion target)."""
    return dict(_target_shapes(cfg))


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


def _lookup(hf_name: str, rules: tuple[_Rule, ...]) -> tuple[str, int | None, Transform] | None:
    """HF name in any layout -> (our path, layer index or None, transform)."""
    canon = canonical_name(hf_name)
    if canon is None:
        return None
    for rule in rules:
        m = rule.pattern.match(canon)
        if m:
            layer = m.groupdict().get("layer")
            return rule.path, (None if layer is None else int(layer)), rule.tf
    return None


def _layout(cfg: ModelConfig, layout: str) -> dict[str, str]:
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; choose from {sorted(LAYOUTS)}")
    if layout in _SEQUENTIAL_LAYOUTS and cfg.projector == "linear":
        return {**_UNINDEXED_PROJECTOR, **LAYOUTS[layout]}  # first match wins
    return LAYOUTS[layout]


def _hf_name(name: str, layer: int | None, prefixes: Mapping[str, str]) -> str:
    name = name.format(layer=layer)
    for canon_prefix, out_prefix in prefixes.items():
        if name.startswith(canon_prefix):
            return out_prefix + name[len(canon_prefix) :]
    raise AssertionError(name)


def _entries(cfg: ModelConfig) -> Iterator[tuple[str, str, int | None, Transform]]:
    """(canonical name template, path, layer, transform) for every tensor of `cfg`."""
    shapes = _target_shapes(cfg)
    for rule in _rules_of(cfg):
        if rule.path not in shapes:
            continue  # lm_head when tied
        if "{layer}" in rule.name:
            yield from ((rule.name, rule.path, i, rule.tf) for i in range(shapes[rule.path][0]))
        else:
            yield rule.name, rule.path, None, rule.tf


class _Match(NamedTuple):
    key: str  # the HF name
    path: str
    layer: int | None
    tf: Transform
    shape: tuple[int, ...]  # our per-layer shape the tensor must fill
    tied: bool  # a tied model's head: checked against the embedding, not stored


def _match(
    keys: Iterator[str], cfg: ModelConfig, tower_layers: int | None = None
) -> tuple[list[_Match], list[str]]:
    """The one key-matching loop: every HF name -> the leaf (and layer) it fills.

    Problems: unknown names, two names filling one leaf, layers past the config's,
    leaves nothing fills. Shapes are the caller's to compare (`_shape_problem`).
    `tower_layers`: the checkpoint's vision tower depth (its config.json); the layers
    after the feature layer (`cfg.vision.num_layers` are kept) are skipped, never read.
    """
    shapes, rules, tied = _target_shapes(cfg), _rules_of(cfg), _tied(cfg)
    unused = set(unused_names(cfg))
    matches: list[_Match] = []
    errors: list[str] = []
    filled: dict[tuple[str, int | None], str] = {}
    for key in keys:
        if _DROPPED.search(key) or canonical_name(key) in unused:
            continue
        hit = _lookup(key, rules)
        if hit is None:
            errors.append(f"unknown key {key!r}")
            continue
        path, layer, tf = hit
        if path not in shapes and (tied is None or path != tied[0]):
            errors.append(f"unexpected key {key!r}: this config has no {path}")
            continue
        if (path, layer) in filled:
            at = "" if layer is None else f" layer {layer}"
            errors.append(f"duplicate: {filled[path, layer]!r} and {key!r} both fill {path}{at}")
            continue
        filled[path, layer] = key
        if tied is not None and path == tied[0]:
            matches.append(_Match(key, path, None, tf, shapes[tied[1]][::-1], True))
            continue
        full = shapes[path]
        if layer is not None and path.startswith(_VISION[1]) and full[0] <= layer:
            if tower_layers is not None and layer < tower_layers:
                continue  # after the feature layer: never run (architectures.py)
        if layer is not None and layer >= full[0]:
            errors.append(f"{key!r}: layer {layer} out of range, config has {full[0]} layers")
            continue
        matches.append(_Match(key, path, layer, tf, full if layer is None else full[1:], False))
    for name, path, layer, _ in _entries(cfg):
        if (path, layer) not in filled:
            at = "" if layer is None else f" layer {layer}"
            errors.append(f"missing {path}{at} (e.g. {_hf_name(name, layer, LAYOUTS['hf'])!r})")
    return matches, errors


def _shape_problem(m: _Match, got: tuple[int, ...]) -> str | None:
    want = m.tf.hf_shape(m.shape)
    if tuple(got) != want:
        return f"shape mismatch {m.key!r}: expected {list(want)}, got {list(got)}"
    return None


def _raise(errors: list[str], what: str) -> None:
    if errors:
        raise CheckpointError(f"{what} ({len(errors)} problems):\n  " + "\n  ".join(errors))


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
    tower_layers: int | None = None,
) -> dict:
    """HF state dict (any layout of docs/reference.md 9) -> nested dict of numpy arrays.

    Values may be arrays, torch tensors, or zero-argument callables returning one.
    Keeps each source dtype unless `dtype` ("float32", "bfloat16", ...) is given.
    Raises one CheckpointError listing every unknown, missing, misshapen or
    doubly-provided tensor. `tower_layers`: the checkpoint's tower depth (`_match`).

    Tensors are read and written into their leaves by `_WORKERS` threads: numpy
    releases the GIL while copying, and the transposes of 16-bit kernels are the slow
    part (measured 4.9 s -> 1.5 s for OV-0.5B on 2 cores). Each worker fetches its own
    tensor, so a lazy mapping is read one tensor per worker at a time.
    """
    out_dtype = None if dtype is None else np.dtype(dtype)
    shapes = _target_shapes(cfg)
    matches, errors = _match(iter(tensors), cfg, tower_layers)
    out: dict[str, np.ndarray] = {}
    tied_heads: list[tuple[_Match, np.ndarray]] = []
    alloc = threading.Lock()

    def fill(m: _Match) -> str | None:
        x = _to_numpy(tensors[m.key])
        problem = _shape_problem(m, _shape(x))
        if problem is not None:
            return problem
        if m.tied:
            tied_heads.append((m, m.tf.to_ours(x, m.shape)))  # compared with the embedding below
            return None
        if m.tf is not Transform.IDENTITY:
            x = np.array(x)  # sequential read first; transposing a file mapping faults ~3x slower
        y = m.tf.to_ours(x, m.shape)
        if m.layer is None:  # overflowing casts: named by import_hf's NumberCheck
            with np.errstate(over="ignore"):
                out[m.path] = np.array(y, dtype=out_dtype or y.dtype)  # owned, not a file view
            return None
        with alloc:
            if m.path not in out:
                out[m.path] = np.empty(shapes[m.path], dtype=out_dtype or y.dtype)
        with np.errstate(over="ignore"):
            out[m.path][m.layer] = y
        return None

    with ThreadPoolExecutor(_WORKERS) as pool:
        errors += [e for e in pool.map(fill, matches) if e is not None]
    tied = _tied(cfg)
    for m, head in tied_heads:
        embed = out.get(tied[1])
        if embed is not None and not np.array_equal(head, embed.T):
            errors.append(
                f"{m.key!r} differs from embed_tokens but text.tie_word_embeddings=True "
                "(load with an untied config)"
            )
    _raise(errors, "checkpoint does not match config")
    return unflatten(out)


def check_params(shapes: Mapping[str, tuple[int, ...]], cfg: ModelConfig) -> list[str]:
    """Every unexpected, missing or misshapen leaf of a {param path: shape} tree."""
    want = _target_shapes(cfg)
    errors = [f"unexpected param {p}" for p in sorted(set(shapes) - set(want))]
    errors += [f"missing param {p}" for p in sorted(set(want) - set(shapes))]
    errors += [
        f"shape mismatch {p}: expected {list(want[p])}, got {list(shapes[p])}"
        for p in sorted(set(want) & set(shapes))
        if tuple(shapes[p]) != want[p]
    ]
    return errors


def params_to_hf(params: Mapping, cfg: ModelConfig, *, layout: str = "hf") -> dict[str, np.ndarray]:
    """Inverse of `hf_to_params`: nested params -> {HF name: array} in `layout` (LAYOUTS).

    The default writes what the installed transformers' `save_pretrained` writes; a
    tied model gets no lm_head tensor (transformers re-ties on load). Unused tensors
    (`unused_fill`) are written too, so the file has every tensor the HF class has.
    """
    prefixes = _layout(cfg, layout)
    flat = {k: np.asarray(v) for k, v in flatten(params).items()}  # one host copy per leaf
    errors = check_params({k: _shape(v) for k, v in flat.items()}, cfg)
    if errors:
        raise CheckpointError("params do not match config:\n  " + "\n  ".join(errors))
    out: dict[str, np.ndarray] = {}
    for name, path, layer, tf in _entries(cfg):
        y = flat[path] if layer is None else flat[path][layer]
        out[_hf_name(name, layer, prefixes)] = tf.to_hf(y)
    dtype = next(v.dtype for k, v in flat.items() if k.startswith(_VISION[1]))
    return {**out, **unused_fill(cfg, layout, dtype)}


def unused_fill(cfg: ModelConfig, layout: str, dtype: np.dtype) -> dict[str, np.ndarray]:
    """{HF name: tensor} for the `unused_names` an export writes: the tower's unused
    norms as the identity LayerNorm (weight 1, bias 0; [vision hidden]). The HF class
    builds them (CLIP's pooler post_layernorm) though no LLaVA output reads them."""
    prefixes = _layout(cfg, layout)
    out = {}
    for name in unused_names(cfg):
        fill = np.ones if name.endswith(".weight") else np.zeros
        out[_hf_name(name, None, prefixes)] = fill((cfg.vision.hidden_size,), dtype)
    return out


def hf_entries(
    cfg: ModelConfig, layout: str = "hf"
) -> Iterator[tuple[str, str, int | None, Transform]]:
    """(HF name in `layout`, our path, layer or None, transform) for every tensor of `cfg`.

    Same order as `params_to_hf`; all layers of one leaf are consecutive, so a writer
    can stream leaf by leaf.
    """
    prefixes = _layout(cfg, layout)
    for name, path, layer, tf in _entries(cfg):
        yield _hf_name(name, layer, prefixes), path, layer, tf


def check_hf_shapes(
    shapes: Mapping[str, tuple[int, ...]], cfg: ModelConfig, tower_layers: int | None = None
) -> list[str]:
    """Every problem `hf_to_params` would report that is visible from names + shapes alone.

    Lets a converter refuse bad input before reading any tensor data (the tied-head
    equality check still needs the data).
    """
    matches, errors = _match(iter(shapes), cfg, tower_layers)
    return errors + [p for m in matches if (p := _shape_problem(m, shapes[m.key])) is not None]
