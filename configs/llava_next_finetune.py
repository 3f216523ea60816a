"""LLaVA-NeXT (1.6) visual instruction tuning (docs/reference_family.md A.7, A.10, A.11).

From a LLaVA-1.5-style pretrain of the same LLM (`--config.init_from`), the whole model
trains: LLM + projector (+ image_newline, in the LLM group as the original) at 2e-5, the
CLIP tower unfrozen at 2e-6 (`--unfreeze_mm_vision_tower True --mm_vision_tower_lr
2e-6`); images AnyRes over the 5 pinpoints of 336 crops, base image first, unpadded grid
with one image_newline per row, up to 2928 tokens (the preset's pinpoints; every image
of a NeXT prompt is anyres). The conversation is the LLM's: mistral_instruct for
Mistral-7B-Instruct-v0.2, llava_llama_3 for Llama-3-8B-Instruct, vicuna_v1 for
Vicuna-v1.5, qwen_1_5 for Qwen1.5 (72B / 110B), chosen by the preset's LLM
(`--config.data.template=` for another).

The LLM rate is LLaVA-1.5's finetune rate, 2e-5, which the LLaVA-NeXT release blog gives
(unverified here; LLaVA-NeXT's scripts/train/direct_finetune_clip.sh, a later Qwen-2
variant on llava_1_6.json, uses 1e-5); model_max_length 4096 per sample, here
8192-token rows holding ~2-3 samples (max_crops 16: 5 crops per image). 1 epoch,
cosine, 3% warmup and no weight decay are common.py's.
"""

from configs.common import base_config, family_presets

# The LLM's conversation template: by its family, a Llama by the preset's name.
BY_KIND = {"mistral": "mistral_instruct", "qwen2": "qwen_1_5"}
LLAMAS = (("llama3", "llava_llama_3"), ("vicuna", "vicuna_v1"))


def template_for(preset: str) -> str:
    from lov_jax import config

    kind = config.preset(preset).text.kind
    if kind in BY_KIND:
        return BY_KIND[kind]
    for part, template in LLAMAS:
        if part in preset:
            return template
    raise ValueError(
        f"preset {preset!r} ({kind}) names no Llama of {[p for p, _ in LLAMAS]}: set the "
        "conversation template with --config.data.template=NAME (data_pipelines/chat.py TEMPLATES)"
    )


def get_config(preset: str = "llava_next_mistral_7b"):
    c = base_config(preset, family_presets("llava_next"))
    c.data.train_path = "llava_1_6.json"  # direct_finetune_clip.sh's name
    c.data.template = template_for(preset)
    c.data.seq_len = 8192
    c.data.max_crops = 16
    c.optim.lr = 2e-5
    return c
