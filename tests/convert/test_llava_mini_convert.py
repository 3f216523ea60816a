"""LLaVA-Mini's released layout (docs/reference_family.md B.9): key names written here from
the reference's module tree, converted in and back bit-exact; config.json both ways."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from lov_jax import architectures, config
from lov_jax.convert import hf_keys


def _released_state_dict(cfg: config.ModelConfig, tower_layers: int, seed: int = 0) -> dict:
    """A random checkpoint in the released names and PyTorch shapes (B.9.3, A.9)."""
    rng = np.random.default_rng(seed)
    t, v, m = cfg.text, cfg.vision, cfg.mini
    h, d, q = t.hidden_size, v.hidden_size, m.tokens_per_image
    kv = t.num_kv_heads * t.head_dim

    def layer(prefix):
        return {
            f"{prefix}.self_attn.q_proj.weight": (t.num_heads * t.head_dim, h),
            f"{prefix}.self_attn.k_proj.weight": (kv, h),
            f"{prefix}.self_attn.v_proj.weight": (kv, h),
            f"{prefix}.self_attn.o_proj.weight": (h, t.num_heads * t.head_dim),
            f"{prefix}.mlp.gate_proj.weight": (t.intermediate_size, h),
            f"{prefix}.mlp.up_proj.weight": (t.intermediate_size, h),
            f"{prefix}.mlp.down_proj.weight": (h, t.intermediate_size),
            f"{prefix}.input_layernorm.weight": (h,),
            f"{prefix}.post_attention_layernorm.weight": (h,),
        }

    shapes = {"model.embed_tokens.weight": (t.vocab_size, h), "model.norm.weight": (h,),
              "lm_head.weight": (t.vocab_size, h)}  # fmt: skip
    for i in range(t.num_layers):
        shapes.update(layer(f"model.layers.{i}"))
    for i in range(m.prefusion_layers):
        shapes.update(layer(f"model.prefusion_layers.{i}"))
    shapes.update({
        "model.mm_projector.0.weight": (h, d), "model.mm_projector.0.bias": (h,),
        "model.mm_projector.2.weight": (h, h), "model.mm_projector.2.bias": (h,),
        "model.compressor.query": (q, d), "model.compressor.pos_embed": (q, d),
        "model.compressor.attn.in_proj_weight": (3 * d, d),
        "model.compressor.attn.in_proj_bias": (3 * d,),
        "model.compressor.attn.out_proj.weight": (d, d),
        "model.compressor.attn.out_proj.bias": (d,),
        **{f"model.compressor.ln_{n}.{p}": (d,) for n in ("q", "kv") for p in ("weight", "bias")},
    })  # fmt: skip
    tower = "model.vision_tower.vision_tower.vision_model."
    p = v.patch_size
    shapes.update({
        tower + "embeddings.class_embedding": (d,),
        tower + "embeddings.patch_embedding.weight": (d, 3, p, p),
        tower + "embeddings.position_embedding.weight": (v.num_patches + 1, d),
        tower + "pre_layrnorm.weight": (d,), tower + "pre_layrnorm.bias": (d,),
        tower + "post_layernorm.weight": (d,), tower + "post_layernorm.bias": (d,),
    })  # fmt: skip
    for i in range(tower_layers):
        e = f"{tower}encoder.layers.{i}."
        for n in ("q_proj", "k_proj", "v_proj", "out_proj"):
            shapes[e + f"self_attn.{n}.weight"], shapes[e + f"self_attn.{n}.bias"] = (d, d), (d,)
        for n in ("layer_norm1", "layer_norm2"):
            shapes[e + f"{n}.weight"], shapes[e + f"{n}.bias"] = (d,), (d,)
        inter = v.intermediate_size
        shapes[e + "mlp.fc1.weight"], shapes[e + "mlp.fc1.bias"] = (inter, d), (inter,)
        shapes[e + "mlp.fc2.weight"], shapes[e + "mlp.fc2.bias"] = (d, inter), (d,)
    return {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}


@pytest.mark.parametrize("grid,ratio", [(2, 1), (1, 2)])
def test_released_layout_round_trip(grid, ratio):
    mini = config.MiniConfig(compressor_size=grid, prefusion_layers=3, resolution_ratio=ratio)
    cfg = config.tiny_llava_mini(mini=mini)
    kept = cfg.vision.num_layers
    sd = _released_state_dict(cfg, tower_layers=kept + 1, seed=grid)
    params = hf_keys.hf_to_params(sd, cfg, tower_layers=kept + 1)
    flat = hf_keys.flatten(params)
    assert {k: v.shape for k, v in flat.items()} == hf_keys.target_shapes(cfg)
    # the head-split compressor leaves hold PyTorch's stacked q; k; v rows
    d = cfg.vision.hidden_size
    np.testing.assert_array_equal(
        flat["compressor/in_proj_kernel"][:, 1].reshape(d, d),
        sd["model.compressor.attn.in_proj_weight"][d : 2 * d].T,
    )
    back = hf_keys.params_to_hf(params, cfg, layout="original")
    skipped = f"model.vision_tower.vision_tower.vision_model.encoder.layers.{kept}."
    norms = "model.vision_tower.vision_tower.vision_model.post_layernorm."
    want = {k: x for k, x in sd.items() if not k.startswith((skipped, norms))}
    assert set(back) - {norms + "weight", norms + "bias"} == set(want)
    for k, x in want.items():
        assert back[k].dtype == x.dtype and np.array_equal(back[k], x), k


def test_released_layout_problems_in_one_error():
    cfg = config.tiny_llava_mini()
    kept = cfg.vision.num_layers
    sd = _released_state_dict(cfg, tower_layers=kept)
    del sd["model.compressor.query"]
    sd["model.compressor.extra"] = np.zeros(3, np.float32)
    sd["model.prefusion_layers.0.mlp.up_proj.weight"] = np.zeros((5, 5), np.float32)
    sd["model.prefusion_layers.7.input_layernorm.weight"] = np.zeros(48, np.float32)
    with pytest.raises(hf_keys.CheckpointError) as e:
        hf_keys.hf_to_params(sd, cfg)
    msg = str(e.value)
    assert "(4 problems)" in msg
    parts = ("missing compressor/query", "'model.compressor.extra'", "layer 7 out of range",
             "model.prefusion_layers.0.mlp.up_proj.weight")  # fmt: skip
    for part in parts:
        assert part in msg, part


def _released_config() -> dict:
    """config.json as the reference's train() writes it (B.9.2)."""
    return {
        "architectures": ["LlavaMiniLlamaForCausalLM"], "model_type": "llava_mini_llama",
        "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
        "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
        "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "max_position_embeddings": 131072,
        "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
        "tie_word_embeddings": False, "hidden_act": "silu", "attention_bias": False,
        "mlp_bias": False, "pretraining_tp": 1,
        "mm_vision_tower": "openai/clip-vit-large-patch14-336", "mm_hidden_size": 1024,
        "mm_projector_type": "mlp2x_gelu", "use_mm_proj": True, "mm_vision_select_layer": -2,
        "mm_vision_select_feature": "patch", "mm_patch_merge_type": "flat",
        "image_aspect_ratio": "square", "compressor_size": 1, "prefusion_layer_num": 4,
        "tokenizer_padding_side": "right", "tokenizer_model_max_length": 4096,
        "mm_use_im_start_end": False, "mm_use_im_patch_token": False,
        "tune_mm_mlp_adapter": False, "freeze_mm_mlp_adapter": False, "mm_projector_lr": None,
    }  # fmt: skip


def test_config_json_both_ways():
    released = architectures.from_hf_config(_released_config())
    preset = config.llava_mini_llama31_8b()
    assert released == preset  # resolution_ratio absent: 1, as the eval scripts read it
    hd = architectures.from_hf_config({**_released_config(), "resolution_ratio": 2})
    assert hd.mini == dataclasses.replace(preset.mini, resolution_ratio=2)
    for cfg in (config.tiny_llava_mini(), hd.replace(vision_aspect_ratio="pad")):
        assert architectures.from_hf_config(cfg.to_hf_config()) == cfg
    bad = [({"compressor_size": 0}, "compressor_size=0"),
           ({"mm_patch_merge_type": "spatial_unpad"}, "mm_patch_merge_type"),
           ({"mm_spatial_pool_mode": "x"}, "unknown LLaVA-Mini key"),
           ({"image_aspect_ratio": "anyres"}, "image_aspect_ratio")]  # fmt: skip
    for change, match in bad:
        with pytest.raises(ValueError, match=match):
            architectures.from_hf_config({**_released_config(), **change}, source="x.json")
