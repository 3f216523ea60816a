"""Stage 2, single image (3.2M, finetune_si.sh; docs/reference.md 8).

From the stage-1.5 checkpoint (`--config.init_from`), the full model on LLaVA-NeXT's
`scripts/train/single_image.yaml` instruction mixture (single images, anyres_max_9:
up to 37 crops per image, docs/reference.md 2.4). Everything else is common.py's.
"""

from configs.common import base_config


def get_config(preset: str = "tiny"):
    c = base_config(preset)
    c.data.train_path = "single_image.yaml"
    return c
