"""Stage 2 OneVision (1.6M): full model; single image, multi-image (pad) and video (<=32 frames)."""

from configs.common import base_config


def get_config(preset: str = "tiny"):
    c = base_config(preset)
    c.stage = "stage2_ov"
    c.data.frames_upbound = 32
    return c
