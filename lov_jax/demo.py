"""`lov-jax demo`: the embedded end-to-end run on CPU.

Until training lands this is the foundation demo: build a tiny random HF
LLaVA-OneVision checkpoint (plus tokenizer/processor files), load it into our
params tree, and check parity against HF's processor + PyTorch model on real
sample images (scikit-image ships them), a multi-image prompt, a video file
and a text-only prompt.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

CASES = (
    ("single image (coffee 400x600)", ("coffee.png",), None),
    ("multi-image (astronaut + chelsea)", ("astronaut.png", "chelsea.png"), None),
    ("video (8 frames, mp4)", (), "shapes.mp4"),
    ("text only", (), None),
)


def _moving_square_frames(num_frames: int = 8, h: int = 240, w: int = 320) -> np.ndarray:
    frames = np.zeros((num_frames, h, w, 3), np.uint8)
    frames[..., 2] = 60
    for f in range(num_frames):
        x = 20 + f * (w - 80) // max(num_frames - 1, 1)
        frames[f, 90:150, x : x + 60] = (230, 40, 40)
    return frames


def prepare_inputs(out_dir: Path) -> None:
    from PIL import Image
    from skimage import data

    from data_pipelines.video import write_video

    for name in ("coffee", "astronaut", "chelsea"):
        Image.fromarray(getattr(data, name)()).save(out_dir / f"{name}.png")
    write_video(out_dir / "shapes.mp4", _moving_square_frames())


def run_demo(out_dir: str | Path = "demo_out") -> int:
    from data_pipelines.hf_processor import save_hf_processor_files
    from lov_jax.config import ModelConfig
    from lov_jax.convert.tiny_hf import make_tiny_hf
    from lov_jax.parity import check_parity

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    hf_dir = make_tiny_hf(out_dir / "hf_tiny", tie_word_embeddings=True)
    cfg = ModelConfig.from_hf_config(json.loads((hf_dir / "config.json").read_text()))
    save_hf_processor_files(hf_dir, cfg)
    prepare_inputs(out_dir)
    print(
        f"[demo] tiny random HF checkpoint + processor files in {hf_dir} ({time.time() - t0:.1f}s)"
    )

    failures = 0
    for title, images, video in CASES:
        t = time.time()
        report = check_parity(
            hf_dir,
            question="Describe what you see.",
            image_paths=tuple(str(out_dir / p) for p in images),
            video_path=str(out_dir / video) if video else None,
        )
        print(f"[demo] {title}  ({time.time() - t:.1f}s)")
        for line in report.lines():
            print(f"         {line}")
        failures += not report.passed
    print(f"[demo] {len(CASES) - failures}/{len(CASES)} parity checks passed")
    return int(failures > 0)
