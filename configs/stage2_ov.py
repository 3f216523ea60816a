"""Stage 2, OneVision (1.6M, finetune_ov.sh; docs/reference.md 8).

From the 2-SI checkpoint (`--config.init_from`), the full model on LLaVA-NeXT's
`scripts/train/onevision.yaml` mixture: single images (anyres_max_9), multi-image
samples (each image one padded 384 crop, 730 tokens; docs/reference.md 4.1) and videos
(at most `data.frames_upbound` = 32 frames, 196 tokens each + 1; docs/reference.md 5).
Everything else is common.py's.
"""

from configs.common import base_config


def get_config(preset: str = "tiny"):
    c = base_config(preset)
    c.data.train_path = "onevision.yaml"
    return c
