"""The LLaVA-1.5 / NeXT parts vs HF (PyTorch, CPU, fp32; docs/reference_family.md A.14):
the CLIP tower vs `CLIPVisionModel.hidden_states[-2]` (only the layers used are run),
Llama / Mistral vs `LlamaForCausalLM` / `MistralForCausalLM` (GQA, a sliding window
shorter than the sequence, packed segments, cached decode), the families' config.json
readers, and the full LLaVA-1.5 model vs `LlavaForConditionalGeneration`."""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from lov_jax import config
from lov_jax.convert.key_tables import Row
from lov_jax.models import families
from lov_jax.models.kv_cache import KVCache

ATOL = 1e-4


def _check(ours, ref, atol=ATOL):
    ours, ref = np.asarray(ours), np.asarray(ref)
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    diff = float(np.max(np.abs(ours - ref)))
    assert diff <= atol, f"max-abs-diff {diff:.3g} > {atol}"


def _perturb(model: torch.nn.Module, seed: int) -> None:
    """Random init leaves norms at 1/0 and biases at 0: move them so a missing or
    misplaced term shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias") or "class_embedding" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)


def _params_from_table(rows: tuple[Row, ...], state: dict, shapes: dict, prefix: str = "") -> dict:
    """A family's key table read forwards on a torch state dict -> our nested params (the
    leaves of `shapes`, {path: shape}); stacked leaves take layers 0..n-1 only."""
    out: dict = {}
    for hf, path, tf in rows:
        if path not in shapes:
            continue
        shape = shapes[path]
        if "{layer}" in hf:
            layers = [state[prefix + hf.format(layer=i)].numpy() for i in range(shape[0])]
            value = np.stack([tf.to_ours(x, shape[1:]) for x in layers])
        else:
            value = tf.to_ours(state[prefix + hf].numpy(), shape)
        node = out
        *parents, leaf = path.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = jnp.asarray(value)
    return out


def _shapes(module, *args) -> dict:
    from lov_jax.convert.hf_keys import flatten

    tree = jax.eval_shape(lambda: module.init(jax.random.key(0), *args))["params"]
    tree = nn.meta.unbox(tree)
    return {k: tuple(v.shape) for k, v in flatten(tree).items()}


# ---- CLIP tower ---------------------------------------------------------------------------

# image 70 = 5x5 patches of 14 (25 + CLS); 4 layers in the file, -2 keeps 3.
CLIP_HF = {"hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 4,
           "num_attention_heads": 4, "image_size": 70, "patch_size": 14}  # fmt: skip


@pytest.fixture(scope="module")
def clip():
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(0)
    hf = CLIPVisionModel(CLIPVisionConfig(**CLIP_HF)).eval()
    _perturb(hf, 0)
    return hf


@pytest.mark.parametrize("select", ["default", "full"])
def test_clip_tower_equals_hidden_states_minus_2(clip, select):
    from lov_jax.models.clip import ClipVisionTower

    vcfg = families.vision("clip").from_hf(clip.config.to_dict())
    assert vcfg.hidden_act == "quick_gelu" and vcfg.layer_norm_eps == 1e-5
    vcfg = dataclasses.replace(vcfg, num_layers=3, feature_select=select)  # hs[-2] of 4
    assert vcfg.num_features == 25 + (select == "full")
    # odd content: saturated rows, a constant crop, noise
    rng = np.random.default_rng(3)
    crops = rng.integers(0, 256, (3, 70, 70, 3), dtype=np.uint8)
    crops[0, :9] = 255
    crops[1] = 7
    x = crops.astype(np.float32) / 255
    x = (x - np.float32(config.OPENAI_CLIP_MEAN)) / np.float32(config.OPENAI_CLIP_STD)
    with torch.no_grad():
        out = clip(torch.from_numpy(x.transpose(0, 3, 1, 2)), output_hidden_states=True)
    ref = out.hidden_states[-2].numpy()
    ref = ref[:, 1:] if select == "default" else ref
    tower = ClipVisionTower(vcfg)
    shapes = _shapes(tower, jnp.asarray(crops))
    assert shapes["encoder/layers/mlp/fc1/kernel"][0] == 3
    assert not any("post_layernorm" in p for p in shapes)  # never used, never stored
    assert "embeddings/patch_embedding/bias" not in shapes
    params = _params_from_table(families.vision("clip").keys, clip.state_dict(),
                                shapes)  # fmt: skip
    ours = tower.apply({"params": params}, jnp.asarray(crops))
    _check(ours, ref)
    # the float path (already normalised pixels) is the same tower
    _check(tower.apply({"params": params}, jnp.asarray(x)), ref)
    # a wrong size is refused as HF refuses it
    with pytest.raises(ValueError, match="takes 70x70 crops"):
        tower.apply({"params": params}, jnp.zeros((1, 84, 84, 3), jnp.uint8))


# ---- Llama / Mistral -----------------------------------------------------------------------

LLM_SIZES = {"vocab_size": 101, "hidden_size": 32, "intermediate_size": 56,
             "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
             "head_dim": 8, "rms_norm_eps": 1e-5, "tie_word_embeddings": False}  # fmt: skip


def _hf_llm(kind: str, seed: int, **kw):
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

    cls, model = {"llama": (LlamaConfig, LlamaForCausalLM),
                  "mistral": (MistralConfig, MistralForCausalLM)}[kind]  # fmt: skip
    torch.manual_seed(seed)
    hf_cfg = cls(**{**LLM_SIZES, **kw})
    hf = model(hf_cfg).eval()
    _perturb(hf, seed)
    return hf


class _Ours:
    def __init__(self, hf, kind: str):
        from lov_jax.models.decoder import Decoder

        self.cfg = families.llm(kind).from_hf(hf.config.to_dict())
        self.model = Decoder(self.cfg)
        ids = jnp.zeros((1, 4), jnp.int32)
        shapes = _shapes(self.model, ids, ids, jnp.ones_like(ids))
        self.params = _params_from_table(families.llm(kind).keys, hf.state_dict(), shapes)
        self.shapes = shapes

    def __call__(self, ids, positions, segment_ids, cache=None):
        return self.model.apply(
            {"params": self.params}, jnp.asarray(ids), jnp.asarray(positions),
            jnp.asarray(segment_ids), cache,
        )  # fmt: skip


def _hf_logits(hf, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return hf(input_ids=torch.from_numpy(ids.astype(np.int64))).logits.numpy()


LLMS = {
    # Vicuna-style MHA without biases (rope 1e4)
    "llama_mha": ("llama", {"num_key_value_heads": 4}),
    # Llama-3 style: GQA, rope_theta 5e5, head_dim != hidden / heads
    "llama3_gqa": ("llama", {"rope_parameters": {"rope_theta": 5e5, "rope_type": "default"},
                             "head_dim": 16}),
    "mistral_window": ("mistral", {"sliding_window": 5,
                                   "rope_parameters": {"rope_theta": 1e6, "rope_type": "default"}}),
    "mistral_null": ("mistral", {"sliding_window": None}),
}  # fmt: skip


@pytest.fixture(scope="module", params=list(LLMS))
def llm(request):
    kind, kw = LLMS[request.param]
    hf = _hf_llm(kind, seed=len(request.param), **kw)
    return request.param, hf, _Ours(hf, kind)


def test_llm_logits_equal_hf(llm):
    name, hf, ours = llm
    kind, kw = LLMS[name]
    assert ours.cfg.kind == kind and ours.cfg.attention_bias is False
    assert ours.cfg.sliding_window == kw.get("sliding_window", 4096 if kind == "mistral" else None)
    assert not any(p.endswith("q_proj/bias") for p in ours.shapes)
    ids = np.random.default_rng(1).integers(0, 101, (2, 23))
    pos = np.broadcast_to(np.arange(23), ids.shape)
    ref = _hf_logits(hf, ids)
    _check(ours(ids, pos, np.ones_like(ids)), ref)
    if ours.cfg.sliding_window is not None and ours.cfg.sliding_window < ids.shape[1]:
        # the window is doing something: full causal attention is another model
        from lov_jax.models.decoder import Decoder

        full = Decoder(dataclasses.replace(ours.cfg, sliding_window=None))
        out = full.apply({"params": ours.params}, ids, pos, np.ones_like(ids))
        assert np.max(np.abs(np.asarray(out) - ref)) > 100 * ATOL


def test_llm_packed_segments_equal_separate_hf_calls(llm):
    """Two samples in one row (positions restart, segment ids 1, 2, padding 0) give each
    sample's own HF logits: neither attention nor the window crosses a segment."""
    _, hf, ours = llm
    rng = np.random.default_rng(2)
    a, b = rng.integers(0, 101, 13), rng.integers(0, 101, 9)
    row = np.zeros(26, np.int64)
    row[:13], row[13:22] = a, b
    seg = np.zeros(26, np.int32)
    seg[:13], seg[13:22] = 1, 2
    pos = np.zeros(26, np.int32)
    pos[:13], pos[13:22] = np.arange(13), np.arange(9)
    out = np.asarray(ours(row[None], pos[None], seg[None]))[0]
    _check(out[:13], _hf_logits(hf, a[None])[0])
    _check(out[13:22], _hf_logits(hf, b[None])[0])


def test_llm_cached_decode_equals_full_forward(llm):
    """Prefill 7 tokens into an empty cache, then decode one token at a time: every step's
    logits equal the full forward's at that position (and HF's), with the window."""
    _, hf, ours = llm
    cfg = ours.cfg
    ids = np.random.default_rng(4).integers(0, 101, (1, 16))
    full = np.asarray(ours(ids, np.arange(16)[None], np.ones_like(ids)))
    _check(full, _hf_logits(hf, ids))
    seg = jnp.ones((1, 16), jnp.int32)
    cache = KVCache.empty(cfg.num_layers, seg, cfg.num_kv_heads, cfg.head_dim, jnp.float32)
    step = jax.jit(lambda p, i, q, s, c: ours.model.apply({"params": p}, i, q, s, c))
    logits, cache = step(ours.params, ids[:, :7], jnp.arange(7)[None], seg[:, :7], cache)
    got = [np.asarray(logits)[0]]
    for t in range(7, 16):
        logits, cache = step(ours.params, ids[:, t : t + 1], jnp.full((1, 1), t), seg[:, :1],
                             cache)  # fmt: skip
        got.append(np.asarray(logits)[0])
    _check(np.concatenate(got), full[0])


def test_llm_config_readers_validate_fields():
    base = _hf_llm("llama", 0).config.to_dict()
    read = families.llm("llama").from_hf
    assert families.llm("llama").to_hf(read(base))["num_key_value_heads"] == 2
    assert read(families.llm("llama").to_hf(read(base))) == read(base)
    bad = {
        "mlp_bias": True,
        "hidden_act": "gelu",
        "rope_parameters": {"rope_type": "llama3", "factor": 8.0, "rope_theta": 5e5},
        "rope_scaling": {"type": "longrope", "factor": 2.0},  # tests/models/test_rope_scaling.py
        "sliding_window": 8,
    }
    for field, value in bad.items():
        with pytest.raises(ValueError, match=f"text_config.{field}"):
            read({**base, field: value})
    mistral = families.llm("mistral").from_hf
    assert mistral({**base, "model_type": "mistral", "sliding_window": None}).sliding_window is None
    no_key = {k: v for k, v in base.items() if k != "sliding_window"}
    assert mistral(no_key).sliding_window == 4096  # MistralConfig's default
    with pytest.raises(ValueError, match="text_config.attention_bias"):
        mistral({**base, "attention_bias": True})
    with pytest.raises(ValueError, match="text_config.sliding_window"):
        mistral({**base, "sliding_window": 0})
    with pytest.raises(ValueError, match="text_config.attention_bias"):
        read({**base, "attention_bias": True})  # HF's would bias o_proj too
    assert families.llm("mistral").to_hf(mistral(base))["sliding_window"] == 4096
    with pytest.raises(ValueError, match="use_sliding_window"):
        families.llm("qwen2").from_hf({**base, "use_sliding_window": True})


# ---- presets ---------------------------------------------------------------------------------

# llava-hf config.json facts (docs/reference_family.md A.11), typed from the hub table, not
# from our presets: (class, LLM model_type, H, layers, heads, kv heads, I, V).
HUB = {
    "llava15_7b": ("llava", "llama", 4096, 32, 32, 32, 11008, 32064),
    "llava15_13b": ("llava", "llama", 5120, 40, 40, 40, 13824, 32064),
    "llava_next_mistral_7b": ("llava_next", "mistral", 4096, 32, 32, 8, 14336, 32064),
    "llava_next_vicuna_7b": ("llava_next", "llama", 4096, 32, 32, 32, 11008, 32064),
    "llava_next_llama3_8b": ("llava_next", "llama", 4096, 32, 32, 8, 14336, 128320),
    "llava_next_72b": ("llava_next", "qwen2", 8192, 80, 64, 64, 24576, 152064),
}
# Totals of the HF models (docs/reference_family.md A.9.2, meta-device counts).
PUBLISHED = {"llava15_7b": 7_063_427_072, "llava_next_mistral_7b": 7_566_747_648}


def _hf_param_counts(name: str) -> tuple[int, int]:
    """(all params, params we do not store: CLIP's 24th layer + post_layernorm) of the HF
    model with the hub config, instantiated on the meta device."""
    from transformers import (
        AutoConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
    )

    arch, llm, h, layers, heads, kv, inter, vocab = HUB[name]
    text = AutoConfig.for_model(
        llm, hidden_size=h, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=kv, intermediate_size=inter, vocab_size=vocab,
        tie_word_embeddings=False,
    )  # fmt: skip
    classes = {"llava": (LlavaConfig, LlavaForConditionalGeneration),
               "llava_next": (LlavaNextConfig, LlavaNextForConditionalGeneration)}  # fmt: skip
    cls, model_cls = classes[arch]
    with torch.device("meta"):
        model = model_cls(cls(text_config=text))  # the default vision_config: CLIP-L/336
    last = f"layers.{model.config.vision_config.num_hidden_layers - 1}."
    total = unused = 0
    for n, p in model.named_parameters():
        total += p.numel()
        if "vision_tower" in n and (last in n or "post_layernorm" in n):
            unused += p.numel()
    return total, unused


@pytest.mark.parametrize("name", list(HUB))
def test_preset_parameter_counts_equal_hf(name):
    from lov_jax.models.llava_onevision import abstract_params, count_params

    cfg = config.preset(name)
    total, unused = _hf_param_counts(name)
    assert total == PUBLISHED.get(name, total)
    assert count_params(abstract_params(cfg, boxed=False)) == total - unused
    assert cfg.vision.num_layers == 23 and cfg.vision.num_features == 576
    assert cfg.has_image_newline == (HUB[name][0] == "llava_next")


@pytest.mark.parametrize("name", [*HUB, "tiny_llava15", "tiny_llava_next"])
def test_preset_shardings_and_forward_build(name):
    """What `lov-jax plan` needs without libtpu: the rules table divides every param on a
    (data 1, fsdp 4, context 1, tensor 2) mesh, and the forward traces (abstractly) at the preset's
    real shapes."""
    from lov_jax import batch, sharding
    from lov_jax.models.llava_onevision import LlavaOnevision, abstract_params
    from lov_jax.plan import check_divisible

    cfg = config.preset(name)
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]).reshape(1, 4, 1, 2), sharding.MESH_AXES)
    boxed = abstract_params(cfg)
    specs = sharding.params_sharding(boxed, mesh)
    leaves = nn.meta.unbox(boxed)
    check_divisible(jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), leaves, specs
    ))  # fmt: skip
    length = 2 * cfg.vision.num_features + 8
    keys = ("tokens", "positions", "segment_ids", "pixels", "vis_idx", "vis_w")
    inputs = batch.abstract_batch(1, length, 2, cfg, keys=keys)
    out = jax.eval_shape(
        lambda p, b: LlavaOnevision(cfg).apply({"params": p}, **b, output="hidden"), leaves, inputs
    )
    assert out.shape == (1, length, cfg.text.hidden_size)


@pytest.mark.parametrize("name", [*HUB, "tiny_llava15", "tiny_llava_next"])
def test_preset_config_json_round_trip(name):
    from lov_jax.token_ids import TokenIds

    ids = TokenIds(pad=32001, eos=(2,), image=32000, video=32002, bos=1)
    cfg = config.preset(name, token_ids=ids)
    hf = cfg.to_hf_config()
    # exported with the kept layers and vision_feature_layer -1 (HF computes the same)
    assert hf["vision_feature_layer"] == -1
    assert hf["vision_config"]["num_hidden_layers"] == cfg.vision.num_layers
    assert hf["text_config"]["model_type"] == HUB.get(name, (None, cfg.text.kind))[1]
    assert config.ModelConfig.from_hf_config(hf, token_ids=ids) == cfg


def test_clip_config_reader_writer_and_validation():
    from transformers import CLIPVisionConfig

    read, write = families.vision("clip").from_hf, families.vision("clip").to_hf
    hf = CLIPVisionConfig(**CLIP_HF).to_dict()
    v = read(hf)
    assert (v.kind, v.num_layers, v.image_size, v.num_patches) == ("clip", 4, 70, 25)
    assert v.image_mean == config.OPENAI_CLIP_MEAN and v.feature_select == "default"
    assert read(write(v)) == v and write(v)["model_type"] == "clip_vision_model"
    with pytest.raises(ValueError, match="hidden_act 'relu'"):
        read({**hf, "hidden_act": "relu"})
    with pytest.raises(ValueError, match="image_std"):
        dataclasses.replace(v, image_std=(0.2, 0.0, 0.2))
    with pytest.raises(ValueError, match="num_layers 0"):
        dataclasses.replace(v, num_layers=0)


@pytest.mark.parametrize(
    "arch, ratio",
    [("llava", "anyres"), ("llava_next", "pad"), ("llava_next", "anyres_max_9"),
     ("llava_onevision", "anyres"), ("llava_onevision", "anyres_max_0"), ("llava", "crop")],
)  # fmt: skip
def test_aspect_ratio_is_validated_per_architecture(arch, ratio):
    with pytest.raises(ValueError, match=f"vision_aspect_ratio '{ratio}' is not one of {arch}'s"):
        config.tiny_llava15().replace(architecture=arch, vision_aspect_ratio=ratio)
