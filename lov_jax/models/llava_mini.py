"""LLaVA-Mini (ictnlp, docs/reference_family.md B): C^2 LLM tokens per image.

The model is LlavaOnevision's (tower, projector, LLM of the config's kinds) plus two
parts at the top of the params tree, named as the released checkpoint's
`model.compressor` / `model.prefusion_layers`:

    compressor        lov_jax/models/compressor.py, on the tower's D-wide features
    prefusion_layers  `mini.prefusion_layers` decoder layers of the LLM's shape (own
                      weights, same RoPE, no final norm), stacked and scanned

Per visual unit u (an image, or one video frame) of a packed row b:

    V_u  = tower(crops of u)                           f[V, D]  V = F (576), HD: (rF)^2 + F
    Z_u  = compressor(keys of u)                       f[Q, D]  Q = C^2; keys: F, HD: the
                                                                r x r crop mosaic
    x_u  = concat(proj(V_u), proj(Z_u), Et_b)          f[V + Q + L, H]; Et = stop_gradient
                                                                of the row's embeddings
    y_u  = prefusion(x_u)   causal; text keys: this unit's sample's fused tokens only
    LLM input: visual positions tap y_u[V : V+Q]; text position j of sample s =
               mean over the units of s of y_u[V+Q+j] (video: over its frames, as the
               reference; one image: its own); unfused positions keep Et.

Fused tokens (the reference's `padding_mask`, B.3): text positions of the unit's own
segment, minus response tokens when `loss_mask` is given (training: token j is a response
token iff target j-1 is trained). Prefusion positions: vision 0..V-1, compressed
V..V+Q-1, fused text continues from V+Q counting fused tokens only, unfused slots 1.

The batch contract is unchanged (lov_jax/batch.py): a unit occupies
`mini.crops_per_image` consecutive crop slots (HD: the r x r crops row-major, then the
whole image), and the Q LLM tokens of unit u tap bank row u*Q + q with weight 1 (the bank
is the units' prefusion outputs, F = Q per unit; lov_jax/mini_layout.py writes them). Which sample
a unit belongs to is read from the segment ids of the positions that tap it. Deviations
from the reference, all deliberate: a packed row runs each unit's prefusion over the whole
row's L text slots (masked to its own sample; cost: V + Q + L tokens per unit per layer);
text-only samples keep their raw embeddings (the reference fuses them with a blank
image); a multi-image sample averages its fused text over its images as a video does;
video units get gradients (the reference's 6-D batch path has none); the Llama-3 id 0
('!') is not masked.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from lov_jax.config import ModelConfig
from lov_jax.models.compressor import Compressor
from lov_jax.models.decoder import DecoderLayer
from lov_jax.models.layers import scanned
from lov_jax.models.rope import rope_cos_sin

_BCAST = nn.broadcast


def build(cfg: ModelConfig, dtype, param_dtype) -> tuple[nn.Module, nn.Module]:
    """(compressor, prefusion stack): the attributes `compressor` / `prefusion_layers` of
    the model's setup (names fixed by the checkpoint)."""
    mini = cfg.mini
    if cfg.text.sliding_window is not None:
        raise ValueError("LLaVA-Mini's pre-fusion layers are Llama layers: no sliding window")
    comp = Compressor(
        mini.compressor_size, mini.compressor_heads, dtype, param_dtype, name="compressor"
    )
    stack = scanned(
        DecoderLayer,
        remat=cfg.remat_policy,
        length=mini.prefusion_layers,
        name="prefusion_layers",
        in_axes=(_BCAST,) * 6,
        cfg=cfg.text,
        dtype=dtype,
        param_dtype=param_dtype,
        attention_impl=cfg.attention_impl,
    )
    return comp, stack


def unit_features(model, pixels: jax.Array) -> tuple[jax.Array, jax.Array]:
    """pixels [B, N, S, S, 3] -> (vision f[B*U, V, D], compressor keys f[B*U, K, D])."""
    mini = model.cfg.mini
    b, n = pixels.shape[:2]
    parts, r = mini.crops_per_image, mini.resolution_ratio
    if n % parts:
        raise ValueError(f"{n} crop slots are not whole units of {parts} (resolution_ratio {r})")
    feats = model.vision_tower(pixels.reshape(b * n, *pixels.shape[2:]))
    f, d = feats.shape[1:]
    feats = feats.reshape(b * (n // parts), parts, f, d)
    if parts == 1:
        return feats[:, 0], feats[:, 0]
    side = int(round(f**0.5))
    # encode_images_mini: crops (i, j) row-major -> a (r*side)^2 mosaic, crop (i, j)
    # patch (y, x) at row i*side + y, column j*side + x
    mosaic = feats[:, : r * r].reshape(-1, r, r, side, side, d).transpose(0, 1, 3, 2, 4, 5)
    mosaic = mosaic.reshape(-1, (r * side) ** 2, d)
    return jnp.concatenate([mosaic, feats[:, -1]], axis=1), mosaic


def fuse_masks(tokens, segment_ids, vis_w, loss_mask, units: int, vis_idx, q: int):
    """(unit_seg int32[B, U], keys bool[B, U, L]): each unit's sample and the text slots
    its prefusion fuses."""
    is_vis = jnp.any(vis_w != 0, axis=-1)
    fuse = (segment_ids > 0) & ~is_vis
    if loss_mask is not None:  # training: response tokens are not fused (labels != -100)
        trained_prev = (loss_mask[:, :-1] > 0) & (segment_ids[:, :-1] == segment_ids[:, 1:])
        fuse = fuse & ~jnp.pad(trained_prev, ((0, 0), (1, 0)))
    unit = jnp.clip(vis_idx[..., 0] // q, 0, units - 1)
    owner = jnp.where(is_vis, segment_ids, 0)[..., None]  # the segment of each visual token
    hit = jax.nn.one_hot(unit, units, dtype=jnp.int32) * owner
    unit_seg = jnp.max(hit, axis=1)  # [B, U]; 0: an empty (padding) unit
    keys = fuse[:, None, :] & (segment_ids[:, None, :] == unit_seg[:, :, None])
    return unit_seg, keys & (unit_seg[:, :, None] > 0)


def embed_inputs(model, tokens, segment_ids, pixels, vis_idx, vis_w, loss_mask=None):
    """LLM input embeddings f[B, L, H] (module docstring); `model` is the LlavaOnevision
    whose setup built the parts (called from its embed_inputs)."""
    embeds = jax.lax.stop_gradient(model.language_model.embed_tokens(tokens))  # B.8.3 4
    if pixels is None or pixels.shape[1] == 0:
        return embeds
    b, length, h = embeds.shape
    q = model.cfg.mini.tokens_per_image
    vision, keys_in = unit_features(model, pixels)
    bu, v = vision.shape[:2]
    units = bu // b
    comp = model.compressor(keys_in)
    proj = model.multi_modal_projector(jnp.concatenate([vision, comp.astype(vision.dtype)], 1))
    unit_seg, keys = fuse_masks(tokens, segment_ids, vis_w, loss_mask, units, vis_idx, q)
    keys = keys.reshape(bu, length)
    text = jnp.broadcast_to(embeds[:, None], (b, units, length, h)).reshape(bu, length, h)
    x = jnp.concatenate([proj.astype(embeds.dtype), text], axis=1)  # [B*U, V + Q + L, H]
    head = v + q
    seg = jnp.concatenate([jnp.ones((bu, head), jnp.int32), keys.astype(jnp.int32)], axis=1)
    text_pos = jnp.where(keys, head + jnp.cumsum(keys, axis=1) - 1, 1)
    pos = jnp.concatenate([jnp.broadcast_to(jnp.arange(head), (bu, head)), text_pos], axis=1)
    cos, sin = rope_cos_sin(pos, model.cfg.text, x.dtype)  # the LLM's RoPE, scaling included
    y, _ = model.prefusion_layers(x, cos, sin, seg, None, None, None)
    fc = y[:, v:head].reshape(b, units * q, h)
    ft = y[:, head:].reshape(b, units, length, h).astype(jnp.float32)
    w = keys.reshape(b, units, length, 1).astype(jnp.float32)
    count = jnp.sum(w, axis=1)
    fused = jnp.sum(ft * w, axis=1) / jnp.maximum(count, 1.0)
    text_out = jnp.where(count > 0, fused.astype(embeds.dtype), embeds)
    bank = jnp.concatenate([fc, jnp.zeros((b, 2, h), fc.dtype)], axis=1)
    idx = jnp.clip(vis_idx, 0, bank.shape[1] - 1)  # text taps point past this smaller bank
    visual = jnp.zeros(embeds.shape, jnp.float32)
    for tap in range(vis_idx.shape[-1]):
        rows = jnp.take_along_axis(bank, idx[:, :, tap, None], axis=1)
        visual = visual + vis_w[:, :, tap, None] * rows.astype(jnp.float32)
    is_vis = jnp.any(vis_w != 0, axis=-1, keepdims=True)
    return jnp.where(is_vis, visual.astype(embeds.dtype), text_out)
