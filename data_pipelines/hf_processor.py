"""llava-hf processor files and offline HF processors (docs/reference.md 7.1;
docs/reference_family.md A.5, A.6, A.7.1).

`save_hf_processor_files(dir, cfg)` writes what a llava-hf checkpoint carries next to
config.json / weights: the tokenizer files (data_pipelines/tokenizer.py),
`preprocessor_config.json` and `processor_config.json`. A directory produced by
`save_pretrained` of a (tiny) HF model plus these files is a complete llava-hf checkpoint.
Per `cfg.architecture` (and, for LLaVA-1.5, `cfg.vision_aspect_ratio`):

    architecture / aspect   image processor                processor
    llava / center_crop     CLIPImageProcessor             LlavaProcessor
    llava / pad             LlavaImageProcessor(do_pad)    LlavaProcessor
    llava_next / anyres     LlavaNextImageProcessor        LlavaNextProcessor
    llava_onevision         LlavaOnevisionImageProcessor   LlavaOnevisionProcessor
    llava_next_video        LlavaNextImageProcessor        LlavaNextVideoProcessor

The processors' token counts then equal `visual_layout.num_tokens`: `patch_size`,
`num_additional_image_tokens` (1 for a CLS tower) and `vision_feature_select_strategy`
give F = `vision.num_features` per crop (docs/reference_family.md A.12, item 13).
`AutoProcessor.from_pretrained(dir)` loads the llava / llava_next ones unchanged.

`load_hf_processor(dir)` builds the processor offline. Environment deviation (docs/design.md 7):
torchvision is not installed, so the image processor is the PIL backend
(`LlavaOnevisionImageProcessorPil`, which matches the original LLaVA-NeXT code) and there
is no HF video processor. `ProcessorMixin.__init__` type-checks every sub-processor and
fails on `video_processor=None` (it cannot even resolve `VideoProcessorMixin`), so the
check is shadowed on the instance for the duration of `__init__` only: the result is a
plain `LlavaOnevisionProcessor` with `video_processor=None` that handles text + images;
`videos=` is unsupported, and so is `processor.save_pretrained` (it dereferences the None
video processor): write checkpoints with `save_hf_processor_files`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import tokenizers

from data_pipelines.tokenizer import IMAGE_TOKEN, VIDEO_TOKEN, save_hf_tokenizer_files
from lov_jax.config import ModelConfig

PIL_BICUBIC = 3  # PIL.Image.Resampling.BICUBIC, HF's `resample`
PROCESSOR_CLASSES = {
    "llava": "LlavaProcessor",
    "llava_next": "LlavaNextProcessor",
    "llava_onevision": "LlavaOnevisionProcessor",
    "llava_next_video": "LlavaNextVideoProcessor",
}
# (architecture, vision_aspect_ratio) -> image_processor_type; OneVision's for any ratio.
IMAGE_PROCESSORS = {
    ("llava", "center_crop"): "CLIPImageProcessor",
    ("llava", "pad"): "LlavaImageProcessor",
    ("llava_next", "anyres"): "LlavaNextImageProcessor",
    ("llava_next_video", "anyres"): "LlavaNextImageProcessor",
}


def _image_processor_type(cfg: ModelConfig) -> str:
    key = (cfg.architecture, cfg.vision_aspect_ratio)
    return IMAGE_PROCESSORS.get(key, "LlavaOnevisionImageProcessor")


def preprocessor_config(cfg: ModelConfig) -> dict[str, Any]:
    """preprocessor_config.json for the architecture's image processor (hub values, cfg
    geometry and normalisation)."""
    side, v = cfg.vision.image_size, cfg.vision
    out = {
        "do_convert_rgb": True,
        "do_normalize": True,
        "do_rescale": True,
        "do_resize": True,
        "image_mean": list(v.image_mean),
        "image_processor_type": _image_processor_type(cfg),
        "image_std": list(v.image_std),
        "processor_class": PROCESSOR_CLASSES[cfg.architecture],
        "resample": PIL_BICUBIC,
        "rescale_factor": 1 / 255,
    }
    if cfg.architecture == "llava_onevision":
        return {
            **out,
            "do_pad": True,
            "image_grid_pinpoints": [list(p) for p in cfg.image_grid_pinpoints],
            "size": {"height": side, "width": side},
            # Not an image-processor kwarg (the processor owns it); kept for readers.
            "vision_aspect_ratio": cfg.vision_aspect_ratio,
        }
    # CLIP-style: shortest edge to S, then the SxS center crop (a no-op on anyres crops).
    out |= {"do_center_crop": True, "crop_size": {"height": side, "width": side},
            "size": {"shortest_edge": side}}  # fmt: skip
    if cfg.architecture in ("llava_next", "llava_next_video"):
        out |= {"do_pad": True, "image_grid_pinpoints": [list(p) for p in cfg.image_grid_pinpoints]}
    elif cfg.vision_aspect_ratio == "pad":
        out["do_pad"] = True  # LlavaImageProcessor: expand2square with the mean colour
    return out


def processor_config(cfg: ModelConfig) -> dict[str, Any]:
    """processor_config.json for the architecture's processor."""
    v = cfg.vision
    if cfg.architecture == "llava_onevision":
        return {
            "image_token": IMAGE_TOKEN,
            # Base-image feature count, 27 x 27 = 729 for SigLIP-so400m/14 at 384.
            "num_image_tokens": v.num_features,
            "processor_class": "LlavaOnevisionProcessor",
            "video_token": VIDEO_TOKEN,
            "vision_aspect_ratio": cfg.vision_aspect_ratio,
            "vision_feature_select_strategy": v.feature_select,
        }
    # HF counts (S // patch)^2 + num_additional_image_tokens, minus 1 for "default".
    video = {"video_token": VIDEO_TOKEN} if cfg.architecture == "llava_next_video" else {}
    return {
        **video,
        "image_token": IMAGE_TOKEN,
        "num_additional_image_tokens": int(v.has_cls),
        "patch_size": v.patch_size,
        "processor_class": PROCESSOR_CLASSES[cfg.architecture],
        "vision_feature_select_strategy": v.feature_select,
    }


def save_hf_processor_files(
    out_dir: str | os.PathLike, cfg: ModelConfig, tokenizer: tokenizers.Tokenizer | None = None
) -> list[Path]:
    """Tokenizer files + preprocessor_config.json + processor_config.json; returns the paths.

    `tokenizer` defaults to `build_qwen2_tokenizer()` (cached under ~/.cache/lov_jax). The
    tokenizer files are the Qwen-2 / OneVision ones (data_pipelines/tokenizer.py); a
    checkpoint with another tokenizer writes its own and calls `save_processor_configs`.
    """
    return save_hf_tokenizer_files(out_dir, tokenizer) + save_processor_configs(out_dir, cfg)


def save_processor_configs(out_dir: str | os.PathLike, cfg: ModelConfig) -> list[Path]:
    """preprocessor_config.json + processor_config.json; returns the paths."""
    out, paths = Path(out_dir), []
    for name, obj in (
        ("preprocessor_config.json", preprocessor_config(cfg)),
        ("processor_config.json", processor_config(cfg)),
    ):
        path = out / name
        path.write_text(json.dumps(obj, indent=2) + "\n")
        paths.append(path)
    return paths


def load_hf_image_processor(hf_dir: str | os.PathLike):
    """The PIL-backend image processor of a directory's preprocessor_config.json.

    OneVision's is built directly (its hub file carries `vision_aspect_ratio`, not a
    kwarg); the others through `AutoImageProcessor` (which picks the Pil class here)."""
    hf_dir = Path(hf_dir)
    cfg = json.loads((hf_dir / "preprocessor_config.json").read_text())
    if cfg.get("image_processor_type") != "LlavaOnevisionImageProcessor":
        from transformers import AutoImageProcessor

        return AutoImageProcessor.from_pretrained(str(hf_dir), local_files_only=True)
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil,
    )

    for key in ("image_processor_type", "processor_class", "vision_aspect_ratio"):
        cfg.pop(key, None)
    return LlavaOnevisionImageProcessorPil(**cfg)


def load_hf_processor(hf_dir: str | os.PathLike):
    """An offline HF processor for the directory's `processor_class`.

    LlavaProcessor / LlavaNextProcessor: `AutoProcessor.from_pretrained`, unchanged.
    LlavaOnevisionProcessor / LlavaNextVideoProcessor: PIL images, no video processor
    (module docstring). Reads
    tokenizer files, chat_template.jinja, preprocessor_config.json and
    processor_config.json from `hf_dir` (as written by `save_hf_processor_files`).
    """
    from transformers import AutoTokenizer, LlavaOnevisionProcessor

    hf_dir = Path(hf_dir)
    name = json.loads((hf_dir / "processor_config.json").read_text()).get("processor_class")
    if name in ("LlavaProcessor", "LlavaNextProcessor"):
        from transformers import AutoProcessor

        return AutoProcessor.from_pretrained(str(hf_dir), local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(str(hf_dir), local_files_only=True)
    proc_cfg = json.loads((hf_dir / "processor_config.json").read_text())
    proc_cfg.pop("processor_class", None)
    template_file = hf_dir / "chat_template.jinja"
    chat_template = template_file.read_text() if template_file.is_file() else None

    cls = LlavaOnevisionProcessor
    if name == "LlavaNextVideoProcessor":  # the same offline build, NeXT's image processor
        from transformers import LlavaNextVideoProcessor as cls
    processor = cls.__new__(cls)
    base_check = processor.check_argument_for_proper_class

    def check(name: str, arg: Any) -> Any:
        if name == "video_processor" and arg is None:
            return None
        return base_check(name, arg)

    # Instance attribute shadows the method during __init__ only (see module docstring).
    processor.check_argument_for_proper_class = check
    try:
        processor.__init__(
            image_processor=load_hf_image_processor(hf_dir),
            tokenizer=tokenizer,
            video_processor=None,
            chat_template=chat_template,
            **proc_cfg,
        )
    finally:
        del processor.check_argument_for_proper_class
    return processor
