"""config.json <-> ModelConfig at the architecture level (docs/reference.md 8; the LLaVA
family's fields: ../shared/REFERENCE_FAMILY.md A.8).

The families registry (lov_jax/models/families.py) reads and writes the parts: the
`vision_config`, the `text_config` and the projector keys. This module reads the rest of
a config.json, for each `ModelConfig.architecture`:

  llava            transformers `LlavaConfig` (model_type "llava"): LLaVA-1.5
  llava_next       `LlavaNextConfig` ("llava_next"): LLaVA-NeXT / 1.6, anyres crops
  llava_onevision  `LlavaOnevisionConfig` ("llava_onevision")
  llava_next_video `LlavaNextVideoConfig` ("llava_next_video"): NeXT + pooled video frames

and the original layout of haotian-liu/LLaVA and LLaVA-VL/LLaVA-NeXT: one flat LLM config
(model_type "llava_llama" / "llava_mistral" / "llava_qwen", or "llava" with an
`architectures` entry naming the LLM) plus `mm_*` keys; its tower's config is not in the
file but named by `mm_vision_tower` (a local CLIPVisionModel / SiglipVisionModel dir, as
the original `CLIPVisionTower.from_pretrained` reads it, or a known hub name).

Two translations are not one to one:
- `vision_feature_layer` (orig `mm_vision_select_layer`) becomes the number of tower
  layers we keep: HF's `hidden_states` has L + 1 entries (the embeddings, then one per
  layer), so layer k >= 0 keeps k layers and k < 0 keeps L + 1 + k (LLaVA's -2 on CLIP-L:
  23 of 24). Exports write `num_hidden_layers` = kept and `vision_feature_layer` = -1,
  which transformers computes identically.
- Original NeXT `image_grid_pinpoints` are (width, height) pairs (orig mm_utils.py
  `select_best_resolution`); ours and HF's are (height, width), so they are transposed
  on read. (The llava-hf converter copied them unchanged, which is why llava-hf and the
  original pick transposed grids for small images, REFERENCE_FAMILY.md A.7.5.)

Every field is validated; an unsupported value is a ValueError naming the field and file.
"""

from __future__ import annotations

import ast
import dataclasses
import json
from pathlib import Path
from typing import Any

from lov_jax.config import (
    ANYRES_GRID_PINPOINTS,
    NEXT_GRID_PINPOINTS,
    NEXT_VIDEO,
    ModelConfig,
    VideoConfig,
)
from lov_jax.config_types import check_config_json
from lov_jax.convert import llava_mini

# architecture -> (config.json model_type, transformers class)
HF_NAMES: dict[str, tuple[str, str]] = {
    "llava": ("llava", "LlavaForConditionalGeneration"),
    "llava_next": ("llava_next", "LlavaNextForConditionalGeneration"),
    "llava_onevision": ("llava_onevision", "LlavaOnevisionForConditionalGeneration"),
    "llava_next_video": ("llava_next_video", "LlavaNextVideoForConditionalGeneration"),
}
# transformers' sub-config defaults when a config.json omits one (LlavaConfig /
# LlavaNextConfig `sub_configs_defaults`; LlavaOnevisionConfig: SigLIP + Qwen-2).
_DEFAULT_VISION = {
    "llava": {
        "model_type": "clip_vision_model", "hidden_size": 1024, "intermediate_size": 4096,
        "patch_size": 14, "image_size": 336, "num_hidden_layers": 24, "num_attention_heads": 16,
    },
    "llava_onevision": {
        "model_type": "siglip_vision_model", "hidden_size": 1152, "intermediate_size": 4304,
        "patch_size": 14, "image_size": 384, "num_hidden_layers": 26, "num_attention_heads": 16,
    },
}  # fmt: skip
_DEFAULT_VISION["llava_next"] = _DEFAULT_VISION["llava_next_video"] = _DEFAULT_VISION["llava"]
_DEFAULT_TEXT_TYPE = {"llava": "llama", "llava_next": "llama", "llava_onevision": "qwen2",
                      "llava_next_video": "llama"}  # fmt: skip
# LlavaNextConfig's pinpoints when config.json has none: config.NEXT_GRID_PINPOINTS.
# LLaVA-1.5 has no grid; its default only keeps configs comparable.
_DEFAULT_PINPOINTS = {
    "llava": NEXT_GRID_PINPOINTS, "llava_next": NEXT_GRID_PINPOINTS,
    "llava_onevision": ANYRES_GRID_PINPOINTS, "llava_next_video": NEXT_GRID_PINPOINTS,
}  # fmt: skip
_DEFAULT_ASPECT = {
    "llava": "center_crop",
    "llava_next": "anyres",
    "llava_onevision": "anyres_max_9",
    "llava_next_video": "anyres",
}

# ---- the original (haotian-liu / LLaVA-VL) flat layout --------------------------------

# Original LLM classes (config.json `architectures[0]` / model_type) -> HF LLM model_type.
_ORIGINAL_LLMS = {
    "LlavaLlamaForCausalLM": "llama", "LlavaMistralForCausalLM": "mistral",
    "LlavaQwenForCausalLM": "qwen2", "llava_llama": "llama", "llava_mistral": "mistral",
    "llava_qwen": "qwen2",
}  # fmt: skip
# Towers the original code loads by hub name (their CLIPVisionConfig / SiglipVisionConfig).
_CLIP_L = {
    "model_type": "clip_vision_model", "hidden_size": 1024, "intermediate_size": 4096,
    "num_hidden_layers": 24, "num_attention_heads": 16, "patch_size": 14,
    "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5,
}  # fmt: skip
KNOWN_TOWERS: dict[str, dict] = {
    "openai/clip-vit-large-patch14-336": {**_CLIP_L, "image_size": 336},
    "openai/clip-vit-large-patch14": {**_CLIP_L, "image_size": 224},
    "google/siglip-so400m-patch14-384": {
        "model_type": "siglip_vision_model", "hidden_size": 1152, "intermediate_size": 4304,
        "num_hidden_layers": 27, "num_attention_heads": 16, "patch_size": 14,
        "image_size": 384, "hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": 1e-6,
    },
}  # fmt: skip
# LLaVA-Video's video keys (REFERENCE_VIDEO_POST.md 2.2-2.4) -> VideoConfig fields. Read
# from original configs and from OneVision ones (we write them there when they differ
# from HF's OneVision video: transformers ignores them, so HF runs such a checkpoint's
# videos as 2x2 bilinear + one newline).
_VIDEO_KEYS = (
    ("mm_spatial_pool_mode", "pool_mode"), ("mm_spatial_pool_stride", "pool_stride"),
    ("mm_newline_position", "newline"), ("add_faster_video", "faster"),
    ("faster_token_stride", "faster_stride"),
)  # fmt: skip
# mm_* keys that do not change the model we build (training bookkeeping), and those whose
# only supported value is the one given (anything else would change the token stream).
_ORIGINAL_IGNORED = {
    "mm_hidden_size", "mm_projector_lr", "mm_vision_tower_lr", "mm_tunable_parts",
    "mm_spatial_pool_out_channels",  # the width of a conv pooler only (we refuse conv)
}  # fmt: skip
_ORIGINAL_FIXED = {
    "mm_use_im_start_end": False, "mm_use_im_patch_token": False, "use_mm_proj": True,
    "s2": False,
}  # fmt: skip
_ORIGINAL_READ = {
    "mm_vision_tower", "mm_projector_type", "mm_vision_select_layer",
    "mm_vision_select_feature", "mm_patch_merge_type", "mm_resampler_type",
    *(k for k, _ in _VIDEO_KEYS),
}  # fmt: skip
_SELECT_FEATURES = {"patch": "default", "cls_patch": "full"}


def _fail(source: str, field: str, value: Any, why: str) -> ValueError:
    return ValueError(f"{source}: {field}={value!r}: {why}")


def is_original(hf: dict) -> bool:
    """An original LLaVA config.json: one flat LLM config with `mm_*` keys."""
    return "text_config" not in hf and "mm_vision_tower" in hf


def architecture_of(hf: dict, source: str = "config.json") -> str:
    """The ModelConfig.architecture a config.json describes (HF or original layout)."""
    if is_original(hf):
        return _original_architecture(hf, source)
    model_type = hf.get("model_type")
    classes = hf.get("architectures") or []
    named = [a for a, (_, cls) in HF_NAMES.items() if cls in classes]
    if named:  # the class wins: some early llava-hf NeXT copies say model_type "llava"
        return named[0]
    hits = [a for a, (mt, _) in HF_NAMES.items() if mt == model_type]
    if not hits:
        known = sorted(mt for mt, _ in HF_NAMES.values())
        raise _fail(
            source,
            "model_type",
            model_type,
            f"not one of {known} (nor an original LLaVA config: no mm_vision_tower)",
        )
    return hits[0]


def hf_class_name(architecture: str) -> str:
    """The transformers class that loads an export of `architecture`."""
    return HF_NAMES[architecture][1]


def hf_class(architecture: str):
    """That transformers class itself (imports transformers)."""
    import transformers

    return getattr(transformers, hf_class_name(architecture))


def _feature_layers(vision: dict, layer: Any, field: str, source: str) -> int:
    """Tower layers kept for `hidden_states[layer]` of an L-layer tower (module docstring)."""
    total = vision.get("num_hidden_layers", 12)
    if isinstance(layer, bool) or not isinstance(layer, int):
        raise _fail(source, field, layer, "one int supported (a list of layers is not)")
    kept = layer if layer >= 0 else total + 1 + layer
    if not 1 <= kept <= total:
        raise _fail(
            source,
            field,
            layer,
            f"selects no layer of a {total}-layer tower (valid: 1..L or -L..-1)",
        )
    return kept


def _pinpoints(value: Any, source: str, field: str, transpose: bool = False) -> tuple:
    if isinstance(value, str):  # the original code accepts a Python literal string
        try:
            value = ast.literal_eval(value)
        except (ValueError, SyntaxError) as e:
            raise _fail(source, field, value, f"not a list of [h, w] pairs ({e})") from e
    ok = (
        isinstance(value, (list, tuple))
        and value
        and all(
            isinstance(p, (list, tuple))
            and len(p) == 2
            and all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in p)
            for p in value
        )
    )
    if not ok:
        raise _fail(source, field, value, "not a non-empty list of positive [h, w] int pairs")
    return tuple((w, h) if transpose else (h, w) for h, w in value)


def _video_config(hf: dict, arch: str, source: str) -> VideoConfig:
    """The VideoConfig of a config.json: HF NeXT-Video's `spatial_pool_*`, or the
    LLaVA-Video keys (`_VIDEO_KEYS`) of an original / OneVision config."""
    if arch == "llava_next_video":  # HF spatial_pool_*, original mm_spatial_pool_*
        key = "mm_spatial_pool_" if is_original(hf) else "spatial_pool_"
        mode = hf.get(key + "mode", "average")
        if mode not in ("average", "max"):
            why = "only 'average' / 'max' (no released checkpoint has conv pooler weights)"
            raise _fail(source, key + "mode", mode, why)
        fields = {"pool_mode": mode, "pool_stride": hf.get(key + "stride", 2)}
        base = NEXT_VIDEO
    else:
        fields = {f: hf[k] for k, f in _VIDEO_KEYS if k in hf}
        base = VideoConfig()
        # LLaVA-NeXT main's get_2dPool always pools at its default stride 2: the stride
        # is read only on the designed SlowFast path (encode_multimodals)
        if is_original(hf) and not fields.get("faster"):
            fields.pop("pool_stride", None)
    for field, value in fields.items():
        kind = type(getattr(base, field))
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            key = next((k for k, f in _VIDEO_KEYS if f == field), field)
            raise _fail(source, key, value, f"not a {kind.__name__}")
    try:
        return dataclasses.replace(base, **fields)
    except ValueError as e:
        keys = [k for k in (*(k for k, _ in _VIDEO_KEYS), "spatial_pool_stride") if k in hf]
        raise ValueError(f"{source}: {', '.join(keys)}: {e}") from e


def _video_to_hf(cfg: ModelConfig, original: bool = False) -> dict:
    """The keys that give `cfg.video` back through `_video_config`."""
    v = cfg.video
    if cfg.architecture == "llava_next_video":
        if dataclasses.replace(v, pool_mode="average", pool_stride=2) != NEXT_VIDEO:
            raise ValueError(f"LlavaNextVideoConfig cannot express video {v}: only its pool")
        return {"spatial_pool_mode": v.pool_mode, "spatial_pool_stride": v.pool_stride}
    if original and v.pool_stride != 2 and not v.faster:
        raise ValueError(f"video pool_stride {v.pool_stride}: the original pools at 2 "
                         "unless add_faster_video")  # fmt: skip
    default = VideoConfig()
    return {k: getattr(v, f) for k, f in _VIDEO_KEYS
            if original or getattr(v, f) != getattr(default, f)}  # fmt: skip


def _with_type(d: dict | None, default: dict) -> dict:
    d = dict(default if d is None else d)
    d.setdefault("model_type", default["model_type"])
    return d


def from_hf_config(
    hf: dict,
    *,
    checkpoint_dir: str | Path | None = None,
    source: str | None = None,
    **overrides: Any,
) -> ModelConfig:
    """ModelConfig from a config.json dict (any layout above).

    `checkpoint_dir`: the dir it came from (an original config's relative
    `mm_vision_tower` is looked up there); `source` names the file in errors. Token ids
    are not read here (they need generation_config.json and the tokenizer too,
    `lov_jax.token_ids.read_token_ids`); pass them as `token_ids=`."""
    checkpoint_dir = None if checkpoint_dir is None else Path(checkpoint_dir)
    if source is None:
        source = "config.json" if checkpoint_dir is None else str(checkpoint_dir / "config.json")
    if not isinstance(hf, dict):
        raise ValueError(f"{source}: not a JSON object")
    if llava_mini.is_mini(hf):  # the original layout + compressor keys
        return llava_mini.from_hf_config(hf, checkpoint_dir=checkpoint_dir, source=source,
                                         **overrides)  # fmt: skip
    check_config_json(hf, source)  # field types, before any is read
    if is_original(hf):
        return _from_original(hf, source, checkpoint_dir, overrides)
    arch = architecture_of(hf, source)
    vision = _with_type(hf.get("vision_config"), _DEFAULT_VISION[arch])
    text = dict(hf.get("text_config") or {})
    text.setdefault("model_type", _DEFAULT_TEXT_TYPE[arch])
    strategy = hf.get(
        "vision_feature_select_strategy", "full" if arch == "llava_onevision" else "default"
    )
    kept = _feature_layers(
        vision,
        hf.get("vision_feature_layer", -1 if arch == "llava_onevision" else -2),
        "vision_feature_layer",
        source,
    )
    aspect_key = "vision_aspect_ratio" if arch == "llava_onevision" else "image_aspect_ratio"
    fields: dict[str, Any] = {"vision_aspect_ratio": hf.get(aspect_key, _DEFAULT_ASPECT[arch])}
    fields["video"] = _video_config(hf, arch, source)
    points = hf.get("image_grid_pinpoints") or _DEFAULT_PINPOINTS[arch]
    fields["image_grid_pinpoints"] = _pinpoints(points, source, "image_grid_pinpoints")
    if (
        arch in ("llava_next", "llava_next_video")
        and hf.get("use_image_newline_parameter", True) is not True
    ):
        raise _fail(
            source,
            "use_image_newline_parameter",
            hf["use_image_newline_parameter"],
            "LLaVA-NeXT always learns its image_newline",
        )
    parts = {**hf, "vision_config": vision, "text_config": text}
    return _build(
        parts, arch, strategy, "vision_feature_select_strategy", kept, fields, source, overrides
    )


def _build(parts, arch, strategy, strategy_field, kept, fields, source, overrides):
    from lov_jax.models import families

    try:
        vision, text, projector = families.config_parts_from_hf(parts)
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from e
    if strategy not in ("default", "full"):
        raise _fail(source, strategy_field, strategy, "not 'default' (drop CLS) or 'full'")
    if strategy == "default" and not vision.has_cls:
        raise _fail(
            source,
            strategy_field,
            strategy,
            f"'default' would drop a real patch: "
            f"the {vision.kind} tower has no CLS token (use 'full')",
        )
    vision = dataclasses.replace(
        vision, num_layers=kept, feature_select="default" if strategy == "default" else "full"
    )
    if parts.get("tie_word_embeddings"):  # LlavaConfig: a tied text_config ties the model
        text = dataclasses.replace(text, tie_word_embeddings=True)
    try:
        return ModelConfig(
            vision=vision,
            text=text,
            projector=projector,
            architecture=arch,
            **{**fields, **overrides},
        )
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from e


# ---- original layout ------------------------------------------------------------------


def _original_architecture(hf: dict, source: str) -> str:
    aspect = hf.get("image_aspect_ratio", "square")
    merge = hf.get("mm_patch_merge_type", "flat")
    resampler = hf.get("mm_resampler_type")
    if resampler is not None:  # LLaVA-NeXT-Video (lmms-lab, video_inference branch)
        if resampler != "spatial_pool" or aspect != "anyres" or merge != "spatial_unpad":
            raise _fail(source, "mm_resampler_type", resampler,
                        "only 'spatial_pool' with image_aspect_ratio 'anyres' and "
                        "mm_patch_merge_type 'spatial_unpad' (LLaVA-NeXT-Video)")  # fmt: skip
        return "llava_next_video"
    if isinstance(aspect, str) and aspect.startswith("anyres_max_"):
        return "llava_onevision"
    if aspect == "anyres":
        if merge != "spatial_unpad":
            raise _fail(
                source,
                "mm_patch_merge_type",
                merge,
                "anyres is supported with 'spatial_unpad' only (LLaVA-NeXT)",
            )
        return "llava_next"
    if aspect not in ("pad", "square"):
        raise _fail(
            source, "image_aspect_ratio", aspect, "not 'pad', 'square', 'anyres' or 'anyres_max_N'"
        )
    if merge != "flat":
        raise _fail(
            source,
            "mm_patch_merge_type",
            merge,
            f"image_aspect_ratio={aspect!r} takes one crop per image: only 'flat' applies",
        )
    return "llava"


def tower_config(name: Any, checkpoint_dir: Path | None, source: str) -> tuple[dict, Path | None]:
    """(vision_config dict, local tower dir or None) that `mm_vision_tower` names.

    A local dir (absolute, or relative to the checkpoint dir) with a config.json wins, as
    in the original `build_vision_tower`; else one of KNOWN_TOWERS."""
    if not isinstance(name, str) or not name:
        raise _fail(source, "mm_vision_tower", name, "not a tower name or directory")
    for d in (Path(name), *((checkpoint_dir / name,) if checkpoint_dir else ())):
        if (d / "config.json").is_file():
            cfg = json.loads((d / "config.json").read_text())
            return cfg.get("vision_config", cfg), d  # a full CLIPModel config nests it
    if name in KNOWN_TOWERS:
        return dict(KNOWN_TOWERS[name]), None
    raise _fail(
        source,
        "mm_vision_tower",
        name,
        f"neither a local tower directory with a config.json nor one of {sorted(KNOWN_TOWERS)}",
    )


def _from_original(
    hf: dict, source: str, checkpoint_dir: Path | None, overrides: dict
) -> ModelConfig:
    arch = _original_architecture(hf, source)
    for key in sorted(k for k in hf if k.startswith("mm_")):
        if key not in _ORIGINAL_READ | _ORIGINAL_IGNORED | set(_ORIGINAL_FIXED):
            raise _fail(source, key, hf[key], "unknown original LLaVA key")
    for key, want in _ORIGINAL_FIXED.items():
        if key in hf and hf[key] != want:
            raise _fail(source, key, hf[key], f"only {want!r} is supported")
    llm_name = (hf.get("architectures") or [None])[0]
    llm = _ORIGINAL_LLMS.get(llm_name) or _ORIGINAL_LLMS.get(hf.get("model_type"))
    if llm is None:
        classes = sorted(k for k in _ORIGINAL_LLMS if "For" in k)
        why = f"names no known original LLaVA LLM class ({classes})"
        raise _fail(source, "architectures", hf.get("architectures"), why)
    vision, _ = tower_config(hf["mm_vision_tower"], checkpoint_dir, source)
    text = {k: v for k, v in hf.items() if not k.startswith("mm_")}
    text["model_type"] = llm
    feature = hf.get("mm_vision_select_feature", "patch")
    if feature not in _SELECT_FEATURES:
        raise _fail(source, "mm_vision_select_feature", feature, f"not {sorted(_SELECT_FEATURES)}")
    layer = hf.get("mm_vision_select_layer", -2)
    kept = _feature_layers(vision, layer, "mm_vision_select_layer", source)
    fields: dict[str, Any] = {"video": _video_config(hf, arch, source)}
    if arch == "llava":
        aspect = hf.get("image_aspect_ratio", "square")
        fields["vision_aspect_ratio"] = "pad" if aspect == "pad" else "center_crop"
        fields["image_grid_pinpoints"] = _DEFAULT_PINPOINTS["llava"]
    else:
        fields["vision_aspect_ratio"] = hf["image_aspect_ratio"]
        points = hf.get("image_grid_pinpoints")
        if points is None:
            raise _fail(source, "image_grid_pinpoints", None, "anyres needs grid pinpoints")
        # LLaVA-NeXT's (orig mm_utils) pairs are (w, h); LLaVA-VL's OneVision code reads them
        # the same way, and its released lists are symmetric.
        fields["image_grid_pinpoints"] = _pinpoints(points, source, "image_grid_pinpoints", True)
    parts = {
        "vision_config": vision, "text_config": text,
        "mm_projector_type": hf.get("mm_projector_type", "linear"),  # orig builder default
        "tie_word_embeddings": hf.get("tie_word_embeddings", False),
    }  # fmt: skip
    strategy = _SELECT_FEATURES[feature]
    return _build(
        parts, arch, strategy, "mm_vision_select_feature", kept, fields, source, overrides
    )


# ---- writing --------------------------------------------------------------------------


def to_hf_config(cfg: ModelConfig) -> dict:
    """The transformers config.json of `cfg` (HF_NAMES' class loads it unchanged).

    The tower is written with its kept layers and `vision_feature_layer` -1; LLaVA-1.5 and
    NeXT also carry `image_aspect_ratio` (ignored by transformers, read back here)."""
    from lov_jax.models import families

    if cfg.architecture == "llava_mini":  # no transformers class: the released layout
        return llava_mini.to_hf_config(cfg)
    ids = cfg.ids
    parts = families.config_parts_to_hf(cfg.vision, cfg.text, cfg.projector)
    text = {
        **parts.pop("text_config"),
        "bos_token_id": ids.bos,
        "eos_token_id": ids.eos[0] if len(ids.eos) == 1 else list(ids.eos),
        "pad_token_id": ids.pad,
    }
    model_type, cls = HF_NAMES[cfg.architecture]
    out = {
        "architectures": [cls],
        "model_type": model_type,
        "image_token_index": ids.image,
        **parts,
        "vision_feature_select_strategy": cfg.vision.feature_select,
        "vision_feature_layer": -1,
        "tie_word_embeddings": cfg.text.tie_word_embeddings,
        "text_config": text,
    }
    if cfg.architecture in ("llava_onevision", "llava_next_video"):
        out["video_token_index"] = ids.video
        out.update(_video_to_hf(cfg))
    if cfg.architecture == "llava_onevision":
        out["vision_aspect_ratio"] = cfg.vision_aspect_ratio
    else:
        out["image_aspect_ratio"] = cfg.vision_aspect_ratio
        out["image_seq_length"] = cfg.vision.num_features
    out["image_grid_pinpoints"] = [list(p) for p in cfg.image_grid_pinpoints]  # 1.5: unused
    if cfg.architecture in ("llava_next", "llava_next_video"):
        out["use_image_newline_parameter"] = True
    return out


# An original export keeps its tower in this subdirectory (a CLIPVisionModel /
# SiglipVisionModel checkpoint), which `mm_vision_tower` names, as released original
# checkpoints name the hub tower. The original code resolves the name against its working
# directory: run it from the checkpoint's directory, or make the path absolute.
ORIGINAL_TOWER_DIR = "vision_tower"


def to_original_config(cfg: ModelConfig) -> dict:
    """The original (haotian-liu / LLaVA-VL) config.json of `cfg`: the LLM's flat config
    plus the mm_* keys `from_hf_config` reads back; the tower config is `tower_to_hf(cfg)`,
    written to ORIGINAL_TOWER_DIR."""
    from lov_jax.models import families

    llm = {v: k for k, v in _ORIGINAL_LLMS.items() if "For" in k}[cfg.text.kind]
    mtype = {v: k for k, v in _ORIGINAL_LLMS.items() if "For" not in k}[cfg.text.kind]
    ids = cfg.ids
    parts = families.config_parts_to_hf(cfg.vision, cfg.text, cfg.projector)
    out = {
        **parts["text_config"],
        "architectures": [llm],
        "model_type": mtype,
        "bos_token_id": ids.bos,
        "eos_token_id": ids.eos[0] if len(ids.eos) == 1 else list(ids.eos),
        "pad_token_id": ids.pad,
        "tie_word_embeddings": cfg.text.tie_word_embeddings,
        "mm_vision_tower": ORIGINAL_TOWER_DIR,
        "mm_hidden_size": cfg.vision.hidden_size,
        "mm_projector_type": cfg.projector,
        "mm_vision_select_layer": -1,  # the tower dir holds only the kept layers
        "mm_vision_select_feature": {v: k for k, v in _SELECT_FEATURES.items()}[
            cfg.vision.feature_select
        ],
        "mm_patch_merge_type": "spatial_unpad" if cfg.has_image_newline else "flat",
        "mm_use_im_start_end": False,
        "mm_use_im_patch_token": False,
        "use_mm_proj": True,
        "image_aspect_ratio": {"center_crop": "square"}.get(
            cfg.vision_aspect_ratio, cfg.vision_aspect_ratio
        ),
    }
    if cfg.architecture != "llava":  # the original's pairs are (w, h)
        out["image_grid_pinpoints"] = [[w, h] for h, w in cfg.image_grid_pinpoints]
    if cfg.architecture == "llava_onevision":
        out.update(_video_to_hf(cfg, original=True))
    if cfg.architecture == "llava_next_video":  # the original SpatialPool's config keys
        pool = _video_to_hf(cfg)
        out |= {"mm_resampler_type": "spatial_pool",
                "mm_spatial_pool_mode": pool["spatial_pool_mode"],
                "mm_spatial_pool_stride": pool["spatial_pool_stride"],
                "mm_spatial_pool_out_channels": cfg.vision.hidden_size}  # fmt: skip
    return out


def tower_to_hf(cfg: ModelConfig) -> dict:
    """config.json of the tower alone (CLIPVisionModel / SiglipVisionModel), kept layers."""
    from lov_jax.models import families

    return families.vision(cfg.vision.kind).to_hf(cfg.vision)


def tower_layers(hf: dict, checkpoint_dir: str | Path | None = None) -> int:
    """How many layers the checkpoint's vision tower has (its config, not ours: the
    layers after the feature layer are stored but never run)."""
    if is_original(hf):
        path = None if checkpoint_dir is None else Path(checkpoint_dir)
        vision, _ = tower_config(hf["mm_vision_tower"], path, "config.json")
    else:
        arch = architecture_of(hf)
        vision = _with_type(hf.get("vision_config"), _DEFAULT_VISION[arch])
    return vision.get("num_hidden_layers", 12)
