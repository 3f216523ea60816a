"""Packer: row invariants, drop reasons, and packed loss == sum of unpacked losses."""

from __future__ import annotations

import jax
import numpy as np

from data_pipelines import packing
from data_pipelines.sample import Sample
from lov_jax import config, visual_layout
from lov_jax.testing.tokenizers import qwen2_token_ids
from lov_jax.visual_layout import VisualItem

CFG = config.tiny(token_ids=qwen2_token_ids())
NPATCH = CFG.vision.num_patches


def make_sample(sid: int, items: list[VisualItem], text: int, seed: int | None = None) -> Sample:
    """Random text around the items' placeholder runs, random crops and loss mask."""
    rng = np.random.default_rng(sid if seed is None else seed)
    parts, cut = [], np.sort(rng.integers(0, text + 1, size=len(items)))
    words = rng.integers(100, 30000, size=text).astype(np.int32)
    prev = 0
    for it, c in zip(items, cut, strict=True):
        pid = CFG.ids.video if it.kind == "video" else CFG.ids.image
        parts += [words[prev:c], np.full(visual_layout.num_tokens(it, CFG), pid, np.int32)]
        prev = c
    tokens = np.concatenate([*parts, words[prev:]]).astype(np.int32)
    n = sum(visual_layout.num_crops(it, CFG) for it in items)
    s = CFG.vision.image_size
    crops = rng.integers(0, 256, size=(n, s, s, 3), dtype=np.uint8)
    targets = np.append(tokens[1:], 0).astype(np.int32)
    mask = (rng.random(len(tokens)) < 0.5).astype(np.float32)
    mask[-1] = 0.0
    return Sample(str(sid), tokens, targets, mask, crops, items)


def mix(n: int, seed: int = 0) -> list[Sample]:
    """Small samples of all kinds (1x1 / 1x2 anyres, 1-3 pad images, 2-4 frames, text)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        kind = i % 4
        if kind == 0:
            items = [
                VisualItem("anyres", image_size=[(200, 300), (380, 500)][int(rng.integers(2))])
            ]
        elif kind == 1:
            items = [VisualItem("pad")] * int(rng.integers(1, 4))
        elif kind == 2:
            items = [VisualItem("video", num_frames=int(rng.integers(2, 5)))]
        else:
            items = []
        out.append(make_sample(i, items, int(rng.integers(5, 600)), seed=seed * 1000 + i))
    return out


def segments(row_seg: np.ndarray) -> list[tuple[int, int, int]]:
    """[(segment id, start, stop)] of a row's non-zero segment ids."""
    out = []
    for k in np.unique(row_seg[row_seg > 0]):
        where = np.flatnonzero(row_seg == k)
        out.append((int(k), int(where[0]), int(where[-1]) + 1))
        assert where[-1] - where[0] + 1 == len(where), "segment not contiguous"
    return out


def test_row_invariants():
    samples = mix(40)
    pack = packing.PackConfig(max_tokens=4096, max_crops=8, window=16)
    stats = packing.PackStats(max_tokens=4096, max_crops=8)
    by_tokens = {s.tokens.tobytes(): s for s in samples}
    seen = []
    for batch in packing.pack_batches(samples, pack, CFG, batch_size=2, stats=stats):
        for b in range(2):
            seg = batch["segment_ids"][b]
            spans = segments(seg)
            assert [k for k, _, _ in spans] == list(range(1, len(spans) + 1))
            end = spans[-1][2] if spans else 0
            assert np.all(seg[end:] == 0)
            assert np.all(batch["loss_mask"][b, end:] == 0) and np.all(batch["vis_w"][b, end:] == 0)
            c0 = 0
            for _, start, stop in spans:
                s = by_tokens[batch["tokens"][b, start:stop].tobytes()]  # whole sample, unsplit
                seen.append(s.id)
                np.testing.assert_array_equal(
                    batch["positions"][b, start:stop], np.arange(stop - start)
                )
                np.testing.assert_array_equal(batch["targets"][b, start:stop], s.targets)
                np.testing.assert_array_equal(batch["loss_mask"][b, start:stop], s.loss_mask)
                c = s.num_crops
                np.testing.assert_array_equal(batch["pixels"][b, c0 : c0 + c], s.crops)
                # Taps of this segment point into its own crop slots or the newline row.
                idx, w = batch["vis_idx"][b, start:stop], batch["vis_w"][b, start:stop]
                used = idx[w != 0]
                own = (used >= c0 * NPATCH) & (used < (c0 + c) * NPATCH)
                assert np.all(own | (used == pack.max_crops * NPATCH))
                text = ~np.isin(s.tokens, [CFG.ids.image, CFG.ids.video])
                assert np.all(w[text] == 0) and np.all(idx[text] == pack.max_crops * NPATCH + 1)
                ref_idx, ref_w = visual_layout.place_taps(s.tokens, s.items, CFG, 8, c0)
                np.testing.assert_array_equal(idx, ref_idx)
                np.testing.assert_array_equal(w, ref_w)
                c0 += c
            assert np.all(batch["pixels"][b, c0:] == 0)
    assert sorted(seen, key=int) == [s.id for s in samples]  # each sample exactly once
    assert stats.samples_packed == len(samples) and not stats.skipped
    assert stats.tokens_used == sum(s.num_tokens for s in samples)
    assert 0 < stats.token_fill <= 1 and 0 < stats.crop_fill <= 1


def test_oversize_dropped_with_reason():
    ok = make_sample(0, [VisualItem("pad")], 50)
    long = make_sample(1, [], 3000)
    crops = make_sample(2, [VisualItem("video", num_frames=9)], 10)
    pack = packing.PackConfig(max_tokens=2048, max_crops=8, window=4)
    stats = packing.PackStats(max_tokens=2048, max_crops=8)
    batches = list(packing.pack_batches([ok, long, crops], pack, CFG, 1, stats=stats))
    assert len(batches) == 1 and stats.samples_packed == 1
    assert stats.skipped == {"too_long_tokens": 1, "too_many_crops": 1}
    assert stats.to_dict()["skip/too_many_crops"] == 1


def test_select_row_balances_and_is_deterministic():
    pack = packing.PackConfig(max_tokens=1000, max_crops=10, window=8)
    # Oldest opens the row; the rest is chosen to fill both budgets in step.
    tokens = np.array([500, 500, 100, 400, 90])
    crops = np.array([5, 0, 5, 5, 0])
    assert packing.select_row(tokens, crops, pack) == [0, 3, 4]
    # Text only: largest that fits first.
    assert packing.select_row([300, 100, 600, 650], [0, 0, 0, 0], pack) == [0, 3]
    assert packing.select_row(tokens, crops, pack) == packing.select_row(tokens, crops, pack)


def test_packed_loss_equals_unpacked():
    from lov_jax.models.llava_onevision import LlavaOnevision, abstract_params
    from lov_jax.models.loss import chunked_cross_entropy

    samples = [
        make_sample(0, [VisualItem("anyres", image_size=(200, 300))], 40),  # 1x1 grid
        make_sample(1, [VisualItem("anyres", image_size=(380, 500))], 40),  # 1x2 grid
        make_sample(2, [VisualItem("pad"), VisualItem("pad")], 40),  # multi-image
        make_sample(3, [VisualItem("video", num_frames=3)], 40),
        make_sample(4, [], 200),  # text only
    ]
    model = LlavaOnevision(CFG)
    # Random params straight from the abstract tree (much faster than model.init here).
    rng = np.random.default_rng(0)
    params = jax.tree.map(
        lambda a: rng.normal(0.0, 0.05, a.shape).astype(a.dtype), abstract_params(CFG, boxed=False)
    )
    head = model.apply({"params": params}, method=model.head_kernel)

    @jax.jit
    def run(batch):
        hidden = model.apply(
            {"params": params}, batch["tokens"], batch["positions"], batch["segment_ids"],
            batch["pixels"], batch["vis_idx"], batch["vis_w"], output="hidden",
        )  # fmt: skip
        per_row = jax.vmap(lambda h, t, m: chunked_cross_entropy(h[None], head, t[None], m[None]))
        return hidden, per_row(hidden, batch["targets"], batch["loss_mask"])

    # Unpacked: each sample alone in its own row (positions from 0, its crops from slot 0).
    one = packing.PackConfig(max_tokens=max(s.num_tokens for s in samples), max_crops=3)
    alone = packing.empty_rows(len(samples), one, CFG)
    for b, s in enumerate(samples):
        packing.write_row(alone, b, [s], one, CFG)
    h_alone, (sample_totals, sample_counts) = run(alone)

    pack = packing.PackConfig(max_tokens=2048, max_crops=5, window=8)
    stats = packing.PackStats(max_tokens=2048, max_crops=5)
    (batch,) = packing.pack_batches(samples, pack, CFG, batch_size=3, stats=stats)
    assert stats.samples_packed == len(samples)
    assert max(len(segments(r)) for r in batch["segment_ids"]) >= 2  # really packed
    h_packed, (row_totals, row_counts) = run(batch)
    total, count = row_totals.sum(), row_counts.sum()

    want_total = float(np.sum(np.asarray(sample_totals, np.float64)))
    want_count = float(np.sum(sample_counts))
    assert float(count) == want_count
    np.testing.assert_allclose(float(total), want_total, rtol=1e-5)
    np.testing.assert_allclose(float(total) / float(count), want_total / want_count, rtol=1e-5)
    # And per segment: the same hidden states as the sample alone.
    by_tokens = {s.tokens.tobytes(): i for i, s in enumerate(samples)}
    for b in range(batch["tokens"].shape[0]):
        for _, start, stop in segments(batch["segment_ids"][b]):
            i = by_tokens[batch["tokens"][b, start:stop].tobytes()]
            np.testing.assert_allclose(
                np.asarray(h_packed[b, start:stop]), np.asarray(h_alone[i, : stop - start]),
                rtol=1e-4, atol=1e-4,
            )  # fmt: skip


def test_text_only_rows_without_crop_budget():
    n_crops = 0
    samples = [make_sample(i, [], 100 + 50 * i) for i in range(6)]
    pack = packing.PackConfig(max_tokens=700, max_crops=n_crops, window=6)
    stats = packing.PackStats(max_tokens=700, max_crops=n_crops)
    batches = list(packing.pack_batches(samples, pack, CFG, batch_size=2, stats=stats))
    assert batches[0]["pixels"].shape[1] == 0
    assert stats.samples_packed == 6 and stats.crop_fill == 0.0
