"""Stage 2 single-image (3.2M): full model, anyres_max_9, 32k tokens."""

from configs.common import base_config


def get_config(preset: str = "tiny"):
    c = base_config(preset)
    c.stage = "stage2_si"
    return c
