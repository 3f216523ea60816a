"""LLaVA-1.5 / LLaVA-NeXT checkpoints <-> params (lov_jax/architectures.py, hf_keys.py).

config.json per architecture (transformers' own config classes build the inputs; the
original haotian-liu flat layout by hand, from its released files), every key layout
(llava-hf legacy, transformers 5, the original), exports that transformers loads with no
missing or unexpected key and the same logits, bit-exact round trips, and every problem of
a bad checkpoint in one error.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

from lov_jax import architectures
from lov_jax.convert.hf_keys import CheckpointError, flatten, hf_to_params, params_to_hf
from lov_jax.convert.safetensors_io import load_hf_checkpoint, read_safetensors
from lov_jax.testing import tokenizers as test_tokenizers

VOCAB = 320
SPEC = test_tokenizers.small_bpe(VOCAB)  # Vicuna-style specials; the ids are its own
IDS = SPEC.token_ids


def _clip(layers: int = 3, image_size: int = 56):
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
        image_size=image_size, patch_size=14, projection_dim=16,
    )  # fmt: skip


def _text(kind: str, *, kv_heads: int = 2, tied: bool = False, vocab: int = VOCAB, **kw):
    from transformers import LlamaConfig, MistralConfig

    cls = {"llama": LlamaConfig, "mistral": MistralConfig}[kind]
    return cls(
        vocab_size=vocab, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=6, num_key_value_heads=kv_heads, tie_word_embeddings=tied,
        bos_token_id=IDS.bos, eos_token_id=IDS.eos[0], pad_token_id=IDS.pad, **kw,
    )  # fmt: skip


def _hf_config(arch: str, text, *, vision=None, **kw):
    from transformers import LlavaConfig, LlavaNextConfig

    cls = {"llava": LlavaConfig, "llava_next": LlavaNextConfig}[arch]
    if arch == "llava_next":
        kw.setdefault("image_grid_pinpoints", [[56, 112], [112, 56], [112, 112]])
    return cls(vision_config=vision or _clip(), text_config=text, image_token_index=IDS.image,
               tie_word_embeddings=text.tie_word_embeddings, **kw)  # fmt: skip


# ---- config.json ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "arch,kind,extra",
    [
        ("llava", "llama", {}),
        ("llava", "mistral", {"sliding_window": 16}),
        ("llava_next", "mistral", {"sliding_window": None}),
        ("llava_next", "llama", {"rope_theta": 5e5}),
    ],
)
def test_transformers_configs_round_trip(arch, kind, extra):
    hf_cfg = _hf_config(arch, _text(kind, **extra))
    cfg = architectures.from_hf_config(hf_cfg.to_dict(), token_ids=IDS)
    assert cfg.architecture == arch and cfg.text.kind == kind and cfg.vision.kind == "clip"
    assert cfg.vision.num_layers == 2  # hidden_states[-2] of 3 layers: 2 layers run
    assert cfg.vision.feature_select == "default" and cfg.vision.num_features == 16
    assert cfg.has_image_newline == (arch == "llava_next")
    assert cfg.text.sliding_window == extra.get("sliding_window")
    if arch == "llava_next":
        assert cfg.vision_aspect_ratio == "anyres"
        assert cfg.image_grid_pinpoints == ((56, 112), (112, 56), (112, 112))
    else:
        assert cfg.vision_aspect_ratio == "center_crop"
    out = cfg.to_hf_config()
    assert out["model_type"] == arch
    assert out["vision_feature_layer"] == -1 and out["vision_config"]["num_hidden_layers"] == 2
    assert architectures.from_hf_config(out, token_ids=IDS) == cfg
    early = {**out, "model_type": "llava"}  # early llava-hf NeXT copies: the class decides
    assert architectures.from_hf_config(early, token_ids=IDS) == cfg
    back = type(hf_cfg)(**json.loads(json.dumps(out)))  # what from_pretrained builds
    assert back.vision_config.num_hidden_layers == 2 and back.vision_feature_layer == -1
    assert back.image_token_index == IDS.image
    assert back.text_config.num_key_value_heads == 2
    assert architectures.hf_class_name(arch) == type(hf_cfg).__name__.replace(
        "Config", "ForConditionalGeneration"
    )


@pytest.mark.parametrize("layer,kept", [(-1, 3), (-3, 1), (1, 1), (3, 3)])
def test_feature_layer_is_the_kept_depth(layer, kept):
    hf = _hf_config("llava", _text("llama"), vision_feature_layer=layer).to_dict()
    assert architectures.from_hf_config(hf).vision.num_layers == kept


def _raises(hf, match, **kw):
    with pytest.raises(ValueError, match=match):
        architectures.from_hf_config(hf, source="/ckpt/config.json", **kw)


def test_bad_fields_name_the_field_and_file():
    hf = _hf_config("llava_next", _text("mistral")).to_dict()
    at = re.escape("/ckpt/config.json: ")
    for layer in (0, 4, -4):
        _raises({**hf, "vision_feature_layer": layer}, at + "vision_feature_layer=")
    _raises({**hf, "vision_feature_layer": [-2, -1]}, "a list of layers is not")
    _raises({**hf, "vision_feature_select_strategy": "cls"}, at + "vision_feature_select")
    _raises({**hf, "model_type": "video_llava"}, at + "model_type='video_llava'")
    _raises({**hf, "image_grid_pinpoints": [[56]]}, at + "image_grid_pinpoints=")
    _raises({**hf, "image_grid_pinpoints": "[[56, 0]]"}, "positive")
    _raises({**hf, "use_image_newline_parameter": False}, "use_image_newline_parameter")
    _raises({**hf, "image_aspect_ratio": "pad"}, at + "vision_aspect_ratio 'pad'")
    _raises({**hf, "projector_hidden_act": "relu"}, at + "projector_hidden_act")
    siglip = {"model_type": "siglip_vision_model", "hidden_size": 32, "intermediate_size": 64,
              "num_hidden_layers": 2, "num_attention_heads": 4}  # fmt: skip
    _raises({**hf, "vision_config": siglip}, "'default' would drop a real patch")


# The original haotian-liu config.json of liuhaotian/llava-v1.5-7b (LLM sizes shrunk; the
# mm_* keys and their values as released).
ORIGINAL_15 = {
    "architectures": ["LlavaLlamaForCausalLM"], "model_type": "llava", "bos_token_id": 1,
    "eos_token_id": 2, "pad_token_id": 0, "hidden_act": "silu", "hidden_size": 48,
    "intermediate_size": 96, "num_attention_heads": 6, "num_hidden_layers": 2,
    "num_key_value_heads": 6, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5,
    "vocab_size": VOCAB, "tie_word_embeddings": False, "image_aspect_ratio": "pad",
    "freeze_mm_mlp_adapter": False, "mm_hidden_size": 1024, "mm_projector_type": "mlp2x_gelu",
    "mm_use_im_patch_token": False, "mm_use_im_start_end": False,
    "mm_vision_select_feature": "patch", "mm_vision_select_layer": -2,
    "mm_vision_tower": "openai/clip-vit-large-patch14-336", "tune_mm_mlp_adapter": False,
    "use_mm_proj": True, "mm_projector_lr": None, "mm_patch_merge_type": "flat",
}  # fmt: skip
# liuhaotian/llava-v1.6-mistral-7b's multimodal keys; pinpoints are (w, h) there.
ORIGINAL_16 = {
    **ORIGINAL_15, "architectures": ["LlavaMistralForCausalLM"], "model_type": "llava_mistral",
    "image_aspect_ratio": "anyres", "mm_patch_merge_type": "spatial_unpad",
    "image_grid_pinpoints": "[[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]",
    "sliding_window": None, "num_key_value_heads": 2,
}  # fmt: skip


def test_original_configs():
    cfg = architectures.from_hf_config(ORIGINAL_15)
    assert (cfg.architecture, cfg.vision_aspect_ratio) == ("llava", "pad")
    assert cfg.projector == "mlp2x_gelu"
    v = cfg.vision
    assert (v.kind, v.hidden_size, v.num_layers, v.image_size, v.num_features) == (
        "clip",
        1024,
        23,
        336,
        576,
    )
    assert (cfg.text.kind, cfg.text.num_kv_heads, cfg.text.tie_word_embeddings) == (
        "llama",
        6,
        False,
    )
    nxt = architectures.from_hf_config(ORIGINAL_16)
    assert (nxt.architecture, nxt.text.kind, nxt.vision_aspect_ratio) == (
        "llava_next",
        "mistral",
        "anyres",
    )
    # (w, h) pairs become (h, w): the original's 1008-wide, 336-high candidate is (336, 1008)
    assert nxt.image_grid_pinpoints == ((672, 336), (336, 672), (672, 672), (336, 1008),
                                        (1008, 336))  # fmt: skip
    assert architectures.from_hf_config({**ORIGINAL_15, "mm_projector_type": "linear"}).projector \
        == "linear"  # fmt: skip
    at = re.escape("/ckpt/config.json: ")
    _raises({**ORIGINAL_15, "mm_use_im_start_end": True}, at + "mm_use_im_start_end=True")
    _raises({**ORIGINAL_15, "mm_vision_resampler": "x"}, "unknown original LLaVA key")
    _raises({**ORIGINAL_15, "mm_vision_tower": "me/tower"}, at + "mm_vision_tower='me/tower'")
    _raises({**ORIGINAL_15, "architectures": ["LlavaMptForCausalLM"], "model_type": "llava"},
            at + "architectures=")  # fmt: skip
    _raises({**ORIGINAL_15, "mm_patch_merge_type": "spatial_unpad"}, "only 'flat'")
    _raises({**ORIGINAL_16, "mm_patch_merge_type": "spatial"}, "'spatial_unpad' only")
    _raises({**ORIGINAL_15, "mm_vision_select_feature": "cls"}, "mm_vision_select_feature")
    _raises({**ORIGINAL_15, "mm_vision_select_layer": -30}, "mm_vision_select_layer=-30")


# ---- checkpoints ----------------------------------------------------------------------


def _save(out, arch: str, text, seed: int):
    from transformers import LlavaForConditionalGeneration, LlavaNextForConditionalGeneration

    cls = {"llava": LlavaForConditionalGeneration, "llava_next": LlavaNextForConditionalGeneration}
    torch.manual_seed(seed)
    model = cls[arch](_hf_config(arch, text)).eval()
    with torch.no_grad():  # random init leaves norms at 1 / 0: make every term count
        for name, p in model.named_parameters():
            if "norm" in name or "image_newline" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(out)
    test_tokenizers.save_tokenizer(SPEC, out)
    return out


CHECKPOINTS = {
    "llava_llama": ("llava", lambda: _text("llama")),
    "next_mistral": ("llava_next", lambda: _text("mistral", kv_heads=6, sliding_window=None)),
    "next_llama_tied": ("llava_next", lambda: _text("llama", tied=True)),
}


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("family")
    return {
        name: _save(root / name, arch, text(), seed)
        for seed, (name, (arch, text)) in enumerate(CHECKPOINTS.items())
    }


def _hf_model(d):
    cfg = json.loads((d / "config.json").read_text())
    return architectures.hf_class(architectures.architecture_of(cfg)).from_pretrained(d).eval()


def _logits(model, cfg) -> np.ndarray:
    """HF logits on one image between text tokens (the image's token count from HF)."""
    s = model.config.vision_config.image_size
    g = torch.Generator().manual_seed(0)
    if cfg.architecture == "llava":
        pixels, extra = torch.randn(1, 3, s, s, generator=g), {}
        n = cfg.vision.num_features
    else:
        sizes = torch.tensor([[50, 110]])  # a 1x2 grid (+ base), unpadded on the height
        pixels, extra = torch.randn(1, 3, 3, s, s, generator=g), {"image_sizes": sizes}
        feats = model.model.get_image_features(
            pixels, sizes, vision_feature_layer=model.config.vision_feature_layer,
            vision_feature_select_strategy="default",
        ).pooler_output  # fmt: skip
        n = feats[0].shape[0]
    ids = torch.tensor([[1, 5, 6] + [cfg.ids.image] * n + [7, 8, 9]])
    with torch.no_grad():
        return model(input_ids=ids, pixel_values=pixels, **extra).logits.numpy()


def _assert_trees_equal(a, b):
    fa, fb = flatten(a), flatten(b)
    assert sorted(fa) == sorted(fb)
    for k in fa:
        assert fa[k].dtype == fb[k].dtype, k
        np.testing.assert_array_equal(fa[k], fb[k], err_msg=k)


@pytest.mark.parametrize("name", list(CHECKPOINTS))
def test_import_reads_the_used_tensors(ckpts, name):
    cfg, p = load_hf_checkpoint(ckpts[name])
    sd = {k: v.numpy() for k, v in _hf_model(ckpts[name]).state_dict().items()}
    vt = p["vision_tower"]
    tower = "model.vision_tower.vision_model." if any(
        k.startswith("model.vision_tower.vision_model.") for k in sd
    ) else "model.vision_tower."  # fmt: skip
    np.testing.assert_array_equal(vt["embeddings"]["class_embedding"],
                                  sd[tower + "embeddings.class_embedding"])  # fmt: skip
    np.testing.assert_array_equal(
        vt["embeddings"]["patch_embedding"]["kernel"],
        sd[tower + "embeddings.patch_embedding.weight"].transpose(2, 3, 1, 0),
    )
    np.testing.assert_array_equal(vt["pre_layrnorm"]["scale"], sd[tower + "pre_layrnorm.weight"])
    q = vt["encoder"]["layers"]["self_attn"]["q_proj"]["kernel"]
    assert q.shape[0] == 2  # the third layer is after the feature layer: never read
    np.testing.assert_array_equal(
        q[1].reshape(32, -1), sd[tower + "encoder.layers.1.self_attn.q_proj.weight"].T
    )
    assert "post_layernorm" not in vt
    assert ("image_newline" in p) == (cfg.architecture == "llava_next")
    assert ("lm_head" in p["language_model"]) == (not cfg.text.tie_word_embeddings)
    # transformers' in-memory names (model.*, lm_head) are a layout too
    _assert_trees_equal(hf_to_params(sd, cfg, tower_layers=3), p)


def _write(d, tensors, config):
    from safetensors.numpy import save_file

    d.mkdir()
    save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
    (d / "config.json").write_text(json.dumps(config))
    return d


@pytest.mark.parametrize("layout", ["hf", "hf_legacy"])
@pytest.mark.parametrize("name", list(CHECKPOINTS))
def test_export_loads_unchanged_with_the_same_logits(ckpts, tmp_path, name, layout):
    cfg, p = load_hf_checkpoint(ckpts[name])
    d = _write(tmp_path / "out", params_to_hf(p, cfg, layout=layout), cfg.to_hf_config())
    cls = architectures.hf_class(cfg.architecture)
    model, info = cls.from_pretrained(d, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    np.testing.assert_array_equal(_logits(model.eval(), cfg), _logits(_hf_model(ckpts[name]), cfg))
    _assert_trees_equal(load_hf_checkpoint(d)[1], p)  # ours -> HF -> ours, bit for bit


# What the original names are, written out by hand (independent of hf_keys' tables).
_TO_ORIGINAL = [
    (r"^vision_tower\.(vision_model\.)?", "model.vision_tower.vision_tower.vision_model."),
    (r"^multi_modal_projector\.linear_1\.", "model.mm_projector.0."),
    (r"^multi_modal_projector\.linear_2\.", "model.mm_projector.2."),
    (r"^image_newline$", "model.image_newline"),
    (r"^language_model\.model\.", "model."),
    (r"^language_model\.lm_head\.", "lm_head."),
]


def _original_names(tensors: dict) -> dict:
    out = {}
    for k, v in tensors.items():
        for pat, repl in _TO_ORIGINAL:
            k = re.sub(pat, repl, k)
        out[k] = v
    return out


@pytest.mark.parametrize("name", ["llava_llama", "next_mistral"])
def test_original_layout_both_ways(ckpts, tmp_path, name):
    cfg, p = load_hf_checkpoint(ckpts[name])
    files = {k: np.array(v) for k, v in read_safetensors(ckpts[name]).items()}
    want = _original_names(files)
    got = params_to_hf(p, cfg, layout="original")
    assert set(got) <= set(want)  # the tower's third layer is the only one not ours
    assert set(want) - set(got) == {k for k in want if ".layers.2." in k and "vision" in k}
    _assert_trees_equal(hf_to_params(got, cfg), p)

    # An original checkpoint as released: no tower weights (the original code loads the
    # tower from mm_vision_tower), here a local CLIPVisionModel dir next to it.
    from transformers import CLIPVisionModel

    hf = _hf_model(ckpts[name])
    tower = CLIPVisionModel(hf.config.vision_config)
    tower.load_state_dict(hf.model.vision_tower.state_dict())
    window = {"sliding_window": cfg.text.sliding_window} if cfg.text.kind == "mistral" else {}
    text = _text(cfg.text.kind, kv_heads=cfg.text.num_kv_heads, **window).to_dict()
    config = {**text, "architectures": [f"Llava{cfg.text.kind.capitalize()}ForCausalLM"],
              "model_type": "llava", "mm_vision_tower": "clip", "mm_projector_type": "mlp2x_gelu",
              "mm_vision_select_layer": -2, "mm_vision_select_feature": "patch"}  # fmt: skip
    if cfg.architecture == "llava_next":
        points = [[w, h] for h, w in cfg.image_grid_pinpoints]  # the original's (w, h)
        config.update(image_aspect_ratio="anyres", mm_patch_merge_type="spatial_unpad",
                      image_grid_pinpoints=points)  # fmt: skip
    else:
        config.update(image_aspect_ratio="pad", mm_patch_merge_type="flat")
    no_tower = {k: v for k, v in want.items() if "vision_tower" not in k}
    d = _write(tmp_path / "orig", no_tower, config)
    tower.save_pretrained(d / "clip")
    test_tokenizers.save_tokenizer(SPEC, d)
    got_cfg, got_p = load_hf_checkpoint(d)
    _assert_trees_equal(got_p, p)
    assert got_cfg.replace(vision_aspect_ratio=cfg.vision_aspect_ratio) == cfg
    # without a tokenizer holding '<image>' (as original ones are) the image id is unknown
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (d / f).unlink(missing_ok=True)
    with pytest.raises(ValueError, match="no image_token_index.*IMAGE_TOKEN_INDEX"):
        load_hf_checkpoint(d)
    # a hub tower name (not downloadable here) with no tower weights: one clear error
    hub = {**config, "mm_vision_tower": "openai/clip-vit-large-patch14-336"}
    (d / "config.json").write_text(json.dumps(hub))
    with pytest.raises(CheckpointError, match="no vision tower weights.*is no local dir"):
        load_hf_checkpoint(d)
    (d / "model.safetensors").rename(d / "pytorch_model-00001-of-00001.bin")
    with pytest.raises(CheckpointError, match="only PyTorch pickles"):
        load_hf_checkpoint(d)


def test_every_problem_in_one_error(ckpts):
    cfg, p = load_hf_checkpoint(ckpts["next_mistral"])
    t = params_to_hf(p, cfg)
    t.pop("language_model.model.layers.1.mlp.up_proj.weight")
    t.pop("image_newline")
    t["language_model.model.layers.0.self_attn.q_proj.bias"] = np.zeros(48, np.float32)
    t["multi_modal_projector.linear_3.weight"] = np.zeros((4, 4), np.float32)
    t["vision_tower.encoder.layers.0.mlp.fc1.weight"] = np.zeros((3, 3), np.float32)
    t["vision_tower.encoder.layers.3.mlp.fc1.weight"] = np.zeros((64, 32), np.float32)
    with pytest.raises(CheckpointError) as e:
        hf_to_params(t, cfg, tower_layers=3)
    msg = str(e.value)
    assert "(6 problems)" in msg, msg
    for part in (
        "missing language_model/layers/mlp/up_proj/kernel layer 1",
        "missing image_newline",
        "q_proj.bias",
        "unknown key 'multi_modal_projector.linear_3.weight'",
        "shape mismatch 'vision_tower.encoder.layers.0.mlp.fc1.weight'",
        "layer 3 out of range",
    ):
        assert part in msg, (part, msg)


def test_orbax_round_trip_through_the_commands(ckpts, tmp_path):
    """lov-jax convert hf-to-orbax, then orbax-to-hf in each layout (fp32, so bit-exact)."""
    from transformers import CLIPVisionModel

    from lov_jax import cli

    src = ckpts["next_mistral"]
    cfg, want = load_hf_checkpoint(src)
    orbax = tmp_path / "orbax"
    assert cli.main(["convert", "hf-to-orbax", "--hf", str(src), "--out", str(orbax),
                     "--no-progress"]) == 0  # fmt: skip
    for layout in ("hf", "original"):
        out = tmp_path / layout
        argv = ["convert", "orbax-to-hf", "--ckpt", str(orbax), "--out", str(out),
                "--layout", layout, "--no-progress"]  # fmt: skip
        assert cli.main(argv) == 0
        got_cfg, got = load_hf_checkpoint(out)
        _assert_trees_equal(got, want)
        assert got_cfg == cfg
    model, info = architectures.hf_class(cfg.architecture).from_pretrained(
        tmp_path / "hf", output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    np.testing.assert_array_equal(_logits(model.eval(), cfg), _logits(_hf_model(src), cfg))
    # the original export: a flat config.json and the tower as its own CLIPVisionModel
    flat = json.loads((tmp_path / "original" / "config.json").read_text())
    assert flat["model_type"] == "llava_mistral" and flat["mm_vision_tower"] == "vision_tower"
    assert not any("vision_tower" in k for k in read_safetensors(tmp_path / "original"))
    tower, info = CLIPVisionModel.from_pretrained(
        tmp_path / "original" / "vision_tower", output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert tower.config.num_hidden_layers == cfg.vision.num_layers
