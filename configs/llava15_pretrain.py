"""LLaVA-1.5 pretraining, feature alignment (haotian-liu/LLaVA scripts/v1_5/pretrain.sh;
docs/reference_family.md A.11).

From Vicuna-v1.5 + CLIP ViT-L/14-336 (`--config.init_from`: an HF or original LLaVA-1.5
directory, whose tokenizer the data uses), only the projector trains, at 1e-3, on the
LCS-558K captions with the `plain` prompt (`<s><image>` + caption + "\\n", the caption
trained). pretrain.sh passes no `--image_aspect_ratio`, so its images take the original's
default "square": the CLIP processor's resize + center crop (data_pipelines/
image_processing.image_kind gives `plain` samples "center_crop"), 576 tokens each.

Batch: pretrain.sh trains 256 samples a step (32 per GPU x 8) of at most 2048 tokens; a
sample here is ~600 tokens, so a 8192-token row packs ~13 of them (max_crops 14) and
256 samples are ~20 rows a step (rows_per_host x hosts x grad_accum). 1 epoch, cosine,
3% warmup and no weight decay are common.py's.
"""

from configs.common import base_config, family_presets


def get_config(preset: str = "llava15_7b"):
    c = base_config(preset, family_presets("llava"))
    # liuhaotian/LLaVA-Pretrain's caption file
    c.data.train_path = "blip_laion_cc_sbu_558k.json"
    c.data.template = "plain"
    c.data.seq_len = 8192
    c.data.max_crops = 14  # one crop per sample: 8192 // ~600
    c.optim.lr = 1e-3
    c.optim.trainable = ("projector",)
    return c
