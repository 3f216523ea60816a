"""One short run of each LLaVA-family recipe (configs/llava15_pretrain.py,
llava15_finetune.py, llava_next_finetune.py) from a tiny random llava-hf checkpoint: the
recipe's template, image preprocessing and trained groups, through `lov-jax train`'s
train_from_config; the loss falls and only the recipe's groups move.

Deviations from the recipes, all for a random tiny model on CPU: rows of 1024 / 1280
tokens (one sample each), NeXT on one 336x336 pinpoint, 20 steps, and the learning rates
raised as the demo raises its stage-2 ones (configs/demo.py: a random LLM is not a
pretrained one).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from flax import traverse_util

from configs import llava15_finetune, llava15_pretrain, llava_next_finetune

pytest.importorskip("transformers")

STEPS = 20
COLOURS = {"red": (220, 40, 30), "green": (40, 190, 60), "blue": (30, 60, 220)}


def _write_data(root, n: int = 12):
    """Coloured-rectangle images (odd sizes) with two-round conversations and captions."""
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    chat, captions = [], []
    for k in range(n):
        name = list(COLOURS)[k % 3]
        pixels = np.zeros((180 + 17 * k, 300 - 9 * k, 3), np.uint8) + np.uint8(COLOURS[name])
        Image.fromarray(pixels).save(root / f"{k}.png")
        chat.append({"id": f"c{k}", "image": f"{k}.png", "conversations": [
            {"from": "human", "value": "What colour is the picture?\n<image>"},
            {"from": "gpt", "value": f"It is {name}."},
            {"from": "human", "value": "Are you sure?"},
            {"from": "gpt", "value": f"Yes, {name}."},
        ]})  # fmt: skip
        captions.append({"id": f"p{k}", "image": f"{k}.png", "conversations": [
            {"from": "human", "value": "<image>\nDescribe the image briefly."},
            {"from": "gpt", "value": f"A {name} picture."},
        ]})  # fmt: skip
    (root / "chat.json").write_text(json.dumps(chat))
    (root / "captions.json").write_text(json.dumps(captions))
    return root


def _run(tmp, recipe, preset, ckpt, data, train_file, seq_len, max_crops, lr=None):
    from lov_jax.pretrained import load_pretrained
    from lov_jax.train.run import train_from_config

    c = recipe.get_config(preset)
    c.init_from = str(ckpt)
    c.data.train_path, c.data.image_folder = str(data / train_file), str(data)
    c.data.seq_len, c.data.max_crops, c.data.rows_per_host = seq_len, max_crops, 2
    c.mesh.num_devices = 1
    c.train.num_steps = c.train.ckpt_every = STEPS
    c.train.ckpt_keep, c.train.loss_chunk = 1, 256
    if lr is not None:
        c.optim.lr = lr
    before = traverse_util.flatten_dict(load_pretrained(ckpt)[1])
    result = train_from_config(c, tmp / "work", progress=False)
    after = traverse_util.flatten_dict(jax_to_numpy(result.state.params))
    moved = {path[0] for path, v in before.items() if not np.array_equal(v, after[path])}
    return c, [result.losses[s] for s in sorted(result.losses)], moved


def jax_to_numpy(tree):
    import jax

    return jax.tree.map(np.asarray, tree)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return _write_data(tmp_path_factory.mktemp("shapes"))


@pytest.fixture(scope="module")
def llava15_hf(tmp_path_factory):
    from lov_jax.testing.hf_checkpoints import make_tiny_llava_hf

    return make_tiny_llava_hf(tmp_path_factory.mktemp("llava15"), architecture="llava",
                              llm="vicuna", seed=1)  # fmt: skip


@pytest.fixture(scope="module")
def pretrain(tmp_path_factory, llava15_hf, data):
    return _run(tmp_path_factory.mktemp("pretrain"), llava15_pretrain, "tiny_llava15",
                llava15_hf, data, "captions.json", 1024, 1, lr=2e-2)  # fmt: skip


@pytest.fixture(scope="module")
def finetune(tmp_path_factory, llava15_hf, data):
    return _run(tmp_path_factory.mktemp("finetune"), llava15_finetune, "tiny_llava15",
                llava15_hf, data, "chat.json", 1024, 1, lr=3e-3)  # fmt: skip


@pytest.fixture(scope="module")
def next_finetune(tmp_path_factory, data):
    from lov_jax.testing.hf_checkpoints import make_tiny_llava_hf

    # one pinpoint: base + one grid crop, <= ~1000 tokens a sample (the 5 default ones
    # give ~1800; the layout's counts on them are tests/data/test_family_preprocessing.py's)
    ckpt = make_tiny_llava_hf(tmp_path_factory.mktemp("next"), architecture="llava_next",
                              llm="mistral", image_grid_pinpoints=[[336, 336]], seed=2)  # fmt: skip
    # lr 1e-2: the tower's gradients share the global-norm clip with the LLM's
    return _run(tmp_path_factory.mktemp("next_run"), llava_next_finetune, "tiny_llava_next",
                ckpt, data, "chat.json", 1280, 2, lr=1e-2)  # fmt: skip


def _falls(losses, by: float):
    """The mean of the last 5 losses is `by` nats below the first 5's (the data and
    the init are seeded: the same figures every run)."""
    first, last = np.mean(losses[:5]), np.mean(losses[-5:])
    assert np.isfinite(losses).all() and len(losses) == STEPS
    assert last < first - by, (first, last)


def test_llava15_pretrain_trains_the_projector_on_captions(pretrain):
    c, losses, moved = pretrain
    assert (c.data.template, c.optim.trainable) == ("plain", ("projector",))
    _falls(losses, by=0.1)  # measured 6.41 -> 6.26: the projector alone moves a random LLM little
    assert moved == {"multi_modal_projector"}


def test_llava15_finetune_freezes_the_tower(finetune):
    c, losses, moved = finetune
    assert (c.data.template, c.model.vision_aspect_ratio) == ("vicuna_v1", "pad")
    _falls(losses, by=0.3)
    assert moved == {"multi_modal_projector", "language_model"}


def test_llava_next_finetune_trains_everything(next_finetune):
    c, losses, moved = next_finetune
    assert (c.data.template, c.optim.vision_lr) == ("mistral_instruct", 2e-6)
    _falls(losses, by=0.3)
    assert moved == {"vision_tower", "multi_modal_projector", "language_model", "image_newline"}
