"""A short LLaVA-Mini run through the Trainer: its recipe loads, the loss falls, and the
parts that must not train (frozen CLIP, the fixed pos_embed, the detached embed_tokens)
come out bitwise unchanged."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from lov_jax import batch as batch_contract
from lov_jax import config, mini_layout, sharding
from lov_jax.models.llava_onevision import init_params
from lov_jax.train.config_loading import load_config
from lov_jax.train.step import Trainer, stack_micro_batches

IMG, BOS, EOS = 5, 1, 2


def _batch(cfg, rng, rows=2, length=32, samples=3):
    """Rows of packed samples `BOS q IMG*C^2 ANSWER EOS`: the answer (one of 3 ids) is the
    image's colour, so the visual path must carry it."""
    q = cfg.mini.tokens_per_image
    size = cfg.vision.image_size
    b = batch_contract.empty_batch(rows, length, samples, cfg, pad_id=0)
    b["vis_idx"][:] = 0
    for r in range(rows):
        tokens, seg = [], []
        for s in range(samples):
            colour = int(rng.integers(3))
            b["pixels"][r, s] = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255]][colour])
            start = len(tokens)
            tokens += [BOS, 9, *([IMG] * q), 20 + colour, EOS]
            seg += [s + 1] * (len(tokens) - start)
            answer = start + 2 + q  # the colour id: trained (target of the token before)
            b["loss_mask"][r, answer - 1] = b["loss_mask"][r, answer] = 1.0
        n = len(tokens)
        b["tokens"][r, :n], b["segment_ids"][r, :n] = tokens, seg
        b["targets"][r, : n - 1] = tokens[1:]
        starts = np.r_[0, np.flatnonzero(np.diff(seg)) + 1]
        b["positions"][r, :n] = np.arange(n) - np.repeat(starts, np.diff(np.r_[starts, n]))
        b["vis_idx"][r], b["vis_w"][r] = mini_layout.place_taps(
            b["tokens"][r], [IMG], [1] * samples, cfg, samples
        )
    del size
    return stack_micro_batches([b])


def test_recipe_and_loss_falls():
    for spec in ("configs/llava_mini.py:tiny_llava_mini", "configs/llava_mini_pretrain.py"):
        c = load_config(spec)
        assert c.model.preset in ("tiny_llava_mini", "llava_mini_llama31_8b")
    c = load_config("configs/llava_mini.py:tiny_llava_mini")
    assert (c.optim.lr, c.optim.max_grad_norm, c.train.epochs) == (1e-4, 0.5, 2)
    base = config.tiny_llava_mini()
    cfg = base.replace(vision=dataclasses.replace(base.vision, image_size=56))
    optim = c.optim.copy_and_resolve_references()
    optim.lr, optim.warmup_ratio = 3e-3, 0.0
    steps = 8
    mesh = sharding.make_mesh(devices=jax.devices()[:1])
    trainer = Trainer(cfg, optim, mesh, steps, loss_chunk=32)
    params0 = jax.tree.map(np.asarray, init_params(cfg, jax.random.key(0)))
    state = trainer.init_state(jax.tree.map(np.copy, params0))
    batch = _batch(cfg, np.random.default_rng(0))
    losses = []
    for _ in range(steps):
        state, metrics = trainer.step(state, batch)
        losses.append(float(metrics["loss"]))
    assert losses[-1] < losses[0] - 0.5, losses
    after = jax.tree.map(np.asarray, state.params)
    same = lambda *path: np.array_equal(_at(after, path), _at(params0, path))  # noqa: E731
    assert same("compressor", "pos_embed") and same("vision_tower", "pre_layrnorm", "scale")
    assert same("language_model", "embed_tokens", "embedding")
    assert not same("compressor", "query") and not same("prefusion_layers", "mlp", "up_proj")
    assert not same("language_model", "lm_head", "kernel")


def _at(tree, path):
    for p in path:
        tree = tree[p]
    return jax.tree.leaves(tree)[0]
