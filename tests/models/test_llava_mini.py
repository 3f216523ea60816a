"""LLaVA-Mini against references written here from docs/reference_family.md B.

The original code cannot run here (it needs transformers 4.43), so each part is checked
against PyTorch transcriptions of its equations: the MAE sin-cos table and bicubic key PE
(B.2.2), the compressor as PyTorch's nn.MultiheadAttention (B.2.1), and the pre-fusion +
splice per sample (B.3-B.6) with transformers' LlamaDecoderLayer, its 4-D causal mask with
the masked keys removed and the cumsum positions; our side runs the same samples packed
into one row.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lov_jax import config, mini_layout
from lov_jax.convert import hf_keys
from lov_jax.models.compressor import Compressor, bicubic_matrix, sincos_table
from lov_jax.models.llava_onevision import LlavaOnevision, abstract_params

IMG = 7  # the row's visual placeholder id (any id; the model reads vis_w)


def _mae_sincos(dim: int, grid: int) -> np.ndarray:
    """MAE get_2d_sincos_pos_embed, transcribed (B.2.2)."""
    grid_h = np.arange(grid, dtype=np.float32)
    grid_w = np.arange(grid, dtype=np.float32)
    g = np.stack(np.meshgrid(grid_w, grid_h), axis=0).reshape(2, 1, grid, grid)

    def one(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    return np.concatenate([one(dim // 2, g[0]), one(dim // 2, g[1])], axis=1)


def _abs_pos(table: np.ndarray, n: int) -> np.ndarray:
    """get_abs_pos: F.interpolate bicubic (align_corners=False) of the C x C table."""
    src, tgt, d = int(round(len(table) ** 0.5)), int(round(n**0.5)), table.shape[1]
    t = torch.tensor(table, dtype=torch.float32).reshape(1, src, src, d).permute(0, 3, 1, 2)
    out = F.interpolate(t, size=(tgt, tgt), mode="bicubic", align_corners=False)
    return out.permute(0, 2, 3, 1).reshape(tgt * tgt, d).numpy()


@pytest.mark.parametrize("grid,side", [(1, 24), (2, 24), (3, 48), (4, 5)])
def test_position_tables(grid, side):
    table = sincos_table(64, grid)
    np.testing.assert_allclose(table, _mae_sincos(64, grid), atol=1e-6)
    rand = np.random.default_rng(grid).normal(size=(grid * grid, 8)).astype(np.float32)
    np.testing.assert_allclose(bicubic_matrix(grid, side) @ rand, _abs_pos(rand, side**2),
                               atol=1e-5)  # fmt: skip
    keys = bicubic_matrix(grid, side) @ table
    if grid == 1:  # the 1-token model: one constant row, [0]*16 + [1]*16 + [0]*16 + [1]*16
        np.testing.assert_array_equal(table[0], np.repeat([0.0, 1.0, 0.0, 1.0], 16))
        np.testing.assert_allclose(keys, np.broadcast_to(table, keys.shape), atol=1e-6)
    else:  # C >= 2: the key PE varies over positions
        assert keys.std(axis=0).max() > 1e-2


def _torch_compressor(p: dict, x: np.ndarray, heads: int) -> np.ndarray:
    """Resampler.forward (B.2.1) with PyTorch's LayerNorm and nn.MultiheadAttention."""
    flat = {k: np.asarray(v) for k, v in hf_keys.flatten(p).items()}
    d = x.shape[-1]
    mha = torch.nn.MultiheadAttention(d, heads, batch_first=True)
    ln_q, ln_kv = torch.nn.LayerNorm(d), torch.nn.LayerNorm(d)
    t = lambda a: torch.tensor(np.asarray(a, np.float32))  # noqa: E731
    with torch.no_grad():
        mha.in_proj_weight.copy_(t(flat["in_proj_kernel"].reshape(d, 3 * d).T))
        mha.in_proj_bias.copy_(t(flat["in_proj_bias"].reshape(-1)))
        mha.out_proj.weight.copy_(t(flat["out_proj/kernel"].reshape(d, d).T))
        mha.out_proj.bias.copy_(t(flat["out_proj/bias"]))
        for ln, name in ((ln_q, "ln_q"), (ln_kv, "ln_kv")):
            ln.weight.copy_(t(flat[f"{name}/scale"]))
            ln.bias.copy_(t(flat[f"{name}/bias"]))
        pos = t(flat["pos_embed"])
        pos_k = t(_abs_pos(flat["pos_embed"], x.shape[1]))
        xn = ln_kv(t(x))
        q = ln_q(t(flat["query"]))[None].expand(x.shape[0], -1, -1)
        out, _ = mha(q + pos, xn + pos_k, xn)
    return out.numpy()


@pytest.mark.parametrize("grid,n,seed", [(1, 36, 0), (2, 36, 1), (3, 25, 2)])
def test_compressor_matches_torch(grid, n, seed):
    d, heads = 32, 8
    comp = Compressor(grid, heads)
    x = jax.random.normal(jax.random.key(seed), (2, n, d))
    params = nn.meta.unbox(comp.init(jax.random.key(seed + 10), x)["params"])
    params = jax.tree.map(  # non-trivial LN and biases
        lambda a: a + 0.1 * jax.random.normal(jax.random.key(seed + 20), a.shape), params
    )
    params["pos_embed"] = jnp.asarray(sincos_table(d, grid))
    got = comp.apply({"params": params}, x)
    assert got.shape == (2, grid * grid, d)
    np.testing.assert_allclose(got, _torch_compressor(params, np.asarray(x), heads), atol=2e-5)
    if grid == 1:  # constant PE: moving the features among positions changes nothing
        perm = comp.apply({"params": params}, x[:, ::-1])
        np.testing.assert_allclose(perm, got, atol=1e-5)


# ---- the whole connector against a per-sample reference -----------------------------


def _mini_cfg(ratio: int = 1, grid: int = 2, size: int = 84) -> config.ModelConfig:
    """tiny_llava_mini on 84 px crops (6 x 6 = 36 features; HD: a 12 x 12 mosaic)."""
    mini = config.MiniConfig(compressor_size=grid, prefusion_layers=2, resolution_ratio=ratio)
    cfg = config.tiny_llava_mini(mini=mini)
    return cfg.replace(vision=dataclasses.replace(cfg.vision, image_size=size))


@pytest.fixture(scope="module")
def mini_models():
    out = {}
    for ratio, grid in ((1, 2), (2, 1)):
        cfg = _mini_cfg(ratio, grid)
        params = _random_params(cfg, ratio)
        out[ratio] = (cfg, params)
    return out


def _random_params(cfg, seed):
    """Random params from the abstract tree (no init compile): weights N(0, 0.1), norm
    scales near 1 (a swapped or missing norm shows), the compressor's sin-cos table."""
    rng = np.random.default_rng(seed)
    flat = hf_keys.flatten(abstract_params(cfg, boxed=False))
    out = {}
    for path, x in flat.items():
        base = 1.0 if path.endswith("scale") else 0.0
        out[path] = (base + 0.1 * rng.standard_normal(x.shape)).astype(np.float32)
    grid = cfg.mini.compressor_size
    out["compressor/pos_embed"] = sincos_table(cfg.vision.hidden_size, grid)
    return jax.tree.map(jnp.asarray, hf_keys.unflatten(out))


def _torch_layers(cfg, params):
    """The pre-fusion stack as transformers LlamaDecoderLayers, from our released-layout
    export (so the key table is exercised too) + a LlamaRotaryEmbedding."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    t = cfg.text
    hf = LlamaConfig(
        hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
        num_attention_heads=t.num_heads, num_key_value_heads=t.num_kv_heads,
        head_dim=t.head_dim, rms_norm_eps=t.rms_norm_eps, rope_theta=t.rope_theta,
        vocab_size=t.vocab_size, num_hidden_layers=cfg.mini.prefusion_layers,
        attn_implementation="eager",
    )  # fmt: skip
    sd = hf_keys.params_to_hf(params, cfg, layout="original")
    layers = []
    for i in range(cfg.mini.prefusion_layers):
        layer = LlamaDecoderLayer(hf, layer_idx=i)
        pre = f"model.prefusion_layers.{i}."
        layer.load_state_dict(
            {k[len(pre) :]: torch.tensor(v) for k, v in sd.items() if k.startswith(pre)}
        )
        layers.append(layer.eval())
    return layers, LlamaRotaryEmbedding(hf), sd


def _reference_sample(cfg, params, ids, labels, feats, torch_parts):
    """encode_images_mini + prepare_inputs_labels_for_multimodal for one sample (B.3-B.6).

    ids: the sample's ids with one -200 placeholder; labels: -100 or the id; feats: per
    unit (frame) the tower features f[parts, F, D]. Returns the LLM input f[T', H]."""
    layers, rope, sd = torch_parts
    t = lambda a: torch.tensor(np.asarray(a, np.float32))  # noqa: E731
    embed = t(sd["model.embed_tokens.weight"])
    w1, b1 = t(sd["model.mm_projector.0.weight"]), t(sd["model.mm_projector.0.bias"])
    w2, b2 = t(sd["model.mm_projector.2.weight"]), t(sd["model.mm_projector.2.bias"])

    def proj(x):
        return F.linear(F.gelu(F.linear(x, w1, b1)), w2, b2)

    comp_p = params["compressor"]
    ids_t = torch.tensor(ids)
    masked_ids = ids_t * (torch.tensor(labels) == -100)  # training: responses become 0
    m = masked_ids <= 0
    et = embed[ids_t.clamp(min=0)]
    r = cfg.mini.resolution_ratio
    fts, fcs = [], []
    for f in feats:
        f = np.asarray(f)
        if r == 1:
            vision, keys = t(f[0]), f[0]
        else:
            side = int(round(f.shape[1] ** 0.5))
            hd = f[:4].reshape(2, 2, side, side, -1).transpose(0, 2, 1, 3, 4)
            keys = hd.reshape(4 * side * side, -1)
            vision = torch.cat([t(keys), t(f[4])])
        hc = t(_torch_compressor(comp_p, keys[None], cfg.mini.compressor_heads)[0])
        x = torch.cat([proj(vision), proj(hc), et])[None]
        full_mask = torch.cat([torch.zeros(len(vision) + len(hc), dtype=torch.bool), m])
        pos = torch.cumsum((~full_mask).long(), 0) - 1
        pos[full_mask] = 1
        n = x.shape[1]
        allowed = torch.tril(torch.ones(n, n, dtype=torch.bool)) & ~full_mask[None, :]
        mask4 = torch.where(allowed, 0.0, torch.finfo(torch.float32).min)[None, None]
        pe = rope(x, pos[None])
        with torch.no_grad():
            for layer in layers:
                out = layer(x, attention_mask=mask4, position_ids=pos[None],
                            position_embeddings=pe)  # fmt: skip
                x = out[0] if isinstance(out, tuple) else out
        x = x[0]
        q = len(hc)
        fts.append(x[-len(ids) :] * (~m)[:, None] + et * m[:, None])
        fcs.append(x[-len(ids) - q : -len(ids)])
    ft = torch.stack(fts).sum(0) / len(fts)
    at = int(np.flatnonzero(np.asarray(ids) == -200)[0])
    return torch.cat([ft[:at], torch.cat(fcs), ft[at + 1 :]]).numpy()


def _row(cfg, samples, length):
    """Pack samples (ids with one -200, labels, units) into one row of `length`."""
    q = cfg.mini.tokens_per_image
    tokens, seg, loss, units = [], [], [], []
    for s, (ids, labels, n_units) in enumerate(samples, start=1):
        at = ids.index(-200)
        expanded = ids[:at] + [IMG] * (n_units * q) + ids[at + 1 :]
        lab = labels[:at] + [-100] * (n_units * q) + labels[at + 1 :]
        tokens += expanded
        seg += [s] * len(expanded)
        # targets shifted inside the sample: loss_mask[j] = label of token j+1 trained
        loss += [float(lab[j + 1] != -100) for j in range(len(lab) - 1)] + [0.0]
        units.append(n_units)
    pad = length - len(tokens)
    tokens, seg, loss = tokens + [1] * pad, seg + [0] * pad, loss + [0.0] * pad
    idx, w = mini_layout.place_taps(np.array(tokens), [IMG], units, cfg, sum(units) * 5)
    return np.array(tokens), np.array(seg), np.array(loss, np.float32), idx, w


@pytest.mark.parametrize("ratio", [1, 2])
def test_embed_inputs_matches_reference(mini_models, ratio):
    """Two packed samples (one image; a 2-frame video) + padding == the reference per
    sample; with HD (resolution_ratio 2: 4 crops mosaicked + the whole image)."""
    cfg, params = mini_models[ratio]
    parts = cfg.mini.crops_per_image
    rng = np.random.default_rng(ratio)
    ids_a = [3, 11, 12, -200, 13, 14, 21, 22, 23]  # instruction, then a 3-token response
    lab_a = [-100] * 6 + [21, 22, 23]
    ids_b = [3, 15, -200, 16, 17, 24, 25]
    lab_b = [-100] * 5 + [24, 25]
    units = 1 + 2
    size = cfg.vision.image_size
    pixels = rng.integers(0, 256, (1, units * parts, size, size, 3), dtype=np.uint8)
    model = LlavaOnevision(cfg)
    feats = jax.jit(
        lambda p, px: model.apply({"params": p}, px, method=lambda m, x: m.vision_tower(x))
    )(params, jnp.asarray(pixels[0]))
    feats = np.asarray(feats).reshape(units, parts, *feats.shape[1:])
    torch_parts = _torch_layers(cfg, params)
    want_a = _reference_sample(cfg, params, ids_a, lab_a, feats[:1], torch_parts)
    want_b = _reference_sample(cfg, params, ids_b, lab_b, feats[1:], torch_parts)
    tokens, seg, loss, idx, w = _row(cfg, [(ids_a, lab_a, 1), (ids_b, lab_b, 2)], 40)
    embed_inputs = jax.jit(
        lambda p, *a: model.apply({"params": p}, *a, method=LlavaOnevision.embed_inputs)
    )
    args = (tokens[None], pixels, idx[None], w[None], seg[None])
    got = embed_inputs(params, *args, loss[None])[0]
    n_a, n_b = len(want_a), len(want_b)
    assert (n_a, n_b) == (len(ids_a) - 1 + 4 // ratio**2, len(ids_b) - 1 + 2 * 4 // ratio**2)
    np.testing.assert_allclose(got[:n_a], want_a, atol=2e-4)
    np.testing.assert_allclose(got[n_a : n_a + n_b], want_b, atol=2e-4)
    # padding keeps its raw embedding; without loss_mask (inference) responses are fused
    embed = np.asarray(params["language_model"]["embed_tokens"]["embedding"])
    np.testing.assert_allclose(got[n_a + n_b :], embed[tokens[n_a + n_b :]], atol=1e-6)
    infer = embed_inputs(params, *args, np.zeros_like(loss[None]))[0]  # nothing masked
    resp = slice(n_a - 3, n_a)
    assert np.abs(np.asarray(infer[resp]) - np.asarray(got[resp])).max() > 1e-3


def test_place_taps_and_counts():
    cfg = _mini_cfg(2, 2)
    assert mini_layout.num_tokens(cfg, 3) == 12 and mini_layout.num_crops(cfg, 3) == 15
    assert mini_layout.prefusion_tokens(cfg, 100) == 5 * 36 + 4 + 100
    tokens = np.array([1, IMG, IMG, IMG, IMG, 2, 9, 9, 9, 9, 9, 9, 9, 9, 0])
    idx, w = mini_layout.place_taps(tokens, [IMG, 9], [1, 2], cfg, 20, unit_offset=1)
    vis = np.flatnonzero(w[:, 0])
    np.testing.assert_array_equal(vis, [1, 2, 3, 4, *range(6, 14)])
    np.testing.assert_array_equal(idx[vis, 0], np.arange(4, 16))  # unit 1 on: rows 4..15
    assert not w[:, 1:].any()
    with pytest.raises(ValueError, match="need 16"):
        mini_layout.place_taps(tokens, [IMG, 9], [1, 3], cfg, 20)
    with pytest.raises(ValueError, match="crop slots"):
        mini_layout.place_taps(tokens, [IMG, 9], [1, 2], cfg, 14)
    with pytest.raises(ValueError, match="exactly for architecture"):
        config.tiny_llava15(mini=config.MiniConfig())
    with pytest.raises(ValueError, match="compressor_size"):
        config.MiniConfig(compressor_size=0)


def test_presets_shapes():
    """The released model's parameter count (B.9.3): LLM 8.030B + 4 pre-fusion layers
    0.8724B + projector 0.0210B + compressor 0.0042B, CLIP-L (23 layers kept) on top."""
    cfg = config.llava_mini_llama31_8b()
    shapes = hf_keys.target_shapes(cfg)
    count = lambda pre: sum(int(np.prod(s)) for p, s in shapes.items() if p.startswith(pre))  # noqa: E731
    assert count("compressor/") == 4_204_544
    assert count("prefusion_layers/") == 4 * 218_112_000
    assert count("multi_modal_projector/") == 1024 * 4096 + 4096 + 4096 * 4096 + 4096
    assert count("language_model/") == 8_030_261_248
    assert shapes["compressor/query"] == (1, 1024)
    hd = dataclasses.replace(cfg.mini, resolution_ratio=2)
    assert hd.crops_per_image == 5 and hd.tokens_per_image == 1


def test_generate_matches_full_recompute(mini_models):
    """The engine's KV-cache generation (prefill fused, decode tokens unfused, as the
    reference's generate) == greedy recomputation of the whole sequence in which the
    generated tokens are kept out of the pre-fusion (marked as responses)."""
    from lov_jax.inference.engine import GenerationConfig, Generator, PromptInputs
    from lov_jax.token_ids import TokenIds
    from lov_jax.visual_layout import VisualItem

    cfg, params = mini_models[1]
    cfg = cfg.replace(token_ids=TokenIds(pad=0, eos=(2,), image=IMG, video=8, bos=3))
    size, q = cfg.vision.image_size, cfg.mini.tokens_per_image
    frames = np.random.default_rng(5).integers(0, 256, (2, size, size, 3), dtype=np.uint8)
    prompt = np.array([3, 11, *([8] * 2 * q), 12, 13], np.int32)  # a 2-frame video
    item = VisualItem("video", num_frames=2)
    new = 4
    out = Generator(params, cfg).generate(
        [PromptInputs(prompt, frames, [item])], GenerationConfig(max_new_tokens=new, stop_ids=())
    )
    model = LlavaOnevision(cfg)
    forward = jax.jit(  # one compile: the sequence padded to its final length
        lambda p, *a: model.apply({"params": p}, *a[:-1], output="logits", loss_mask=a[-1])
    )
    seq, total = list(prompt), len(prompt) + new
    for _ in range(new):
        n = len(seq)
        tokens = np.array(seq + [0] * (total - n), np.int32)
        idx, w = mini_layout.place_taps(tokens, [8], [2], cfg, 2)
        loss = np.zeros(total, np.float32)
        loss[len(prompt) - 1 : n - 1] = 1.0  # generated tokens: responses
        seg = (np.arange(total) < n).astype(np.int32)
        logits = forward(
            params, tokens[None], np.arange(total)[None], seg[None], frames[None], idx[None],
            w[None], loss[None],
        )  # fmt: skip
        seq.append(int(jnp.argmax(logits[0, n - 1])))
    assert out.tokens[0] == seq[len(prompt) :]
