"""The one LLaVA model of every architecture (`ModelConfig.architecture`): LLaVA-1.5,
LLaVA-NeXT and OneVision are a vision tower over every crop, a projector per crop, the
4-tap visual gather and an LLM, the kinds the config names (models/families.py).

Batch contract (docs/design.md 2), per row b of B:
    tokens       int32[B, L]     placeholders already expanded
    positions    int32[B, L]     RoPE positions (restart per packed segment)
    segment_ids  int32[B, L]     1..S per packed sample, 0 = padding
    pixels       uint8|float[B, N, S, S, 3]   crops/frames, zero padded
    vis_idx      int32[B, L, 4]  taps into the row's feature bank
    vis_w        float32[B, L, 4] tap weights (all 0 on text tokens)

Feature bank of a row (lov_jax/batch.py): float[N * F + 2, H] with F =
`cfg.vision.num_features` (729 SigLIP, 576 CLIP after dropping CLS) = projected features
of crop slot c at c*F + (y*side + x), then `image_newline` at N*F, then a zero row at
N*F+1 (what `lov_jax.visual_layout` indexes). Unpad, the anyres_max_9 bilinear
downsample, video 2x2 bilinear pooling and newline insertion all reduce to this
single gather-and-weight, so shapes stay static under packing. LLaVA-1.5 has no
`image_newline` param (`cfg.has_image_newline`): its newline row is zeros and never
tapped, so every architecture has the same bank shape.

Video beyond OneVision's bilinear pool (`cfg.video`, lov_jax/video_pool.py): average /
max pools are not weighted sums of projected rows (and NeXT-Video pools before the
projector), so the bank grows, after the zero row, by the `faster_token` (SlowFast) and
one section per pool stride holding every crop slot pooled s x s: tower features pooled
then projected (`pool_before_projector`), or projected then pooled. Static shapes: every
slot is pooled, whatever it holds.
"""

from __future__ import annotations

import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp

from lov_jax import video_pool
from lov_jax.config import ModelConfig
from lov_jax.models import families, llava_mini
from lov_jax.models.kv_cache import KVCache


class LlavaOnevision(nn.Module):
    """Vision tower, projector and LLM as the config's kinds name them (models/families.py)."""

    cfg: ModelConfig

    def setup(self):
        cfg = self.cfg
        dtype, pdtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        tower = families.vision(cfg.vision.kind).module
        self.vision_tower = tower(cfg.vision, dtype, pdtype, cfg.remat_policy)
        proj = families.projector(cfg.projector).module
        self.multi_modal_projector = proj(cfg.text.hidden_size, dtype, pdtype)
        if cfg.has_image_newline:
            self.image_newline = self.param(
                "image_newline",
                nn.with_logical_partitioning(nn.initializers.normal(0.02), ("embed",)),
                (cfg.text.hidden_size,),
                pdtype,
            )
        if cfg.video.faster:  # LLaVA-Video's randn(H) / sqrt(H)
            self.faster_token = self.param(
                "faster_token",
                nn.with_logical_partitioning(
                    nn.initializers.normal(cfg.text.hidden_size**-0.5), ("embed",)
                ),
                (cfg.text.hidden_size,),
                pdtype,
            )
        lm = families.llm(cfg.text.kind).module
        self.language_model = lm(cfg.text, dtype, pdtype, cfg.remat_policy, cfg.attention_impl)
        if cfg.mini is not None:  # LLaVA-Mini's compressor + pre-fusion (models/llava_mini.py)
            self.compressor, self.prefusion_layers = llava_mini.build(cfg, dtype, pdtype)

    def encode_crops(self, pixels: jax.Array) -> tuple[jax.Array, list[jax.Array]]:
        """pixels [B, N, S, S, 3] -> (projected features float[B, N*F, H], the pooled
        sections float[B, N*h_s*h_s, H] of video_pool.device_strides, in order)."""
        b, n = pixels.shape[:2]
        crops = pixels.reshape(b * n, *pixels.shape[2:])
        tower = self.vision_tower(crops)  # [B*N, F, D]
        strides, v = video_pool.device_strides(self.cfg), self.cfg.video
        p = self.cfg.vision.patches_per_side

        def pool(x):
            return [video_pool.pool_frames(x, p, s, v.pool_mode) for s in strides]

        if v.pool_before_projector:  # NeXT-Video: one projector call over all rows
            parts = [tower, *pool(tower)]
            cuts = list(itertools.accumulate(x.shape[1] for x in parts))[:-1]
            parts = jnp.split(self.multi_modal_projector(jnp.concatenate(parts, 1)), cuts, 1)
        else:
            feats = self.multi_modal_projector(tower)
            parts = [feats, *pool(feats)]
        feats, *pooled = (x.reshape(b, -1, x.shape[-1]) for x in parts)
        return feats, pooled

    def feature_bank(self, pixels: jax.Array) -> jax.Array:
        """float[B, batch.bank_size(N, cfg), H]: crop features, image_newline, a zero
        row, then the video rows (faster_token, pooled sections; lov_jax/batch.py)."""
        feats, pooled = self.encode_crops(pixels)
        b, _, h = feats.shape
        zero = jnp.zeros((b, 1, h), feats.dtype)
        newline = zero
        if self.cfg.has_image_newline:
            newline = jnp.broadcast_to(self.image_newline.astype(feats.dtype), (b, 1, h))
        extra = []
        if self.cfg.video.faster:
            extra.append(jnp.broadcast_to(self.faster_token.astype(feats.dtype), (b, 1, h)))
        return jnp.concatenate([feats, newline, zero, *extra, *pooled], axis=1)

    def embed_inputs(
        self, tokens, pixels=None, vis_idx=None, vis_w=None, segment_ids=None, loss_mask=None
    ) -> jax.Array:
        """Text embeddings with visual tokens replaced by their weighted taps: [B, L, H].

        LLaVA-Mini fuses the text of each sample (`segment_ids`) with its images first;
        `loss_mask` (training) keeps response tokens out of that fusion."""
        if self.cfg.mini is not None:
            return llava_mini.embed_inputs(
                self, tokens, segment_ids, pixels, vis_idx, vis_w, loss_mask
            )
        embeds = self.language_model.embed_tokens(tokens)
        if pixels is None or pixels.shape[1] == 0:
            return embeds
        bank = self.feature_bank(pixels)
        visual = jnp.zeros(embeds.shape, jnp.float32)
        for tap in range(vis_idx.shape[-1]):  # 4 gathers of [B, L, H], fused by XLA
            rows = jnp.take_along_axis(bank, vis_idx[:, :, tap, None], axis=1)
            visual = visual + vis_w[:, :, tap, None] * rows.astype(jnp.float32)
        is_visual = jnp.any(vis_w != 0, axis=-1, keepdims=True)
        return jnp.where(is_visual, visual.astype(embeds.dtype), embeds)

    def head_kernel(self) -> jax.Array:
        """The LLM's output projection float[H, V] (for the chunked loss)."""
        return self.language_model.head_kernel()

    def __call__(
        self,
        tokens,
        positions,
        segment_ids,
        pixels=None,
        vis_idx=None,
        vis_w=None,
        cache: KVCache | None = None,
        *,
        output: str = "logits",
        loss_mask=None,
    ):
        """The LLM's `output` (decoder.OUTPUTS) over the merged embeddings; `(out, cache)`
        with a cache. "logits" materialises float32[B, L, V]: train on "hidden" with the
        chunked loss."""
        embeds = self.embed_inputs(tokens, pixels, vis_idx, vis_w, segment_ids, loss_mask)
        return self.language_model(embeds, positions, segment_ids, cache, output=output)


def init_params(cfg: ModelConfig, rng: jax.Array, *, boxed: bool = False):
    """Random params (tiny/tests); `boxed=True` keeps the LogicallyPartitioned metadata."""
    model = LlavaOnevision(cfg)
    # splash attention needs lengths that are multiples of 128
    args = dummy_inputs(cfg, length=128 if cfg.attention_impl == "splash" else 8)
    variables = model.init(rng, *args)
    params = variables["params"]
    return params if boxed else nn.meta.unbox(params)


def abstract_params(cfg: ModelConfig, *, boxed: bool = True):
    """Shape/dtype (and logical names) of the params tree, nothing allocated."""
    return jax.eval_shape(lambda r: init_params(cfg, r, boxed=boxed), jax.random.key(0))


def dummy_inputs(cfg: ModelConfig, length: int = 8, crops: int = 1):
    if cfg.mini is not None:  # whole LLaVA-Mini units (HD: r^2 + 1 crops)
        crops *= cfg.mini.crops_per_image
    size = cfg.vision.image_size
    tokens = jnp.zeros((1, length), jnp.int32)
    return (
        tokens,
        jnp.zeros((1, length), jnp.int32),
        jnp.ones((1, length), jnp.int32),
        jnp.zeros((1, crops, size, size, cfg.vision.num_channels), jnp.uint8),
        jnp.zeros((1, length, 4), jnp.int32),
        jnp.zeros((1, length, 4), jnp.float32),
    )


def count_params(params) -> int:
    return int(sum(x.size for x in jax.tree.leaves(params)))
