"""LLaVA-Mini vision-language pretraining (docs/reference_family.md B.8.1).

The code's `--tune_mm_mlp_adapter True`: only the projector group trains, which holds
the compressor and the pre-fusion layers too (lov_jax/train/optimizer.py; the paper's
stage 1 leaves compression out, issue #32, which the code does not do). The reference
publishes no stage-1 script: data, prompt and learning rate are LLaVA-1.5's pretrain
(558K captions, `plain`, 1e-3; configs/llava15_pretrain.py); one caption sample is
~40 tokens at C = 1, so a row's crops bound it (max_crops 64 of 8192 tokens).
"""

from configs.common import base_config, family_presets


def get_config(preset: str = "llava_mini_llama31_8b"):
    c = base_config(preset, family_presets("llava_mini"))
    c.data.train_path = "blip_laion_cc_sbu_558k.json"
    c.data.template = "plain"
    c.data.seq_len = 8192
    c.data.max_crops = 64
    c.optim.lr = 1e-3
    c.optim.trainable = ("projector",)
    return c
