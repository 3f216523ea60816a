"""What the OneVision stage recipes share (docs/reference.md 8, "Common").

Each stage file defines `get_config(preset)` and sets exactly what its stage changes
(data, trained modules, learning rates, token budgets); `lov-jax train --config
configs/<stage>.py:<preset> --config.optim.lr=...` loads it and applies overrides (an
unknown key is an error). The defaults here are the full-model stages' (1.5, 2-SI,
2-OV): all three modules trained, LLM + projector 1e-5, vision tower 2e-6, Qwen ChatML
(`qwen_1_5`), 32768-token rows, AdamW 0.9/0.999/1e-8, no weight decay, grad-norm clip
1.0, cosine with 3% linear warmup, one epoch.
"""

from __future__ import annotations

import ml_collections

PRESETS = ("tiny", "demo", "ov_0_5b", "ov_7b", "ov_72b")  # the OneVision stages'


def family_presets(architecture: str) -> tuple[str, ...]:
    """The lov_jax.config presets of one architecture ("llava", "llava_next", ...)."""
    from lov_jax import config

    return tuple(n for n, make in config.PRESETS.items() if make().architecture == architecture)


def _small(preset: str) -> bool:  # CPU-sized presets: fp32 compute, no remat
    return preset == "demo" or preset.startswith("tiny") or preset.endswith("tiny")


def base_config(preset: str, presets: tuple[str, ...] = PRESETS) -> ml_collections.ConfigDict:
    if preset not in presets:
        raise ValueError(f"unknown model preset {preset!r}; choose from {presets}")
    c = ml_collections.ConfigDict()
    c.model = ml_collections.ConfigDict(
        {
            "preset": preset,
            "dtype": "float32" if _small(preset) else "bfloat16",
            "param_dtype": "float32",
            "remat_policy": "none" if _small(preset) else "full",
            "attention_impl": "xla",
            # "" = the preset's / init_from checkpoint's; LLaVA-1.5: "pad" (the original's
            # image_aspect_ratio) | "center_crop" (llava-hf's CLIPImageProcessor)
            "vision_aspect_ratio": "",
            # "" = the preset's / init_from checkpoint's; else an mm_newline_position
            # ("grid" | "frame" | "one_token" | "no_token"): LLaVA-Video trains "grid" from
            # OneVision checkpoints, whose config says "one_token"
            "video_newline": "",
        }
    )
    # Initialise from an HF dir or an Orbax checkpoint (a previous stage's workdir).
    c.init_from = ""
    # data/fsdp/context/tensor: sizes inside one slice, one may be -1 (whatever remains);
    # num_devices < 0: every device. context > 1 shards each row's tokens (long rows):
    # attention "ring" | "all_gather", rows "zigzag" (causal load balance) | "none"
    # (lov_jax/models/ring.py; README "Long rows: the context axis").
    c.mesh = ml_collections.ConfigDict(
        {"data": 1, "fsdp": -1, "context": 1, "tensor": 1, "num_devices": -1}
    )
    c.mesh.context_strategy = "ring"
    c.mesh.context_reorder = "zigzag"
    # Number of slices (multi-slice TPU, or hosts of a GPU cluster): the data axis across
    # DCN, so the global data axis is dcn_data * data (lov_jax.sharding.mesh_from_config).
    c.mesh.dcn_data = 1

    c.data = ml_collections.ConfigDict(
        {
            # json / jsonl / data yaml mixture / parquet / array_record; each stage names
            # its recipe's file (relative: pass your own with --config.data.train_path=)
            "train_path": "",
            "image_folder": "",
            "video_folder": "",
            # a data_pipelines/chat.py TEMPLATES name: qwen_1_5 | chatml_direct | vicuna_v1 |
            # llava_llama_3 | mistral_instruct | plain (stage 1; its images are then square,
            # 729 tokens, no newline: data_pipelines/records.py)
            "template": "qwen_1_5",
            "loss_mask": "llava_next",  # llava_next | assistant
            # "template_default": the template's own (data_pipelines/chat.py TEMPLATES:
            # qwen_1_5 "You are a helpful assistant.", vicuna_v1 its "A chat between ...",
            # plain / mistral_instruct none); "": none; else that text.
            "system_prompt": "template_default",
            "frames_upbound": 32,  # video frame cap (finetune_ov.sh; earlier stages: no video)
            # LLaVA-Video: always frames_upbound frames (linspace, repeats on short clips) and
            # its time instruction before the question (data_pipelines/video.py)
            "force_sample": False,
            "add_time_instruction": False,
            "seq_len": 32768,  # L tokens per row
            "max_crops": 84,  # N crops per row (~L/400 on the OV mix)
            "rows_per_host": 1,  # B rows per host per micro-batch
            "num_workers": 0,
            "skip_policy": "skip",
            "seed": 0,
        }
    )
    c.optim = ml_collections.ConfigDict(
        {
            "lr": 1e-5,  # llm (and projector unless projector_lr is set)
            "vision_lr": 2e-6,
            "projector_lr": -1.0,  # < 0: same as lr (orig leaves mm_projector_lr unset)
            "newline_group": "llm",  # orig: image_newline trains with the LLM group
            "trainable": ("vision", "projector", "llm"),
            "b1": 0.9,
            "b2": 0.999,
            "eps": 1e-8,
            "weight_decay": 0.0,
            "max_grad_norm": 1.0,
            "warmup_ratio": 0.03,
            "z_loss": 0.0,
            "grad_accum": 1,
            "max_consecutive_nonfinite": 5,
        }
    )
    c.train = ml_collections.ConfigDict(
        {
            "epochs": 1,
            "num_steps": -1,  # < 0: derived from the data size and epochs
            "ckpt_every": 1000,  # orig save_steps
            "ckpt_keep": 3,
            "ckpt_keep_period": 0,  # also keep every K-th step (0: off)
            # resume even though the stage config / data differ from the checkpoint's
            "allow_config_change": False,  # (lov_jax/train/resume.py; warned, not refused)
            "loss_chunk": 1024,
            # > 0: project only the first K trained positions of each row onto the vocab
            # (exact; the loop refuses a row with more). 0: every position.
            "loss_tokens_per_row": 0,
            "seed": 0,
        }
    )
    return c
