"""Stage 1 (LCS-558K pretrain): projector only at 1e-3, 729 tokens/image, `plain` prompt."""

from configs.common import base_config


def get_config(preset: str = "tiny"):
    c = base_config(preset)
    c.stage = "stage1"
    c.data.template = "plain"
    c.data.image_mode = "square"  # base crop only, 729 tokens, no newline
    c.data.seq_len = 8192
    c.data.max_crops = 16
    c.optim.lr = 1e-3
    c.optim.trainable = ("projector",)
    return c
