"""The train step on a context axis (lov_jax/models/ring.py) equals one device: packed
multimodal rows (several samples, two images, a two-frame video with 2x2-pooled taps,
text-only samples, padding), a row length that is no multiple of the context blocks (the
step pads it), ring attention with zigzag rows, the sequence-sharded chunked loss.

fp32 with 'highest' matmuls (conftest). Adam's eps is 1, so its first updates are
~ lr * g (no sign amplification of round-off in near-zero gradients) and the params after
two steps compare the gradients. Tolerances: losses rtol 1e-5, params atol 2e-6
(measured at context=4 fsdp=2: 1.9e-7 and 3.0e-8).
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest

from configs import stage2_ov
from lov_jax import config, sharding
from lov_jax.batch import newline_row, zero_row
from lov_jax.models.llava_onevision import init_params
from lov_jax.train.step import Trainer, stack_micro_batches

VOCAB, CROPS, F = 384, 4, 64  # demo: 112px crops, 8x8 patches
CFG = config.demo()  # one layer each (CPU compile time): the scans are the same code
CFG = CFG.replace(
    text=dataclasses.replace(CFG.text, vocab_size=VOCAB, num_layers=1),
    vision=dataclasses.replace(CFG.vision, num_layers=1),
)
LENGTH = 124  # zigzag over 4 devices needs a multiple of 8: the step pads to 128


def _row(rng, with_second_image: bool) -> dict:
    """One packed row: [text, image, newline, text] [video 2 frames, text] [text] ..."""
    tokens, seg, pos, idx, w, trained = [], [], [], [], [], []

    def sample(parts):
        s = max(seg, default=0) + 1
        for kind, arg in parts:
            taps = {"text": [], "image": arg, "video": arg}[kind]
            count = arg if kind == "text" else len(taps)
            for j in range(count):
                tokens.append(int(rng.integers(1, VOCAB)))
                seg.append(s)
                pos.append(len([x for x in seg if x == s]) - 1)
                if kind == "text":
                    idx.append([zero_row(CROPS, F)] * 4)
                    w.append([0.0] * 4)
                    trained.append(j >= count // 2)  # the answer half
                else:
                    idx.append(taps[j][0])
                    w.append(taps[j][1])
                    trained.append(False)

    def image(slot, n):  # anyres-like: 4 taps of random bilinear weights, then a newline
        taps = []
        for _ in range(n):
            t = rng.random(4)
            taps.append((list(slot * F + rng.integers(0, F, 4)), list(t / t.sum())))
        return [*taps, ([newline_row(CROPS, F), 0, 0, 0], [1.0, 0, 0, 0])]

    def video(slots):  # 8x8 -> 4x4 per frame: 2x2 bilinear pooling, weights 1/4
        return [
            ([s * F + (2 * y + dy) * 8 + 2 * x + dx for dy in (0, 1) for dx in (0, 1)], [0.25] * 4)
            for s in slots for y in range(4) for x in range(4)
        ]  # fmt: skip

    sample([("text", 5), ("image", image(0, 12)), ("text", 9)])
    sample([("text", 4), ("video", video((1, 2))), ("text", 7)])
    sample([("text", 17)])
    if with_second_image:
        sample([("text", 3), ("image", image(3, 6)), ("text", 6)])
    pad = LENGTH - len(tokens)
    assert pad >= 0, len(tokens)
    tokens = np.asarray(tokens + [0] * pad, np.int32)
    seg = np.asarray(seg + [0] * pad, np.int32)
    same_next = np.append(seg[1:] == seg[:-1], False) & (seg > 0)
    return {
        "tokens": tokens,
        "targets": np.where(same_next, np.roll(tokens, -1), 0).astype(np.int32),
        "loss_mask": (np.asarray(trained + [False] * pad) & same_next).astype(np.float32),
        "segment_ids": seg,
        "positions": np.asarray(pos + [0] * pad, np.int32),
        "pixels": rng.integers(0, 256, (CROPS, 112, 112, 3), dtype=np.uint8),
        "vis_idx": np.asarray(idx + [[zero_row(CROPS, F)] * 4] * pad, np.int32),
        "vis_w": np.asarray(w + [[0.0] * 4] * pad, np.float32),
    }


def _batches(steps: int) -> list[dict]:
    rng = np.random.default_rng(7)
    rows = [[_row(rng, r == 1) for r in range(2)] for _ in range(steps)]
    return [stack_micro_batches([{k: np.stack([r[k] for r in b]) for k in b[0]}]) for b in rows]


def _train(mesh, batches):
    c = stage2_ov.get_config("demo")
    c.optim.lr, c.optim.vision_lr, c.optim.eps, c.optim.warmup_ratio = 1e-2, 1e-2, 1.0, 0.0
    trainer = Trainer(CFG, c.optim, mesh, 10, loss_chunk=16,
                      context=sharding.context_from_config(c.mesh))  # fmt: skip
    state = trainer.init_state(jax.tree.map(np.asarray, init_params(CFG, jax.random.key(0))))
    losses = []
    for batch in batches:
        state, out = trainer.step(state, batch)
        losses.append((float(out["loss"]), float(out["grad_norm"])))
    return np.asarray(losses), jax.tree.map(np.asarray, state.params)


@pytest.fixture(scope="module")
def single():
    batches = _batches(2)
    return batches, _train(sharding.make_mesh(devices=jax.devices()[:1]), batches)


@pytest.mark.parametrize(
    "shape", [{"context": 4, "fsdp": 2}, {"context": 2, "tensor": 2, "fsdp": 2}], ids=str
)
def test_context_axis_trains_like_one_device(single, shape):
    batches, (want_losses, want_params) = single
    init = jax.tree.leaves(init_params(CFG, jax.random.key(0)))
    pairs = zip(init, jax.tree.leaves(want_params), strict=True)
    moved = max(float(np.max(np.abs(a - b))) for a, b in pairs)
    assert moved > 1e-3  # the steps train: the comparison is not vacuous
    losses, params = _train(sharding.make_mesh(**shape), batches)
    np.testing.assert_allclose(losses, want_losses, rtol=1e-5)
    flat = jax.tree_util.tree_leaves_with_path(params)
    for (path, got), want in zip(flat, jax.tree.leaves(want_params), strict=True):
        np.testing.assert_allclose(got, want, atol=2e-6, err_msg=jax.tree_util.keystr(path))
