"""Stage 1.5, high-quality knowledge (4M; docs/reference.md 8).

From the stage-1 checkpoint (`--config.init_from`), the full model on LLaVA-NeXT's
`scripts/train/mid_stage.yaml` mixture (detailed captions, OCR and knowledge data).
Everything else is common.py's; this is the first stage that trains `image_newline`
(orig creates it with the anyres projector; it is in the LLM group).
"""

from configs.common import base_config


def get_config(preset: str = "tiny"):
    c = base_config(preset)
    c.data.train_path = "mid_stage.yaml"
    return c
