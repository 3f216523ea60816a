"""DPO (`lov-jax dpo --config configs/dpo.py:<preset> --workdir DIR`): LLaVA-OneVision-Chat's
recipe (LLaVA-NeXT `scripts/train/dpo_ov7b.sh`, docs/LLaVA_OneVision_Chat.md;
REFERENCE_VIDEO_POST 4.5-4.6).

What DPO changes from the full-model stages (configs/common.py): the data is preference
records (LLaVA-NeXT's DPO json), every module at 5e-7 (the vision tower too: the script
sets no `mm_vision_tower_lr`), cosine with 10% warmup, per-device batch 1 x accumulation 8,
no weight decay, one epoch per round; the objective TRL's sigmoid with beta 0.1, no label
smoothing, no SFT term (the script's `--dpo_alpha 1 --gamma 0`), the reference a frozen
copy of `init_from` run in every step (ZeRO-3 path). `loop` holds the OV-Chat iteration:
3 rounds, 5 samples per prompt at temperature 0.7 / top-p 0.9, best vs worst by the judge
(`lov-jax dpo-loop`).

`lora` is configs/lora.py's block, off: `--config.lora.enabled=true` trains the policy
through LoRA adapters (r 128, alpha 256 on the LLM's projections; the groups of
`optim.trainable` holding adapters train only them), the reference being the frozen base
with the adapters off; `lov-jax convert orbax-to-peft --ckpt WORKDIR` exports the run.
"""

from __future__ import annotations

import ml_collections

from configs.common import PRESETS, base_config
from configs.lora import lora_block


def get_config(preset: str = "ov_7b") -> ml_collections.ConfigDict:
    c = base_config(preset, PRESETS)
    c.data.train_path = "dpo_pairs.jsonl"  # {"id", "image", "prompt", "chosen", "rejected"}
    c.data.frames_upbound = 32
    c.optim.lr = c.optim.vision_lr = 5e-7
    c.optim.warmup_ratio = 0.1
    c.optim.grad_accum = 8
    c.dpo = ml_collections.ConfigDict(
        {
            "beta": 0.1,
            "loss_type": "sigmoid",  # sigmoid | robust | hinge | ipo (lov_jax/post/dpo.py)
            "label_smoothing": 0.0,  # sigmoid: conservative DPO (LLaVA-NeXT's vendored TRL)
            "reference": "step",  # step (frozen copy run each step) | precomputed (one pass)
            # trl: every token after the prompt (upstream TRL's completion_mask);
            # loss_mask: data.loss_mask's targets ("llava_next" = LLaVA-NeXT's labels)
            "completion": "trl",
            "max_pairs_per_row": 8,  # static segment count 2P per packed row
            "sft_weight": 0.0,  # LLaVA-NeXT's gamma
        }
    )
    c.lora = lora_block(enabled=False)
    c.loop = ml_collections.ConfigDict(
        {
            "rounds": 3,
            "samples_per_prompt": 5,
            "temperature": 0.7,
            "top_p": 0.9,
            "max_new_tokens": 512,
            "batch_size": 8,  # prompts per generation batch (x samples_per_prompt rows)
            "judge": "critic",  # critic (a LLaVA-Critic checkpoint, pointwise) | rule
            "critic": "",  # the critic checkpoint (judge == "critic")
            "seed": 0,
        }
    )
    return c
