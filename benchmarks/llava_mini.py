"""LLaVA-Mini vs OneVision on the same LLM: one image, an HD image, a 64-frame video.

    python benchmarks/llava_mini.py [--size full|small|both] [--frames 64] [--text 64]

Per model and input: LLM tokens (the row's length: text + visual tokens), prefill FLOPs
of the whole compiled forward (towers, compressor, pre-fusion, LLM): the matmul FLOPs of
XLA's optimized HLO with each scanned stack's body times its trip count (`_matmul_flops`;
XLA's `cost_analysis()` counts a loop body once), KV-cache bytes (bf16, the LLM's layers x 2 x
kv heads x head dim x tokens), and on the small size also the measured prefill latency
and per-token decode latency (median of timed runs after a warm-up, this machine's CPU).

Sizes. full: llava_mini_llama31_8b (CLIP-L/336, Llama-3.1-8B, C = 1, 4 pre-fusion layers)
against the same Llama-3.1-8B behind OneVision's SigLIP-SO400M tower and anyres_max_9
(lowered on abstract params: nothing is allocated, only compiled). small: both towers 2
layers x 64 wide on their real geometry (576 / 729 features per crop), the LLM 4 layers x
256 (GQA 4/2), 1 pre-fusion layer, fp32; CPU-sized, so latency ratios, not values, carry.

Inputs: an image of 672 x 672 (OneVision: anyres 2 x 2 grid + base, 5 crops; LLaVA-Mini:
one 336 crop, C^2 tokens), the same image as LLaVA-Mini-HD (resolution_ratio 2: 4 crops
+ the whole; OneVision as before), a 64-frame video (OneVision: 64 x 14^2 + 1 tokens;
LLaVA-Mini: 64 x C^2, each frame's pre-fusion over 576 + C^2 + the row). Text: `--text`
tokens of prompt around the visual tokens.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from lov_jax import config, visual_layout  # noqa: E402
from lov_jax.models.kv_cache import KVCache  # noqa: E402
from lov_jax.models.llava_onevision import LlavaOnevision, abstract_params, init_params  # noqa: E402
from lov_jax.token_ids import TokenIds  # noqa: E402

IDS = TokenIds(pad=0, eos=(2,), image=3, video=4, bos=1)


def _configs(size: str) -> dict[str, config.ModelConfig]:
    mini = config.llava_mini_llama31_8b()
    text = mini.text
    if size == "small":
        text = dataclasses.replace(
            text, vocab_size=4096, hidden_size=256, intermediate_size=768, num_layers=4,
            num_heads=4, num_kv_heads=2, head_dim=64,
        )  # fmt: skip
    ov = config.ov_7b().replace(text=text, token_ids=IDS, attention_impl="chunked")
    mini = mini.replace(text=text, token_ids=IDS, attention_impl="chunked")
    if size == "small":
        small = {"hidden_size": 64, "intermediate_size": 128, "num_layers": 2, "num_heads": 4}
        ov = ov.replace(vision=dataclasses.replace(ov.vision, **small))
        mini = mini.replace(
            vision=dataclasses.replace(mini.vision, **small),
            mini=dataclasses.replace(mini.mini, prefusion_layers=1, compressor_heads=8),
        )
    else:
        ov, mini = ov.replace(dtype="bfloat16"), mini.replace(dtype="bfloat16")
    hd = mini.replace(mini=dataclasses.replace(mini.mini, resolution_ratio=2))
    return {"onevision": ov, "mini": mini, "mini_hd": hd}


def _shapes(cfg: config.ModelConfig, item: str, frames: int, text: int) -> tuple[int, int]:
    """(LLM tokens, crop slots) of one sample."""
    if cfg.mini is not None:
        units = frames if item == "video" else 1
        return text + units * cfg.mini.tokens_per_image, units * cfg.mini.crops_per_image
    vi = (
        visual_layout.VisualItem("video", num_frames=frames)
        if item == "video"
        else visual_layout.VisualItem("anyres", image_size=(672, 672))
    )
    return text + visual_layout.num_tokens(vi, cfg), visual_layout.num_crops(vi, cfg)


def _inputs(cfg, length: int, crops: int, abstract: bool):
    size, c = cfg.vision.image_size, cfg.vision.num_channels
    specs = [((1, length), jnp.int32)] * 3 + [
        ((1, crops, size, size, c), jnp.uint8), ((1, length, 4), jnp.int32),
        ((1, length, 4), jnp.float32),
    ]  # fmt: skip
    if abstract:
        return [jax.ShapeDtypeStruct(s, d) for s, d in specs]
    out = [jnp.zeros(s, d) for s, d in specs]
    out[2] = jnp.ones((1, length), jnp.int32)  # one segment
    out[1] = jnp.arange(length, dtype=jnp.int32)[None]
    if cfg.mini is not None:  # the visual tokens tap their units (weights decide the path)
        q = cfg.mini.tokens_per_image
        vis = np.zeros((1, length, 4), np.float32)
        vis[0, 8 : 8 + (crops // cfg.mini.crops_per_image) * q, 0] = 1.0
        idx = np.zeros((1, length, 4), np.int32)
        idx[0, 8 : 8 + vis[0, :, 0].astype(bool).sum(), 0] = np.arange(int(vis.sum()))
        out[4], out[5] = jnp.asarray(idx), jnp.asarray(vis)
    else:
        out[5] = out[5].at[0, 8:-8, 0].set(1.0)
    return out


def _prefill(model):
    def run(params, tokens, positions, segment_ids, pixels, vis_idx, vis_w):
        return model.apply(
            {"params": params}, tokens, positions, segment_ids, pixels, vis_idx, vis_w,
            output="last_logits",
        )  # fmt: skip

    return jax.jit(run)


def _decode(model, cfg):
    def run(params, cache, token, position):
        return model.apply(
            {"params": params}, token, position, jnp.ones_like(token), cache=cache,
            output="last_logits",
        )  # fmt: skip

    return jax.jit(run)


def _timed(fn, *args, repeat: int = 3) -> float:
    jax.block_until_ready(fn(*args))  # compile + warm-up
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _matmul_flops(compiled) -> float:
    """Matmul FLOPs of the compiled program with every scanned loop body counted its trip
    count times (lov_jax/plan/flops.py walks the optimized HLO); XLA's own
    `cost_analysis()["flops"]` counts a while-loop body once, i.e. one layer per stack."""
    try:
        from lov_jax.plan.flops import hlo_flops
    except ImportError:  # an older tree: XLA's count (loop bodies once), marked
        print("note: lov_jax.plan.flops missing, FLOPs are cost_analysis() (bodies once)")
        return float(compiled.cost_analysis()["flops"])
    return float(hlo_flops(compiled.as_text()).dot_flops)


def kv_bytes(cfg: config.ModelConfig, tokens: int, itemsize: int = 2) -> int:
    t = cfg.text
    return 2 * t.num_layers * t.num_kv_heads * t.head_dim * tokens * itemsize


def run(size: str, frames: int, text: int) -> list[dict]:
    rows = []
    cfgs = _configs(size)
    for name, cfg in cfgs.items():
        model = LlavaOnevision(cfg)
        if size == "full":
            params = abstract_params(cfg, boxed=False)
        else:
            params = init_params(cfg, jax.random.key(0))
        for item in ("image", "video"):
            if name == "mini_hd" and item == "video":
                continue  # HD frames: the same per-frame work x 5 crops; not measured
            length, crops = _shapes(cfg, item, frames, text)
            args = _inputs(cfg, length, crops, abstract=size == "full")
            compiled = _prefill(model).lower(params, *args).compile()
            flops = _matmul_flops(compiled)
            row = {"size": size, "model": name, "input": item, "llm_tokens": length,
                   "crops": crops, "prefill_tflops": flops / 1e12,
                   "kv_mib": kv_bytes(cfg, length) / 2**20}  # fmt: skip
            if size == "small":
                row["prefill_s"] = _timed(_prefill(model), params, *args)
                seg = jnp.ones((1, length + 8), jnp.int32)
                cache = KVCache.empty(cfg.text.num_layers, seg, cfg.text.num_kv_heads,
                                      cfg.text.head_dim, jnp.float32)  # fmt: skip
                cache = cache.replace(index=jnp.int32(length))
                tok, pos = jnp.zeros((1, 1), jnp.int32), jnp.full((1, 1), length, jnp.int32)
                row["decode_ms"] = 1e3 * _timed(_decode(model, cfg), params, cache, tok, pos)
            rows.append(row)
            print(_fmt(row), flush=True)
    return rows


def _fmt(r: dict) -> str:
    out = (f"| {r['size']} | {r['model']} | {r['input']} | {r['llm_tokens']} | {r['crops']} | "
           f"{r['prefill_tflops']:.4g} | {r['kv_mib']:.3g} |")  # fmt: skip
    if "prefill_s" in r:
        out += f" {r['prefill_s']:.3f} | {r['decode_ms']:.2f} |"
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", choices=("full", "small", "both"), default="both")
    p.add_argument("--frames", type=int, default=64)
    p.add_argument("--text", type=int, default=64)
    a = p.parse_args()
    print("| size | model | input | LLM tokens | crops | prefill TFLOPs | KV MiB (bf16) |"
          " prefill s | decode ms/token |")  # fmt: skip
    rows = []
    for size in ("full", "small") if a.size == "both" else (a.size,):
        rows += run(size, a.frames, a.text)
    by = {(r["size"], r["model"], r["input"]): r for r in rows}
    for size in {r["size"] for r in rows}:
        for item, mini in (("image", "mini"), ("image", "mini_hd"), ("video", "mini")):
            ov, mn = by.get((size, "onevision", item)), by.get((size, mini, item))
            if ov and mn:
                print(f"{size} {item} {mini}/onevision: prefill FLOPs x"
                      f"{mn['prefill_tflops'] / ov['prefill_tflops']:.3f}, LLM tokens x"
                      f"{mn['llm_tokens'] / ov['llm_tokens']:.4f}")  # fmt: skip


if __name__ == "__main__":
    main()
