"""`lov-jax demo`'s recipe: the OneVision curriculum at CPU scale on the shapes data.

Stage 1 -> 2-SI -> 2-OV on the `demo` preset (lov_jax/demo.py runs them and says why
each deviation from the published recipe is there). Each stage starts from its
configs/<stage>.py and changes only what the demo changes: the synthetic data's files,
512-token rows, loss positions per row, step counts, and for stage 2 larger learning
rates (the demo model starts from random weights, not a pretrained LLM) and the HF
`assistant` loss mask.

`stage_config(stage, out, data, steps, seed)` is what the demo trains;
`lov-jax train --config configs/demo.py:stage2_si` gives the same config for a demo
run in ./demo_out.
"""

from __future__ import annotations

from pathlib import Path

from configs import stage1, stage2_ov, stage2_si

STEPS = {"stage1": 40, "stage2_si": 200, "stage2_ov": 300}
# (recipe, the stage it starts from, its training file in the shapes data)
STAGES = {
    "stage1": (stage1, None, "captions.json"),
    "stage2_si": (stage2_si, "stage1", "train_si.json"),
    "stage2_ov": (stage2_ov, "stage2_si", "train.json"),
}


def stage_config(stage: str, out: Path, data: Path, steps: int, seed: int = 0):
    """The demo's config for `stage`, whose workdir is `out / stage`."""
    recipe, init, train = STAGES[stage]
    c = recipe.get_config("demo")
    c.data.seed = c.train.seed = seed
    c.data.image_folder = c.data.video_folder = str(data)
    c.data.train_path = str(data / train)
    c.data.system_prompt = ""  # prompts as the HF chat template renders them (eval too)
    c.mesh.num_devices = 1
    c.train.num_steps = steps
    c.train.loss_chunk = 128
    c.train.ckpt_every = steps
    c.train.ckpt_keep = 1
    if init is None:  # stage 1: captions of square images
        c.data.seq_len, c.data.max_crops, c.data.rows_per_host = 512, 8, 4
        c.train.loss_tokens_per_row = 64
        return c
    c.init_from = str(out / init)
    # ~4 samples per 512-token row; <= 12 crops per row (~2 per sample at these sizes)
    c.data.seq_len, c.data.max_crops, c.data.rows_per_host = 512, 12, 8
    c.data.frames_upbound = 4
    c.data.loss_mask = "assistant"  # HF convention; fewer positions through the vocab
    c.train.loss_tokens_per_row = 12  # measured: <= 6 trained tokens per row in 2-SI, <= 10 in 2-OV
    c.optim.lr, c.optim.vision_lr = 3e-3, 1e-3
    c.optim.warmup_ratio = 0.05
    return c


def get_config(stage: str = "stage2_ov"):
    out = Path("demo_out").absolute()
    return stage_config(stage, out, out / "data", STEPS[stage])
