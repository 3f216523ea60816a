"""The batch contract (`lov_jax.batch`): packing, the dummy / abstract batches, the engine's
prefill batch and the taps all follow it; its bank rows are the model's feature bank."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from data_pipelines import packing
from lov_jax import batch, config, sharding, visual_layout
from lov_jax.inference.engine import PREFILL_KEYS, PromptInputs, build_batch
from lov_jax.testing.tokenizers import qwen2_token_ids
from lov_jax.visual_layout import VisualItem

CFG = config.tiny(token_ids=qwen2_token_ids())
P = CFG.vision.num_patches


def _packed(rows: int = 3, length: int = 2048, crops: int = 6) -> dict:
    from test_packing import mix  # samples of every kind (anyres, pad, video, text)

    pack = packing.PackConfig(max_tokens=length, max_crops=crops, window=8, pad_id=CFG.ids.pad)
    return next(packing.pack_batches(mix(12), pack, CFG, batch_size=rows))


def test_bank_rows():
    assert batch.newline_row(3, P) == 3 * P
    assert batch.zero_row(3, P) == 3 * P + 1
    assert batch.bank_rows(3, P) == 3 * P + 2
    # Text positions tap the zero row, the newline item taps the newline row.
    idx, w = visual_layout.place_taps(np.array([1, 2, 3], np.int32), [], CFG, 3)
    assert (idx == batch.zero_row(3, P)).all() and not w.any()


def test_packed_batch_follows_the_contract():
    out = _packed()
    batch.check_batch(out, CFG)
    assert out["tokens"].shape == (3, 2048) and out["pixels"].shape[:2] == (3, 6)
    assert (out["vis_idx"][out["segment_ids"] == 0] == batch.zero_row(6, P)).all()
    assert (out["tokens"][out["segment_ids"] == 0] == CFG.ids.pad).all()
    assert out["vis_w"].any()  # visual tokens tap crop rows, below the newline row
    assert out["vis_idx"][out["vis_w"] != 0].max() <= batch.newline_row(6, P)


def test_empty_and_abstract_batches_follow_the_contract():
    empty = batch.empty_batch(2, 256, 1, CFG, pad_id=CFG.ids.pad)
    batch.check_batch(empty, CFG)
    assert (empty["tokens"] == CFG.ids.pad).all() and not empty["loss_mask"].any()
    assert packing.empty_rows(2, packing.PackConfig(256, 1, pad_id=CFG.ids.pad), CFG).keys() == (
        empty.keys()
    )
    mesh = sharding.make_mesh(fsdp=4, tensor=2)
    spec = sharding.batch_sharding(mesh, micro_batched=True)
    abstract = batch.abstract_batch(8, 256, 1, CFG, micro_batches=2, sharding=spec)
    batch.check_batch(abstract, CFG, micro_batched=True)
    assert abstract["pixels"].shape == (2, 8, 1, CFG.vision.image_size, CFG.vision.image_size, 3)
    # Rows over (data, fsdp) from the rules table; the micro-batch axis whole.
    assert spec.spec == jax.sharding.PartitionSpec(None, ("data", "fsdp"))
    assert sharding.batch_shards(mesh.shape) == 4


def test_contract_violations_are_named():
    bad = batch.empty_batch(2, 256, 1, CFG, pad_id=CFG.ids.pad)
    bad["vis_w"] = bad["vis_w"].astype(np.float64)
    bad["vis_idx"][0, 0, 0] = batch.bank_rows(1, P)
    del bad["targets"]
    with pytest.raises(ValueError) as err:
        batch.check_batch(bad, CFG)
    for part in ("keys", "vis_w: dtype float64", "vis_idx: taps outside the bank rows"):
        assert part in str(err.value)


def test_engine_prefill_batch_uses_the_contract():
    item = VisualItem("pad")
    n = visual_layout.num_tokens(item, CFG)
    tokens = np.array([5, *([CFG.ids.image] * n), 6], np.int32)
    s = CFG.vision.image_size
    crops = np.zeros((visual_layout.num_crops(item, CFG), s, s, 3), np.uint8)
    out = build_batch(
        [PromptInputs(tokens, crops, [item])], CFG, length=n + 8, num_crops=2, batch_size=2,
        pad_id=CFG.ids.pad,
    )  # fmt: skip
    want = batch.shapes(2, n + 8, 2, CFG, PREFILL_KEYS)
    assert {k: out[k].shape for k in PREFILL_KEYS} == want
    assert all(out[k].dtype == batch.FIELDS[k][0] for k in PREFILL_KEYS)
    assert (out["vis_idx"][1] == batch.zero_row(2, P)).all()  # an all-padding row
