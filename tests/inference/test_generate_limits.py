"""Generation's bad inputs: prompt + new tokens beyond the model's context, corrupt media
(the file is named), and an Orbax checkpoint's own tokenizer (its assets/, never Qwen's)."""

from __future__ import annotations

import dataclasses
import types

import numpy as np
import pytest
from PIL import Image

from lov_jax import cli, load_pretrained
from lov_jax.convert.import_hf import hf_to_orbax
from lov_jax.inference.engine import (
    ContextError,
    GenerationConfig,
    Generator,
    PromptInputs,
    fit_context,
)
from lov_jax.inference.prompting import MediaError, Prompter, load_frames, load_image
from lov_jax.testing.hf_checkpoints import make_tiny_hf

VOCAB = 640  # a ChatML BPE of this size (lov_jax.testing.tokenizers.small_bpe), not Qwen's


@pytest.fixture(scope="module")
def orbax_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("lim")
    hf = make_tiny_hf(root / "hf", vocab_size=VOCAB, tie_word_embeddings=False, seed=11)
    hf_to_orbax(hf, root / "orbax", progress=False)
    return root / "orbax"


def test_fit_context_rules(capsys):
    assert fit_context([10, 30], 50, 100, clip=False) == 50
    with pytest.raises(ContextError, match=r"prompt 1 takes 30 tokens and max_new_tokens is 80"):
        fit_context([10, 30], 80, 100, clip=False)
    assert fit_context([10, 30], 80, 100, clip=True) == 70
    assert "at most 70 new tokens, not 80" in capsys.readouterr().err
    with pytest.raises(ContextError, match="the prompt takes 100 tokens, the model's whole"):
        fit_context([100], 1, 100, clip=True)


def test_generator_refuses_or_clips_beyond_context(orbax_dir, capsys):
    cfg, params = load_pretrained(orbax_dir)
    cfg = cfg.replace(text=dataclasses.replace(cfg.text, max_position_embeddings=48))
    gen = Generator(params, cfg)
    rng = np.random.default_rng(2)
    size = cfg.vision.image_size
    prompt = PromptInputs(rng.integers(0, VOCAB - 8, 40).astype(np.int32),
                          np.zeros((0, size, size, 3), np.uint8), [])  # fmt: skip
    knobs = GenerationConfig(max_new_tokens=20, stop_ids=())
    with pytest.raises(ContextError, match="exceed the model's context of 48"):
        gen.generate([prompt], knobs)
    out = gen.generate([prompt], dataclasses.replace(knobs, clip_to_context=True))
    assert len(out.tokens[0]) == 8 and "at most 8 new tokens, not 20" in capsys.readouterr().err


def _one_error(capsys, argv) -> str:
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in err, err
    return errors[0]


def test_cli_context_and_corrupt_media_errors(orbax_dir, tmp_path, capsys):
    cfg, _ = load_pretrained(orbax_dir)
    ctx = cfg.text.max_position_embeddings
    base = ["generate", "--ckpt", str(orbax_dir), "--prompt", "Describe."]
    line = _one_error(capsys, [*base, "--max-new-tokens", str(ctx)])
    assert f"max_new_tokens is {ctx}" in line and f"context of {ctx}" in line

    good = tmp_path / "good.png"
    Image.fromarray(np.full((30, 50, 3), 90, np.uint8)).save(good)
    truncated = tmp_path / "cut.png"
    truncated.write_bytes(good.read_bytes()[:60])
    line = _one_error(capsys, [*base, "--image", str(truncated)])
    assert line.startswith(f"error: cannot decode image {truncated}")
    video = tmp_path / "clip.mp4"
    video.write_bytes(b"\0\0\0\x18ftypmp42" + b"\x01" * 200)
    line = _one_error(capsys, [*base, "--video", str(video)])
    assert str(video) in line and "decode" in line
    with pytest.raises(MediaError, match="F>0"):
        load_frames(np.zeros((0, 8, 8, 3), np.uint8), 4)
    assert load_image(good).size == (50, 30)


def test_orbax_checkpoint_uses_its_own_tokenizer(orbax_dir):
    from data_pipelines.tokenizer import load_tokenizer
    from lov_jax.train.run import load_tokenizer_for

    own = load_tokenizer(orbax_dir.parent / "hf")  # what the HF dir shipped
    assert (orbax_dir / "assets" / "tokenizer.json").is_file()
    tok = Prompter.from_checkpoint(orbax_dir).tokenizer
    assert tok.to_str() == own.to_str() and tok.get_vocab_size() <= VOCAB  # Qwen-2's: ~151k
    config = types.SimpleNamespace(init_from=str(orbax_dir))
    assert load_tokenizer_for(config).to_str() == tok.to_str()
