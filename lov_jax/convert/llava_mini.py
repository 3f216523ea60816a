"""LLaVA-Mini's config.json <-> ModelConfig (docs/reference_family.md B.9.2).

The released `ICTNLP/llava-mini-llama-3.1-8b` config.json is the original LLaVA layout
(one flat LlamaConfig + `mm_*` keys, lov_jax/architectures.py) with model_type
`llava_mini_llama` and three more keys: `compressor_size` (C), `prefusion_layer_num` and
`resolution_ratio` (read with default 1, as the reference's eval scripts do). Its tower
is named by `mm_vision_tower` (a known hub name or a local dir); an export here also
writes the kept tower inline as `vision_config` (with `mm_vision_select_layer` -1), so a
checkpoint's stored config reads back with no tower directory. The parameter names are
the original layout's plus `model.compressor.*` / `model.prefusion_layers.*`
(lov_jax/convert/key_tables.py MINI; hf_keys layout "original").
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from lov_jax.config import MiniConfig, ModelConfig

MODEL_TYPE = "llava_mini_llama"
CLASS = "LlavaMiniLlamaForCausalLM"
_MINI_KEYS = {"compressor_size", "prefusion_layer_num", "resolution_ratio"}
# Training bookkeeping train() writes (B.9.2): no effect on the model we build.
_IGNORED = {
    "tokenizer_padding_side", "tokenizer_model_max_length", "tune_mm_mlp_adapter",
    "freeze_mm_mlp_adapter", "mm_projector_lr", "mm_hidden_size", "mm_vision_tower_lr",
    "pretrain_mm_mlp_adapter", "mm_use_im_start_end", "mm_use_im_patch_token", "use_mm_proj",
    "freeze_compressor", "mm_patch_merge_type",
}  # fmt: skip
# Keys whose only supported value is the reference's (anything else changes the model).
_FIXED = {
    "mm_use_im_start_end": False, "mm_use_im_patch_token": False, "use_mm_proj": True,
    "mm_patch_merge_type": "flat", "mm_vision_select_feature": "patch",
}  # fmt: skip
_ASPECTS = {"square": "center_crop", "pad": "pad"}


def is_mini(hf: dict) -> bool:
    """A LLaVA-Mini config.json (its model_type, class or `compressor_size`)."""
    return (
        hf.get("model_type") == MODEL_TYPE
        or CLASS in (hf.get("architectures") or [])
        or "compressor_size" in hf
    )


def _fail(source: str, field: str, value: Any, why: str) -> ValueError:
    return ValueError(f"{source}: {field}={value!r}: {why}")


def from_hf_config(
    hf: dict,
    *,
    checkpoint_dir: str | Path | None = None,
    source: str = "config.json",
    **overrides: Any,
) -> ModelConfig:
    """ModelConfig of a LLaVA-Mini config.json; every mm_* / mini key is validated."""
    from lov_jax import architectures
    from lov_jax.models import families

    for key, want in _FIXED.items():
        if key in hf and hf[key] != want:
            raise _fail(source, key, hf[key], f"LLaVA-Mini supports only {want!r}")
    for key in sorted(k for k in hf if k.startswith("mm_")):
        if key not in _IGNORED | set(_FIXED) | {"mm_vision_tower", "mm_projector_type",
                                                 "mm_vision_select_layer"}:  # fmt: skip
            raise _fail(source, key, hf[key], "unknown LLaVA-Mini key")
    ints = {}
    for key, default in (("compressor_size", 2), ("prefusion_layer_num", 4),
                         ("resolution_ratio", 1)):  # fmt: skip
        value = hf.get(key, default)  # build_compressor's defaults
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise _fail(source, key, value, "an int >= 1")
        ints[key] = value
    if "vision_config" in hf:  # our export: the kept tower inline
        vision, layer = hf["vision_config"], hf.get("mm_vision_select_layer", -1)
    else:
        path = None if checkpoint_dir is None else Path(checkpoint_dir)
        if "mm_vision_tower" not in hf:
            raise _fail(source, "mm_vision_tower", None, "names no vision tower")
        vision, _ = architectures.tower_config(hf["mm_vision_tower"], path, source)
        layer = hf.get("mm_vision_select_layer", -2)
    total = vision.get("num_hidden_layers", 12)
    kept = layer if isinstance(layer, int) and layer >= 0 else total + 1 + layer
    if isinstance(layer, bool) or not isinstance(layer, int) or not 1 <= kept <= total:
        raise _fail(source, "mm_vision_select_layer", layer, f"no layer of a {total}-layer tower")
    aspect = hf.get("image_aspect_ratio", "square")
    if aspect not in _ASPECTS:
        raise _fail(source, "image_aspect_ratio", aspect, f"not one of {sorted(_ASPECTS)}")
    text = {k: v for k, v in hf.items() if not k.startswith("mm_") and k != "vision_config"}
    try:
        vis = families.by_hf_model_type(families.VISION, "vision tower",
                                        vision.get("model_type")).from_hf(vision)  # fmt: skip
        llm = families.llm("llama").from_hf(text)
        projector = families.projector(hf.get("mm_projector_type", "mlp2x_gelu")).from_hf(hf)
        mini = MiniConfig(
            compressor_size=ints["compressor_size"],
            prefusion_layers=ints["prefusion_layer_num"],
            resolution_ratio=ints["resolution_ratio"],
        )
        return ModelConfig(
            vision=dataclasses.replace(vis, num_layers=kept, feature_select="default"),
            text=llm,
            projector=projector,
            architecture="llava_mini",
            mini=mini,
            vision_aspect_ratio=_ASPECTS[aspect],
            **overrides,
        )
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from e


def to_hf_config(cfg: ModelConfig) -> dict:
    """The released layout's config.json of `cfg`, plus the kept tower inline."""
    from lov_jax.models import families

    out = dict(families.llm(cfg.text.kind).to_hf(cfg.text))
    if cfg.token_ids is not None:
        ids = cfg.token_ids
        out.update(
            bos_token_id=ids.bos,
            eos_token_id=ids.eos[0] if len(ids.eos) == 1 else list(ids.eos),
            pad_token_id=ids.pad,
        )
    out.update(
        architectures=[CLASS],
        model_type=MODEL_TYPE,
        mm_vision_tower="openai/clip-vit-large-patch14-336",  # what the reference loads
        vision_config=families.vision(cfg.vision.kind).to_hf(cfg.vision),
        mm_vision_select_layer=-1,  # vision_config holds only the kept layers
        mm_vision_select_feature="patch",
        mm_hidden_size=cfg.vision.hidden_size,
        mm_projector_type=cfg.projector,
        mm_patch_merge_type="flat",
        use_mm_proj=True,
        image_aspect_ratio={v: k for k, v in _ASPECTS.items()}[cfg.vision_aspect_ratio],
        compressor_size=cfg.mini.compressor_size,
        prefusion_layer_num=cfg.mini.prefusion_layers,
        resolution_ratio=cfg.mini.resolution_ratio,
    )
    return out
