"""LLaVA-1.5 visual instruction tuning with LoRA (haotian-liu/LLaVA
scripts/v1_5/finetune_lora.sh; docs/reference_video_post.md 5.1).

The finetune stage (configs/llava15_finetune.py) with the LLM trained through LoRA
adapters: r 128, alpha 256 (scale 2.0), dropout 0.05 on the LLM's attention and MLP
projections (`find_all_linear_names`: never the tower or the projector), learning rate
2e-4; the projector trained fully at `--mm_projector_lr 2e-5`; the tower frozen. The
frozen base may be held in bf16 (`--config.lora.base_dtype=bfloat16`). Checkpoints hold
the adapters and the projector; `lov-jax convert orbax-to-peft --ckpt WORKDIR --out DIR`
writes the PEFT adapter dir, `--merge` the merged HF checkpoint.
"""

import ml_collections

from configs import llava15_finetune
from lov_jax.lora import adapters


def get_config(preset: str = "llava15_7b"):
    c = llava15_finetune.get_config(preset)
    c.optim.lr = 2e-4  # the adapters (the LLM group)
    c.optim.projector_lr = 2e-5
    c.optim.trainable = ("projector", "llm")
    c.lora = lora_block(enabled=True)
    return c


def lora_block(enabled: bool = True) -> ml_collections.ConfigDict:
    """The `lora` group with LoraConfig's defaults (configs/dpo.py holds it disabled)."""
    lora = adapters.LoraConfig()
    return ml_collections.ConfigDict(
        {"enabled": enabled, **{f: getattr(lora, f) for f in adapters.FIELDS if f != "enabled"}}
    )
