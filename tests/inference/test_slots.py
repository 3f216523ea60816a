"""SlotDecoder: requests joining a running batch decode exactly as they would alone.

A small context (160 columns) forces both cache moves: a joining prompt of bucket 128
while t < 128 rolls the live rows right; t reaching 160 rolls them left. Greedy rows
must equal `Generator.generate` on each prompt alone, and a sampled row (seeded) must
give the same tokens with or without neighbours.
"""

from __future__ import annotations

import numpy as np
import pytest

from lov_jax.convert.safetensors_io import load_hf_checkpoint
from lov_jax.inference.engine import GenerationConfig, Generator, PromptInputs
from lov_jax.inference.slots import Knobs, SlotDecoder
from lov_jax.testing.hf_checkpoints import make_tiny_hf, single_image_sample

CONTEXT, NEW = 160, 28


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    d = make_tiny_hf(tmp_path_factory.mktemp("slots"), tie_word_embeddings=False, seed=11)
    cfg, params = load_hf_checkpoint(d)
    return cfg, Generator(params, cfg, length_buckets=(64, 128, 2048), crop_buckets=(2,))


def _prompts(cfg, n: int, seed: int, lengths=None) -> list[PromptInputs]:
    rng = np.random.default_rng(seed)
    empty = np.zeros((0, 384, 384, 3), np.uint8)
    lengths = rng.choice([5, 30, 70, 100, 127], n) if lengths is None else lengths
    return [PromptInputs(rng.integers(10, 800, k).astype(np.int32), empty, []) for k in lengths]


def _run(dec: SlotDecoder, prompts, knobs, joins_at, max_new):
    """Join prompt i at step joins_at[i] (into any free row); collect max_new tokens each."""
    outs, rows, step = {}, {}, 0
    waiting = sorted(range(len(prompts)), key=lambda i: joins_at[i])
    while waiting or rows:
        free = [r for r in range(dec.slots) if r not in rows.values()]
        while waiting and free and joins_at[waiting[0]] <= step:
            i, r = waiting.pop(0), free.pop(0)
            rows[i] = r
            outs[i] = [dec.join(r, prompts[i], max_new[i], knobs[i])]
        if rows:
            new = dec.step()
            for i, r in list(rows.items()):
                outs[i].append(int(new[r]))
                if len(outs[i]) == max_new[i]:
                    dec.release(r)
                    del rows[i]
        step += 1
    return [outs[i] for i in range(len(prompts))]


def test_joins_and_rolls_equal_generate_alone(model):
    cfg, gen = model
    # Bucket 64 first (t = 64), then bucket 128 while t < 128: the live row moves right.
    prompts = _prompts(cfg, 7, seed=0, lengths=[30, 100, 5, 70, 127, 30, 60])
    max_new = [NEW, 9, 17, NEW, 4, 21, 13]
    ref = [gen.generate([p], GenerationConfig(max_new_tokens=m, stop_ids=())).tokens[0]
           for p, m in zip(prompts, max_new, strict=True)]  # fmt: skip
    dec = SlotDecoder(gen, slots=3, cache_len=CONTEXT)
    got = _run(dec, prompts, [Knobs()] * 7, [0, 1, 3, 5, 6, 9, 30], max_new)
    assert got == ref
    assert dec.rolls["left"] and dec.rolls["right"], dec.rolls  # both moves were exercised


def test_image_prompt_joins_text_rows(model):
    cfg, gen = model
    s = single_image_sample(30, 50, cfg, seed=2)
    image = PromptInputs(s.tokens, s.crops, s.items)
    text = _prompts(cfg, 2, seed=1)
    prompts = [text[0], image, text[1]]
    ref = [gen.generate([p], GenerationConfig(max_new_tokens=8, stop_ids=())).tokens[0]
           for p in prompts]  # fmt: skip
    dec = SlotDecoder(gen, slots=2, cache_len=2048 + 64)
    assert _run(dec, prompts, [Knobs()] * 3, [0, 2, 4], [8] * 3) == ref


def test_sampled_rows_do_not_depend_on_neighbours(model):
    cfg, gen = model
    prompts = _prompts(cfg, 3, seed=2)
    knobs = [Knobs(temperature=0.8, top_p=0.9, seed=5), Knobs(), Knobs(temperature=1.2, seed=9)]
    alone = _run(SlotDecoder(gen, slots=3, cache_len=CONTEXT), prompts[:1], knobs[:1], [0], [12])
    together = _run(SlotDecoder(gen, slots=3, cache_len=CONTEXT), prompts, knobs, [2, 0, 1],
                    [12] * 3)  # fmt: skip
    assert together[0] == alone[0]
    assert together[0] != together[2]


def test_capacity_is_checked(model):
    cfg, gen = model
    dec = SlotDecoder(gen, slots=2, cache_len=CONTEXT)
    (p,) = _prompts(cfg, 1, seed=3)
    assert "context" in dec.capacity_error(p, CONTEXT)
    long = PromptInputs(np.ones(2000, np.int32), p.crops, [])
    assert "bucket" in dec.capacity_error(long, 1)
    with pytest.raises(ValueError, match="context"):
        dec.join(0, p, CONTEXT, Knobs())
    dec.join(0, p, 4, Knobs())
    with pytest.raises(ValueError, match="busy"):
        dec.join(0, p, 4, Knobs())
