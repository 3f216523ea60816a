"""llava-hf processor files and an offline `LlavaOnevisionProcessor` (docs/reference.md 7.1).

`save_hf_processor_files(dir, cfg)` writes what a llava-hf OneVision checkpoint carries
next to config.json / weights: the tokenizer files (data_pipelines/tokenizer.py),
`preprocessor_config.json` and `processor_config.json`. A directory produced by
`save_pretrained` of a (tiny) HF model plus these files is a complete llava-hf checkpoint.

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

from data_pipelines.image_processing import IMAGE_MEAN, IMAGE_STD
from data_pipelines.tokenizer import IMAGE_TOKEN, VIDEO_TOKEN, save_hf_tokenizer_files
from lov_jax.config import ModelConfig

PIL_BICUBIC = 3  # PIL.Image.Resampling.BICUBIC, HF's `resample`


def preprocessor_config(cfg: ModelConfig) -> dict[str, Any]:
    """preprocessor_config.json for `LlavaOnevisionImageProcessor` (hub values, cfg geometry)."""
    side = cfg.vision.image_size
    return {
        "do_convert_rgb": True,
        "do_normalize": True,
        "do_pad": True,
        "do_rescale": True,
        "do_resize": True,
        "image_grid_pinpoints": [list(p) for p in cfg.image_grid_pinpoints],
        "image_mean": list(IMAGE_MEAN),
        "image_processor_type": "LlavaOnevisionImageProcessor",
        "image_std": list(IMAGE_STD),
        "processor_class": "LlavaOnevisionProcessor",
        "resample": PIL_BICUBIC,
        "rescale_factor": 1 / 255,
        "size": {"height": side, "width": side},
        # Not an image-processor kwarg (the processor owns it); kept for readers of the file.
        "vision_aspect_ratio": cfg.vision_aspect_ratio,
    }


def processor_config(cfg: ModelConfig) -> dict[str, Any]:
    """processor_config.json for `LlavaOnevisionProcessor`."""
    return {
        "image_token": IMAGE_TOKEN,
        # Base-image feature count, 27 x 27 = 729 for SigLIP-so400m/14 at 384.
        "num_image_tokens": cfg.vision.num_patches,
        "processor_class": "LlavaOnevisionProcessor",
        "video_token": VIDEO_TOKEN,
        "vision_aspect_ratio": cfg.vision_aspect_ratio,
        "vision_feature_select_strategy": "full",
    }


def save_hf_processor_files(
    out_dir: str | os.PathLike, cfg: ModelConfig, tokenizer: tokenizers.Tokenizer | None = None
) -> list[Path]:
    """Tokenizer files + preprocessor_config.json + processor_config.json; returns the paths.

    `tokenizer` defaults to `build_qwen2_tokenizer()` (cached under ~/.cache/lov_jax).
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
    """`LlavaOnevisionImageProcessorPil` from a directory's preprocessor_config.json."""
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil,
    )

    cfg = json.loads((Path(hf_dir) / "preprocessor_config.json").read_text())
    for key in ("image_processor_type", "processor_class", "vision_aspect_ratio"):
        cfg.pop(key, None)
    return LlavaOnevisionImageProcessorPil(**cfg)


def load_hf_processor(hf_dir: str | os.PathLike):
    """An offline `transformers.LlavaOnevisionProcessor` (PIL images, no video processor).

    Reads tokenizer files, chat_template.jinja, preprocessor_config.json and
    processor_config.json from `hf_dir` (as written by `save_hf_processor_files`).
    """
    from transformers import AutoTokenizer, LlavaOnevisionProcessor

    hf_dir = Path(hf_dir)
    tokenizer = AutoTokenizer.from_pretrained(str(hf_dir), local_files_only=True)
    proc_cfg = json.loads((hf_dir / "processor_config.json").read_text())
    proc_cfg.pop("processor_class", None)
    template_file = hf_dir / "chat_template.jinja"
    chat_template = template_file.read_text() if template_file.is_file() else None

    processor = LlavaOnevisionProcessor.__new__(LlavaOnevisionProcessor)
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
