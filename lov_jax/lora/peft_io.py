"""PEFT adapter directories <-> our adapters (docs/reference_video_post.md 5.4).

An adapter directory, as `PeftModel.from_pretrained(<HF Llava* class>, dir)` reads it:
    adapter_config.json        peft_type LORA, r, lora_alpha, use_rslora, target_modules (a
                               regex over the HF module names that hold adapters),
                               modules_to_save (fully trained modules, e.g. the projector)
    adapter_model.safetensors  base_model.model.<HF module>.lora_A.weight  float[r, in]
                               base_model.model.<HF module>.lora_B.weight  float[out, r]
                               base_model.model.<HF tensor name>           (modules_to_save)
HF module names are the loaded class's (transformers >= 4.52: `model.language_model.
layers.N.self_attn.q_proj`; adapters.HF_MODULE_PREFIXES). On import, any layout
`hf_keys.canonical_name` accepts is read (older `language_model.model.layers.N`, the
original LLaVA's `model.layers.N`), PEFT's in-memory `.default` adapter infix included.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from flax import traverse_util

from lov_jax.config import ModelConfig
from lov_jax.convert.hf_keys import CheckpointError
from lov_jax.lora.adapters import A, B, Lora, LoraConfig, Target, dense_modules, hf_module_name

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
# adapter_config.json fields whose non-default values we cannot reproduce
_UNSUPPORTED = {
    "fan_in_fan_out": False, "use_dora": False, "bias": "none", "rank_pattern": {},
    "alpha_pattern": {}, "layer_replication": None, "lora_bias": False,
    "target_parameters": None, "trainable_token_indices": None, "use_qalora": False,
}  # fmt: skip


def _tensor_table(cfg: ModelConfig) -> dict[str, tuple[str, int | None, object]]:
    """{HF tensor name as the loaded class names it: (our path, layer, Transform)}."""
    from lov_jax.convert import hf_keys

    return {
        hf_module_name(hf_keys.canonical_name(name)): (path, layer, tf)
        for name, path, layer, tf in hf_keys.hf_entries(cfg, "hf")
    }


def _normalise(key: str) -> str | None:
    """A PEFT file key (any accepted layout) -> the loaded class's name, None if alien."""
    from lov_jax.convert import hf_keys

    name = key[len(PREFIX) :] if key.startswith(PREFIX) else key
    name = re.sub(r"\.(lora_[AB])\.default\.", r".\1.", name)
    name = name.replace(".modules_to_save.default.", ".")
    if name.endswith((".lora_A.weight", ".lora_B.weight")):
        module, suffix = name[: -len(".lora_A.weight")], name[-len(".lora_A.weight") :]
        canon = hf_keys.canonical_name(module + ".weight")
        return None if canon is None else hf_module_name(canon)[: -len(".weight")] + suffix
    canon = hf_keys.canonical_name(name)
    return None if canon is None else hf_module_name(canon)


def _target_regex(targets: Mapping[str, Target]) -> str:
    names = sorted(re.escape(t.hf_name).replace(r"\{layer\}", r"\d+") for t in targets.values())
    return "(" + "|".join(names) + ")"


def _modules_to_save(paths) -> list[str]:
    mods = set()
    for path in paths:
        if path[0] == "image_newline":
            raise ValueError(
                "image_newline is trained: PEFT's modules_to_save holds modules, not a bare "
                "parameter; export the merged checkpoint instead (--merge)"
            )
        if path[0] == "language_model":
            raise ValueError(
                f"{'/'.join(path)} is trained outside the adapters; export with --merge"
            )
        mods.add(path[0])  # vision_tower / multi_modal_projector: the HF module's name too
    return sorted(mods)


def export_adapter(
    params: Mapping,
    lora: Lora,
    out: str | Path,
    *,
    trained: Mapping | None = None,
    base_model_name_or_path: str = "",
    dtype=np.float32,
) -> Path:
    """Write a PEFT adapter dir from params holding adapters (`Lora.init` / training).

    trained: other fully trained params (nested; e.g. the projector), saved as PEFT's
    `modules_to_save`. Returns the directory.
    """
    from lov_jax.convert.hf_keys import hf_entries
    from lov_jax.convert.safetensors_io import write_safetensors

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    flat = traverse_util.flatten_dict(params)
    tensors: dict[str, np.ndarray] = {}
    r = lora.config.r
    for module, t in sorted(lora.targets.items()):
        a = np.asarray(flat[(*module.split("/"), A)], np.float32)
        b = np.asarray(flat[(*module.split("/"), B)], np.float32)
        layers = range(a.shape[0]) if t.stacked else [None]
        for i in layers:
            ai, bi = (a, b) if i is None else (a[i], b[i])
            name = PREFIX + t.hf_name.format(layer=i)
            tensors[name + ".lora_A.weight"] = ai.reshape(-1, r).T.astype(dtype)
            tensors[name + ".lora_B.weight"] = bi.reshape(r, -1).T.astype(dtype)
    trained_flat = {"/".join(p): np.asarray(x) for p, x in
                    traverse_util.flatten_dict(trained or {}).items()}  # fmt: skip
    modules = _modules_to_save([tuple(p.split("/")) for p in trained_flat])
    if trained_flat:
        from lov_jax.convert import hf_keys

        for name, path, layer, tf in hf_entries(lora.cfg, "hf"):
            if path in trained_flat:
                y = trained_flat[path] if layer is None else trained_flat[path][layer]
                hf = hf_module_name(hf_keys.canonical_name(name))
                tensors[PREFIX + hf] = tf.to_hf(y).astype(dtype)
    write_safetensors(tensors, out / "tmp")
    (out / "tmp" / "model.safetensors").rename(out / WEIGHTS_NAME)
    (out / "tmp").rmdir()
    c = lora.config
    adapter_config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": c.alpha,
        "lora_dropout": c.dropout, "bias": "none", "target_modules": _target_regex(lora.targets),
        "modules_to_save": modules or None, "fan_in_fan_out": False, "use_rslora": c.use_rslora,
        "inference_mode": True, "base_model_name_or_path": base_model_name_or_path,
    }  # fmt: skip
    (out / CONFIG_NAME).write_text(json.dumps(adapter_config, indent=2) + "\n")
    return out


def read_adapter_config(adapter_dir: str | Path) -> tuple[LoraConfig, dict]:
    path = Path(adapter_dir) / CONFIG_NAME
    if not path.is_file():
        raise CheckpointError(f"{adapter_dir}: no {CONFIG_NAME} (not a PEFT adapter dir)")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not JSON ({e})") from None
    problems = []
    if raw.get("peft_type") != "LORA":
        problems.append(f"peft_type={raw.get('peft_type')!r}: only LORA adapters import")
    for field, default in _UNSUPPORTED.items():
        if raw.get(field, default) not in (default, None) and raw.get(field) != default:
            problems.append(f"{field}={raw[field]!r} is not supported (only {default!r})")
    for field in ("r", "lora_alpha"):
        if not isinstance(raw.get(field), int | float):
            problems.append(f"{field}={raw.get(field)!r}: a number is required")
    if problems:
        raise CheckpointError(f"{path}:\n  " + "\n  ".join(problems))
    lcfg = LoraConfig(
        r=int(raw["r"]), alpha=float(raw["lora_alpha"]), dropout=float(raw.get("lora_dropout", 0)),
        use_rslora=bool(raw.get("use_rslora", False)),
    )  # fmt: skip
    return lcfg, raw


def import_adapter(adapter_dir: str | Path, cfg: ModelConfig) -> tuple[Lora, dict, dict]:
    """(Lora over the adapted layers, adapters tree [our layout, fp32], fully trained params
    from modules_to_save [nested, our layout]). A stacked layer the file leaves out gets
    zero A and B (PEFT's layers_to_transform: no delta there). Every problem (unknown
    keys, shapes) is listed in one CheckpointError."""
    from lov_jax.convert.hf_keys import target_shapes
    from lov_jax.convert.safetensors_io import read_safetensors

    adapter_dir = Path(adapter_dir)
    lcfg, _ = read_adapter_config(adapter_dir)
    weights = adapter_dir / WEIGHTS_NAME
    if not weights.is_file():
        raise CheckpointError(f"{adapter_dir}: no {WEIGHTS_NAME}")
    tensors = read_safetensors(weights)
    modules = dense_modules(cfg)
    layer_re = {
        re.compile(re.escape(t.hf_name).replace(r"\{layer\}", r"(?P<layer>\d+)") + "$"): t
        for t in modules.values()
    }
    table = _tensor_table(cfg)
    shapes = target_shapes(cfg)
    problems: list[str] = []
    factors: dict[tuple[str, str], dict[int | None, np.ndarray]] = {}
    trained: dict[str, dict[int | None, np.ndarray]] = {}
    for key in tensors:
        name = _normalise(key)
        if name is None:
            problems.append(f"{key}: not a tensor of this model")
            continue
        if name.endswith((".lora_A.weight", ".lora_B.weight")):
            module, which = name[: -len(".lora_A.weight")], name[-len("A.weight")]
            hit = next(((t, m) for p, t in layer_re.items() if (m := p.match(module))), None)
            if hit is None:
                problems.append(f"{key}: no dense layer {module} to adapt")
                continue
            t, m = hit
            layer = int(m.group("layer")) if t.stacked else None
            factors.setdefault((t.path, which), {})[layer] = np.asarray(tensors[key], np.float32)
        elif name in table:
            path, layer, tf = table[name]
            full = shapes[path]
            per = full[1:] if layer is not None else full
            x = np.asarray(tensors[key])
            if tuple(x.shape) != tuple(tf.hf_shape(per)):
                problems.append(f"{key}: shape {list(x.shape)}, expected {list(tf.hf_shape(per))}")
                continue
            trained.setdefault(path, {})[layer] = tf.to_ours(x, per)
        else:
            problems.append(f"{key}: not a tensor of this model")
    paths = sorted({p for p, _ in factors})
    if not paths:
        problems.append(f"{weights}: no lora_A / lora_B tensors")
    targets = {p: modules[p] for p in paths}
    r = lcfg.r
    adapters: dict[tuple[str, ...], np.ndarray] = {}
    for p in paths:
        t = targets[p]
        kernel = shapes[p + "/kernel"]
        per = kernel[1:] if t.stacked else kernel
        ins, outs = per[: t.n_in], per[t.n_in :]
        got_a, got_b = factors.get((p, "A"), {}), factors.get((p, "B"), {})
        if set(got_a) != set(got_b):
            problems.append(f"{t.hf_name}: lora_A and lora_B cover different layers")
            continue
        for leaf, got, want, shape in (
            (A, got_a, (r, math.prod(ins)), (*ins, r)),
            (B, got_b, (math.prod(outs), r), (r, *outs)),
        ):
            bad = [layer for layer, w in got.items() if tuple(w.shape) != want]
            bad += [layer for layer in got if t.stacked and layer >= kernel[0]]
            for layer in bad:
                problems.append(
                    f"{t.hf_name.format(layer=layer)}.lora_{leaf[-1].upper()}.weight: shape "
                    f"{list(got[layer].shape)}, expected {list(want)} (r={r}, "
                    f"{kernel[0] if t.stacked else 1} layers)"
                )
            if bad:
                continue
            # PEFT [r, in] / [out, r] -> ours [*in, r] / [r, *out]
            if not t.stacked:
                adapters[(*p.split("/"), leaf)] = got[None].T.reshape(shape)
                continue
            stack = np.zeros((kernel[0], *shape), np.float32)  # absent layers: no delta
            for layer, w in got.items():
                stack[layer] = w.T.reshape(shape)
            adapters[(*p.split("/"), leaf)] = stack
    trained_tree = {}
    for path, layers in trained.items():
        if None in layers:
            trained_tree[path] = layers[None]
        else:
            n = shapes[path][0]
            if set(layers) != set(range(n)):
                problems.append(f"{path}: modules_to_save holds layers {sorted(layers)} of {n}")
                continue
            trained_tree[path] = np.stack([layers[i] for i in range(n)])
    if problems:
        raise CheckpointError(f"cannot import {adapter_dir}:\n  " + "\n  ".join(problems))
    regex = "(" + "|".join(re.escape(p) for p in paths) + ")"
    lora = Lora(LoraConfig(**{**_fields(lcfg), "targets": regex}), cfg)
    nested = {k: v for k, v in traverse_util.unflatten_dict(adapters).items()}
    flat_trained = {tuple(k.split("/")): v for k, v in trained_tree.items()}
    return lora, nested, traverse_util.unflatten_dict(flat_trained)


def _fields(lcfg: LoraConfig) -> dict:
    return {
        "r": lcfg.r, "alpha": lcfg.alpha, "dropout": lcfg.dropout,
        "use_rslora": lcfg.use_rslora,
    }  # fmt: skip


def apply_adapter(base: Mapping, adapter_dir: str | Path, cfg: ModelConfig) -> dict:
    """Base params + a PEFT adapter dir -> merged params (numpy): modules_to_save
    replace their base tensors, then W + scaling * A B."""
    lora, adapters, trained = import_adapter(adapter_dir, cfg)
    flat = traverse_util.flatten_dict(base)
    flat.update(traverse_util.flatten_dict(trained))
    flat.update(traverse_util.flatten_dict(adapters))
    return lora.merge(traverse_util.unflatten_dict(flat))
