"""LLaVA-1.5 visual instruction tuning (haotian-liu/LLaVA scripts/v1_5/finetune.sh;
docs/reference_family.md A.11).

From the pretrain stage (`--config.init_from`: its workdir, or an HF / original
LLaVA-1.5 directory), the projector and the LLM train at 2e-5 with the tower frozen, on
llava_v1_5_mix665k.json with the `vicuna_v1` conversation (`--version v1`: its system
prompt, `</s>` closing each answer, masks as preprocess_v1) and `--image_aspect_ratio
pad`: each image padded to a square with the mean colour, then resized (576 tokens).

Batch: finetune.sh trains 128 samples a step (16 per GPU x 8) of at most 2048 tokens;
samples here average ~800 tokens, so a 8192-token row packs ~10 (max_crops 12) and 128
samples are ~13 rows a step. 1 epoch, cosine, 3% warmup and no weight decay are
common.py's.
"""

from configs.common import base_config, family_presets


def get_config(preset: str = "llava15_7b"):
    c = base_config(preset, family_presets("llava"))
    c.model.vision_aspect_ratio = "pad"
    c.data.train_path = "llava_v1_5_mix665k.json"
    c.data.template = "vicuna_v1"
    c.data.seq_len = 8192
    c.data.max_crops = 12
    c.optim.lr = 2e-5
    c.optim.trainable = ("projector", "llm")
    return c
