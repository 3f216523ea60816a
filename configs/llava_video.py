"""LLaVA-Video (LLaVA-NeXT `scripts/video/train/SO400M_Qwen2_7B_ov_to_video_am9.sh`;
../shared/REFERENCE_VIDEO_POST.md 2.5-2.7).

From OneVision-7B's single-image stage (`--config.init_from`), the full model at
common.py's rates (LLM 1e-5, tower 2e-6) on a video mixture in 32768-token rows
(model_max_length). Videos: `frames_upbound` 64 frames, `force_sample` (always 64, by
linspace), the time instruction before the question; frames are 2x2 bilinear pooled with a
newline after every row ("grid": 14 x 15 = 210 tokens per frame, 13440 per 64-frame video;
model.video_newline sets it, since a OneVision checkpoint's own config says "one_token").
A row holds up to 128 crops: two such videos (26880 tokens + text) fill both budgets. The
script checkpoints every 500 steps and names no data file of its own (`DATA_YAML="XXX"`):
pass yours with --config.data.train_path=.
"""

from configs.common import base_config

PRESETS = ("tiny_llava_video", "llava_video_7b")


def get_config(preset: str = "tiny_llava_video"):
    c = base_config(preset, PRESETS)
    c.data.train_path = "llava_video.yaml"
    c.data.frames_upbound = 64
    c.data.force_sample = True
    c.data.add_time_instruction = True
    c.data.max_crops = 128
    c.model.video_newline = "grid"  # mm_newline_position in the script
    c.train.ckpt_every = 500
    return c
