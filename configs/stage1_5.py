"""Stage 1.5 (mid-stage, 4M): full model, LLM/projector 1e-5, vision 2e-6, anyres."""

from configs.common import base_config


def get_config(preset: str = "tiny"):
    c = base_config(preset)
    c.stage = "stage1_5"
    return c
