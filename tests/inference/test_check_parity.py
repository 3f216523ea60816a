"""`lov-jax check-parity` end to end on a tiny random checkpoint with processor files."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from data_pipelines.hf_processor import save_hf_processor_files
from data_pipelines.video import write_video
from lov_jax import cli
from lov_jax.config import ModelConfig
from lov_jax.testing.hf_checkpoints import make_tiny_hf


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    d = make_tiny_hf(tmp_path_factory.mktemp("hf"))
    save_hf_processor_files(
        d, ModelConfig.from_hf_config(json.loads((d / "config.json").read_text()))
    )
    return d


def test_check_parity_image_and_video_pass_and_save_logits(hf_dir, tmp_path, capsys):
    from skimage import data

    Image.fromarray(data.coffee()).save(tmp_path / "coffee.png")
    rng = np.random.default_rng(0)
    write_video(tmp_path / "v.mp4", rng.integers(0, 256, (4, 96, 128, 3), dtype=np.uint8))
    out = tmp_path / "logits.npz"
    argv = ["check-parity", "--hf", str(hf_dir), "--image", str(tmp_path / "coffee.png"),
            "--video", str(tmp_path / "v.mp4"), "--num-frames", "4",
            "--save-logits", str(out)]  # fmt: skip
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "ids equal: True" in printed and "parity: PASS" in printed
    saved = np.load(out)
    assert saved["logits"].shape == (len(saved["input_ids"]), 152000)
    assert int((saved["input_ids"] == 151647).sum()) == 4 * 196 + 1


def test_check_parity_exits_nonzero_above_tolerance(hf_dir, capsys):
    assert cli.main(["check-parity", "--hf", str(hf_dir), "--atol", "0"]) == 1
    assert "parity: FAIL" in capsys.readouterr().out


def test_check_parity_names_unreadable_image(hf_dir, tmp_path, capsys):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not a png")
    assert cli.main(["check-parity", "--hf", str(hf_dir), "--image", str(bad)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "broken.png" in err
    with pytest.raises(ValueError, match="broken.png"):  # --debug: the exception itself
        cli.main(["check-parity", "--hf", str(hf_dir), "--image", str(bad), "--debug"])
