"""Stage 1, language-image alignment (LCS-558K, pretrain_siglip.sh; docs/reference.md 8).

Only the projector trains, at 1e-3; captions with the `plain` prompt (`<image>` +
caption, docs/reference.md 7.2), so every image is one square 384 crop of 729 tokens;
8192-token rows.
"""

from configs.common import base_config


def get_config(preset: str = "tiny"):
    c = base_config(preset)
    # LLaVA-Pretrain's caption file (liuhaotian/LLaVA-Pretrain)
    c.data.train_path = "blip_laion_cc_sbu_558k.json"
    c.data.template = "plain"
    c.data.seq_len = 8192
    c.data.max_crops = 16  # one crop per sample; a row holds at most 8192 // 730 = 11
    c.optim.lr = 1e-3
    c.optim.trainable = ("projector",)
    return c
