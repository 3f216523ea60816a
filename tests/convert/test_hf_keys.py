"""HF checkpoint <-> params: every layout, shards, error collection, round trips."""

import json
import re
import shutil

import ml_dtypes
import numpy as np
import pytest

from lov_jax.convert.hf_keys import (
    CheckpointError,
    flatten,
    hf_to_params,
    params_to_hf,
    target_shapes,
)
from lov_jax.convert.safetensors_io import (
    load_hf_checkpoint,
    read_safetensors,
    write_safetensors,
)
from lov_jax.testing.hf_checkpoints import make_tiny_hf

# Small vocab keeps each checkpoint ~1 MB; token ids are never looked up here.
VOCAB = 1024


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """{"tied"|"untied": dir} of HF-saved tiny checkpoints (installed transformers)."""
    root = tmp_path_factory.mktemp("hf")
    return {
        name: make_tiny_hf(root / name, tie_word_embeddings=tied, vocab_size=VOCAB)
        for name, tied in (("tied", True), ("untied", False))
    }


def _file_tensors(d) -> dict[str, np.ndarray]:
    return {k: np.array(v) for k, v in read_safetensors(d).items()}


def _assert_trees_equal(a, b):
    fa, fb = flatten(a), flatten(b)
    assert sorted(fa) == sorted(fb)
    for k in fa:
        assert fa[k].dtype == fb[k].dtype, k
        np.testing.assert_array_equal(fa[k], fb[k], err_msg=k)


# ---- hand-written renames (independent of hf_keys' prefix table) ---------------------

_CURRENT_TO = {
    "legacy": [  # llava-hf hub files (transformers 4.45)
        (r"^vision_tower\.", "vision_tower.vision_model."),
    ],
    "model_452": [  # transformers 4.52+ in-memory / re-saved names
        (r"^vision_tower\.", "model.vision_tower.vision_model."),
        (r"^multi_modal_projector\.", "model.multi_modal_projector."),
        (r"^image_newline$", "model.image_newline"),
        (r"^language_model\.model\.", "model.language_model."),
        (r"^language_model\.lm_head\.", "lm_head."),
    ],
    "lmms_lab": [  # original LLaVA-NeXT
        (r"^vision_tower\.", "model.vision_tower.vision_tower.vision_model."),
        (r"^multi_modal_projector\.linear_1\.", "model.mm_projector.0."),
        (r"^multi_modal_projector\.linear_2\.", "model.mm_projector.2."),
        (r"^image_newline$", "model.image_newline"),
        (r"^language_model\.model\.", "model."),
        (r"^language_model\.lm_head\.", "lm_head."),
    ],
}


def _rename(tensors: dict, layout: str) -> dict:
    out = {}
    for k, v in tensors.items():
        for pat, repl in _CURRENT_TO[layout]:
            if re.match(pat, k):
                k = re.sub(pat, repl, k)
                break
        out[k] = v
    return out


# ---- (a) current layout: shapes and documented transforms -------------------------


@pytest.mark.parametrize("name", ["tied", "untied"])
def test_current_layout_shapes(tiny, name):
    cfg, params = load_hf_checkpoint(tiny[name])
    assert cfg.text.tie_word_embeddings == (name == "tied")
    assert cfg.text.vocab_size == VOCAB
    got = {k: v.shape for k, v in flatten(params).items()}
    assert got == target_shapes(cfg)
    assert ("language_model/lm_head/kernel" in got) == (name == "untied")


@pytest.mark.parametrize("heads", [(6, 2), (3, 1)])
def test_values_follow_documented_transforms(tmp_path, heads):
    import torch
    from transformers import LlavaOnevisionForConditionalGeneration

    nh, kv = heads
    d = make_tiny_hf(
        tmp_path, tie_word_embeddings=False, num_heads=nh, num_kv_heads=kv, vocab_size=VOCAB
    )
    cfg, p = load_hf_checkpoint(d)
    assert (cfg.text.num_heads, cfg.text.num_kv_heads) == heads
    model = LlavaOnevisionForConditionalGeneration.from_pretrained(d)
    sd = {k: v.numpy() for k, v in model.state_dict().items()}
    hd, nv, hv = cfg.text.head_dim, cfg.vision.num_heads, cfg.vision.head_dim
    lm, vt = p["language_model"], p["vision_tower"]
    tattn, vlay = lm["layers"]["self_attn"], vt["encoder"]["layers"]
    eq = np.testing.assert_array_equal
    for layer in range(2):  # stacked axis 0 is the HF layer index
        pre = f"model.language_model.layers.{layer}."
        for n in range(nh):
            w = sd[pre + "self_attn.q_proj.weight"][n * hd : (n + 1) * hd]  # rows of head n
            eq(tattn["q_proj"]["kernel"][layer, :, n], w.T)
            b = sd[pre + "self_attn.q_proj.bias"][n * hd : (n + 1) * hd]
            eq(tattn["q_proj"]["bias"][layer, n], b)
            wo = sd[pre + "self_attn.o_proj.weight"][:, n * hd : (n + 1) * hd]  # cols of head n
            eq(tattn["o_proj"]["kernel"][layer, n], wo.T)
        for n in range(kv):
            w = sd[pre + "self_attn.k_proj.weight"][n * hd : (n + 1) * hd]
            eq(tattn["k_proj"]["kernel"][layer, :, n], w.T)
        eq(lm["layers"]["mlp"]["down_proj"]["kernel"][layer], sd[pre + "mlp.down_proj.weight"].T)
        vpre = f"model.vision_tower.encoder.layers.{layer}."
        for n in range(nv):
            w = sd[vpre + "self_attn.v_proj.weight"][n * hv : (n + 1) * hv]
            eq(vlay["self_attn"]["v_proj"]["kernel"][layer, :, n], w.T)
        eq(vlay["mlp"]["fc1"]["kernel"][layer], sd[vpre + "mlp.fc1.weight"].T)
        eq(vlay["layer_norm2"]["scale"][layer], sd[vpre + "layer_norm2.weight"])
    conv = sd["model.vision_tower.embeddings.patch_embedding.weight"]  # OIHW
    kernel = vt["embeddings"]["patch_embedding"]["kernel"]  # HWIO
    i, j, c, o = 3, 11, 2, 17
    assert kernel[i, j, c, o] == conv[o, c, i, j]
    np.testing.assert_array_equal(kernel, conv.transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(lm["lm_head"]["kernel"], sd["lm_head.weight"].T)
    np.testing.assert_array_equal(p["image_newline"], sd["model.image_newline"])
    # The in-memory torch names (model.vision_tower.embeddings..., lm_head) are a layout too.
    _assert_trees_equal(hf_to_params(model.state_dict(), cfg), p)
    assert torch.is_tensor(next(iter(model.state_dict().values())))


# ---- (b) other layouts ------------------------------------------------------------


@pytest.mark.parametrize("name", ["tied", "untied"])
@pytest.mark.parametrize("layout", ["legacy", "model_452", "lmms_lab"])
def test_other_layouts_load_identically(tiny, tmp_path, name, layout):
    from safetensors.numpy import save_file

    _, want = load_hf_checkpoint(tiny[name])
    renamed = _rename(_file_tensors(tiny[name]), layout)
    renamed["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.ones(4, np.float32)  # dropped
    save_file(renamed, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    shutil.copy(tiny[name] / "config.json", tmp_path)
    _, got = load_hf_checkpoint(tmp_path)
    _assert_trees_equal(got, want)


@pytest.mark.parametrize("layout", ["legacy", "lmms_lab"])
def test_params_to_hf_layouts_match_hand_renames(tiny, layout):
    cfg, p = load_hf_checkpoint(tiny["untied"])
    ours = {"legacy": "hf_legacy", "lmms_lab": "lmms_lab"}[layout]
    want = _rename(_file_tensors(tiny["untied"]), layout)
    got = params_to_hf(p, cfg, layout=ours)
    assert sorted(got) == sorted(want)


def test_config_without_tie_flag_infers_from_lm_head(tiny, tmp_path):
    for name in ("tied", "untied"):
        d = tmp_path / name
        shutil.copytree(tiny[name], d)
        hf = json.loads((d / "config.json").read_text())
        for c in (hf, hf["text_config"]):
            c.pop("tie_word_embeddings")
        hf["text_config"].pop("vocab_size")  # lmms-lab 7B style: trust the tensor
        (d / "config.json").write_text(json.dumps(hf))
        cfg, _ = load_hf_checkpoint(d)
        assert cfg.text.tie_word_embeddings == (name == "tied")
        assert cfg.text.vocab_size == VOCAB


# ---- (c) shards ---------------------------------------------------------------------


def test_sharded_checkpoints(tiny, tmp_path):
    from transformers import LlavaOnevisionForConditionalGeneration

    _, want = load_hf_checkpoint(tiny["untied"])
    model = LlavaOnevisionForConditionalGeneration.from_pretrained(tiny["untied"])
    model.save_pretrained(tmp_path / "hf", max_shard_size="100KB")
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    _assert_trees_equal(load_hf_checkpoint(tmp_path / "hf")[1], want)

    files = write_safetensors(_file_tensors(tiny["untied"]), tmp_path / "ours", "100KB")
    assert len(files) > 1
    shutil.copy(tiny["untied"] / "config.json", tmp_path / "ours")
    _assert_trees_equal(load_hf_checkpoint(tmp_path / "ours")[1], want)


# ---- (d) errors ---------------------------------------------------------------------


def test_all_problems_in_one_error(tiny):
    cfg, _ = load_hf_checkpoint(tiny["untied"])
    t = _file_tensors(tiny["untied"])
    t["vision_tower.head.probe.weight"] = np.zeros(3, np.float32)  # unknown
    del t["language_model.model.layers.1.self_attn.k_proj.weight"]  # missing layer
    t["multi_modal_projector.linear_1.weight"] = np.zeros((48, 31), np.float32)  # shape
    t["model.image_newline"] = t["image_newline"]  # second layout mixed in
    t["language_model.model.layers.2.mlp.up_proj.weight"] = np.zeros((96, 48), np.float32)
    del t["language_model.lm_head.weight"]  # untied -> required
    with pytest.raises(CheckpointError) as e:
        hf_to_params(t, cfg)
    msg = str(e.value)
    assert "6 problems" in msg
    assert "unknown key 'vision_tower.head.probe.weight'" in msg
    assert "missing language_model/layers/self_attn/k_proj/kernel layer 1" in msg
    assert "language_model.model.layers.1.self_attn.k_proj.weight" in msg
    assert "expected [48, 32], got [48, 31]" in msg
    assert "duplicate: 'image_newline' and 'model.image_newline'" in msg
    assert "layer 2 out of range" in msg
    assert "missing language_model/lm_head/kernel" in msg


def test_tied_config_with_lm_head(tiny):
    cfg, want = load_hf_checkpoint(tiny["tied"])
    t = _file_tensors(tiny["tied"])
    t["language_model.lm_head.weight"] = t["language_model.model.embed_tokens.weight"].copy()
    _assert_trees_equal(hf_to_params(t, cfg), want)  # identical head: dropped
    t["language_model.lm_head.weight"][0, 0] += 1
    with pytest.raises(CheckpointError, match="differs from embed_tokens"):
        hf_to_params(t, cfg)


def test_broken_files_are_named(tiny, tmp_path):
    d = tmp_path / "shards"
    write_safetensors(_file_tensors(tiny["untied"]), d, "100KB")
    shard = sorted(d.glob("model-*.safetensors"))[1]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=re.escape(str(shard))):
        read_safetensors(d)
    shard.write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00{oops")
    with pytest.raises(CheckpointError, match=f"{re.escape(str(shard))}: cannot read"):
        read_safetensors(d)
    shard.unlink()
    with pytest.raises(CheckpointError, match=shard.name):
        read_safetensors(d)


# ---- (e) round trips and export -------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_params_to_hf_inverts_bitwise(tiny, tmp_path, dtype):
    import torch
    from safetensors.torch import save_file

    src = tiny["untied"]
    if dtype == "bfloat16":  # a torch-written bf16 file, as on the hub
        sd = {k: torch.from_numpy(v).bfloat16() for k, v in _file_tensors(src).items()}
        save_file(sd, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
        shutil.copy(src / "config.json", tmp_path)
        src = tmp_path
    cfg, params = load_hf_checkpoint(src)
    assert all(v.dtype == np.dtype(dtype) for v in flatten(params).values())
    x = _file_tensors(src)
    if dtype == "bfloat16":  # our bf16 reader agrees with torch bit for bit
        bits = sd["image_newline"].view(torch.int16).numpy()
        np.testing.assert_array_equal(x["image_newline"].view(np.int16), bits)
    back = params_to_hf(hf_to_params(x, cfg), cfg)
    assert sorted(back) == sorted(x)
    for k in x:
        assert back[k].dtype == x[k].dtype and back[k].shape == x[k].shape, k
        assert back[k].tobytes() == x[k].tobytes(), k
    # ...and what we write, torch reads back bit for bit in the same dtype.
    from safetensors.torch import load_file

    write_safetensors(back, tmp_path / "out")
    reread = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert str(reread["image_newline"].dtype) == f"torch.{dtype}"
    for k in x:
        assert reread[k].view(torch.uint8).numpy().tobytes() == x[k].tobytes(), k


def test_dtype_cast(tiny):
    cfg, p32 = load_hf_checkpoint(tiny["tied"])
    _, p16 = load_hf_checkpoint(tiny["tied"], dtype="bfloat16")
    f32, f16 = flatten(p32), flatten(p16)
    for k in f32:
        assert f16[k].dtype == ml_dtypes.bfloat16
        np.testing.assert_array_equal(f16[k], f32[k].astype(ml_dtypes.bfloat16))


@pytest.mark.parametrize("name", ["tied", "untied"])
@pytest.mark.parametrize(("layout", "shard"), [("hf", "5GB"), ("hf_legacy", "200KB")])
def test_export_loads_in_transformers(tiny, tmp_path, name, layout, shard):
    from transformers import LlavaOnevisionForConditionalGeneration as Llava

    cfg, params = load_hf_checkpoint(tiny[name])
    write_safetensors(params_to_hf(params, cfg, layout=layout), tmp_path, shard)
    shutil.copy(tiny[name] / "config.json", tmp_path)
    model, info = Llava.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert not info["mismatched_keys"] and not info["error_msgs"], info
    want = Llava.from_pretrained(tiny[name]).state_dict()
    got = model.state_dict()
    assert sorted(got) == sorted(want)
    for k in want:
        assert got[k].dtype == want[k].dtype
        assert got[k].equal(want[k]), k
