"""GPU figures (issue 21): attention kernels, the 0.5B train step, decode vs HF `generate`.

    benchmarks/gpu.sh [--smoke]                      # installs .[gpu] + .[hf], runs this
    python benchmarks/gpu_bench.py [--smoke] [--sections attention,train,decode]

1. attention: forward + backward (`jax.grad` of sum(out * g) w.r.t. q, k, v) of one
   packed row of L tokens (segments of L/2, L/4, L/8, L/16, then L/16 padding), the
   0.5B's heads (N=14, K=2, H=64), bf16, per impl: median of 3 after compile, and
   max |out - chunked's out| over real tokens (checks cuDNN's per-segment causal mask on
   the device). `xla` materialises [N, L, L] fp32 logits: at 32k it may not fit, and the
   row says so (with any other impl's reason for not running).
2. train: the ov_0_5b preset, bf16 compute, fp32 master params and AdamW state, attention
   `auto`, remat `full`, whole model trained, one row of L tokens (2 segments, 4 crops of
   384px). tokens/s = L / step time (median of 3 after one warm-up); MFU = model FLOPs /
   (step time * peak): `lov_jax.train.metrics.step_flops` (6 x params per token for the
   LLM incl. the head, plus 6 x 2 x s^2/2 x heads x head_dim per segment of s tokens per
   layer for causal attention; tower and projector per patch), peak from
   `metrics.PEAK_FLOPS` (H100 SXM / H200: 989 TFLOP/s dense bf16).
3. decode: 0.5B text sizes (random weights built by transformers, converted), greedy, 96-128
   token prompts, 64 new tokens, batch 1 and 32: ours (`Generator`, bf16 on GPU) and HF
   `generate` on the same device (torch with CUDA; "n/a" otherwise), tokens/s =
   B * (new tokens - 1) / decode time.

`--smoke`: tiny sizes on whatever device there is (CPU here), same tables; pallas_gpu then
runs in Pallas interpret mode and cudnn reports why it cannot run.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from lov_jax.models.attention import Call, choose, dot_product_attention, unsupported  # noqa: E402

IMPLS = ("xla", "chunked", "pallas_gpu", "cudnn")


@dataclasses.dataclass(frozen=True)
class Sizes:
    lengths: tuple[int, ...]  # attention and train rows
    heads: tuple[int, int, int]  # N, K, H of the attention bench
    dtype: str
    preset: str  # train preset
    crops: int
    decode_text: dict  # make_tiny_hf text sizes
    batches: tuple[int, ...]
    new_tokens: int


FULL = Sizes((8192, 32768), (14, 2, 64), "bfloat16", "ov_0_5b", 4,
             {"hidden_size": 896, "intermediate_size": 4864, "num_layers": 24, "num_heads": 14,
              "num_kv_heads": 2}, (1, 32), 64)  # fmt: skip
SMOKE = Sizes((256, 512), (4, 2, 16), "float32", "tiny", 1, {}, (1, 2), 8)


def _median_time(fn, *args, repeats: int = 3) -> float:
    jax.block_until_ready(fn(*args))  # compile + warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def packed_row(length: int) -> np.ndarray:
    """int32[1, L]: segments of L/2, L/4, L/8 and L/16 tokens, then L/16 padding."""
    sizes = [length // 2, length // 4, length // 8, length // 16]
    ids = np.concatenate([np.full(n, i + 1, np.int32) for i, n in enumerate(sizes)])
    return np.pad(ids, (0, length - len(ids)))[None]


def _run(impl: str, q, k, v, seg, g) -> tuple[jax.Array, float]:
    """(output, median fwd+bwd ms) of one kernel on one packed row."""

    def attend(q, k, v):
        return dot_product_attention(
            q, k, v, q_segment_ids=seg, kv_segment_ids=seg, causal=True, impl=impl
        )

    grad = jax.jit(jax.grad(lambda q, k, v: jnp.sum(attend(q, k, v) * g), argnums=(0, 1, 2)))
    return jax.jit(attend)(q, k, v), _median_time(grad, q, k, v) * 1e3


def attention_section(sizes: Sizes) -> None:
    n, kv, h = sizes.heads
    dtype = jnp.dtype(sizes.dtype)
    print(f"\nAttention fwd+bwd, one packed row, N={n} K={kv} H={h} {dtype.name}, causal, "
          "median of 3 (ms); diff = max |out - chunked| on real tokens")  # fmt: skip
    header = f"{'T':>6} " + " ".join(f"{i:>22}" for i in IMPLS)
    print(header + "\n" + "-" * len(header))
    notes = []
    for t in sizes.lengths:
        keys = jax.random.split(jax.random.key(t), 4)
        q = jax.random.normal(keys[0], (1, t, n, h), dtype)
        k = jax.random.normal(keys[1], (1, t, kv, h), dtype)
        v = jax.random.normal(keys[2], (1, t, kv, h), dtype)
        g = jax.random.normal(keys[3], (1, t, n, h), dtype)
        seg = jnp.asarray(packed_row(t))
        real = (seg != 0)[:, :, None, None]
        call = Call.of(q, k, causal=True, q_segment_ids=seg, kv_segment_ids=seg, q_offset=0,
                       sliding_window=None)  # fmt: skip
        outs, cells = {}, []
        for impl in ("chunked",) + tuple(i for i in IMPLS if i != "chunked"):
            reason = unsupported(impl, call)
            if reason is not None:
                cells.append((impl, f"n/a [{len(notes) + 1}]"))
                notes.append(reason)
                continue

            try:
                outs[impl], ms = _run(impl, q, k, v, seg, g)
            except Exception as e:  # an OOM (xla at 32k) or a kernel failure: report, go on
                cells.append((impl, f"failed [{len(notes) + 1}]"))
                notes.append(f"{impl} at T={t}: {type(e).__name__}: {str(e)[:200]}")
                continue
            diff = jnp.max(jnp.abs(jnp.where(real, outs[impl] - outs["chunked"], 0)))
            cells.append((impl, f"{ms:9.2f} diff {float(diff):.1e}"))
        by_impl = dict(cells)
        print(f"{t:>6} " + " ".join(f"{by_impl[i]:>22}" for i in IMPLS))
    for i, note in enumerate(notes, 1):
        print(f"  [{i}] {note}")


def train_section(sizes: Sizes) -> None:
    from configs import stage2_ov
    from lov_jax import config
    from lov_jax.models.llava_onevision import init_params
    from lov_jax.sharding import make_mesh
    from lov_jax.testing.batches import SyntheticBatches
    from lov_jax.testing.tokenizers import qwen2_token_ids
    from lov_jax.train import metrics
    from lov_jax.train.step import Trainer, stack_micro_batches

    dev = jax.devices()[0]
    peak = metrics.peak_flops(dev.device_kind)
    cfg = config.preset(
        sizes.preset, dtype=sizes.dtype, attention_impl="auto", remat_policy="full",
        token_ids=qwen2_token_ids(),
    )  # fmt: skip
    c = stage2_ov.get_config("tiny")
    peak_text = f"{peak / 1e12:.0f} TFLOP/s" if peak else "unknown (no MFU)"
    print(
        f"\nTrain step: {sizes.preset}, compute {cfg.dtype}, params fp32, remat full, "
        f"attention auto, one row, {sizes.crops} crops; peak {peak_text} ({dev.device_kind})"
    )
    header = (
        f"{'tokens':>7} {'attention':>10} {'step s':>8} {'tokens/s':>9} {'TFLOP':>7} {'MFU':>6}"
    )
    print(header + "\n" + "-" * len(header))
    for t in sizes.lengths:
        trainer = Trainer(cfg, c.optim, make_mesh(devices=jax.devices()[:1]), total_steps=100,
                          loss_chunk=c.train.loss_chunk)  # fmt: skip
        state = trainer.init_state(init_params(cfg, jax.random.key(0)))
        host = next(SyntheticBatches(rows=1, length=t, crops=sizes.crops,
                                     image_size=cfg.vision.image_size,
                                     patches=cfg.vision.num_features))  # fmt: skip
        lengths, crops, _ = metrics.batch_work(
            {k: v[None] for k, v in host.items()}, cfg.vision.num_features
        )
        flops = metrics.step_flops(cfg, lengths, crops, ("vision", "projector", "llm"))
        batch = jax.device_put(stack_micro_batches([host]), trainer.batch_sharding)
        state, m = trainer.step(state, batch)  # compile + warm-up
        jax.block_until_ready(m)
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            state, m = trainer.step(state, batch)
            jax.block_until_ready(m)
            times.append(time.perf_counter() - t0)
        step_s = statistics.median(times)
        kernel = choose("auto", _llm_call(cfg, t))
        mfu = f"{flops / step_s / peak:6.1%}" if peak else f"{'-':>6}"
        print(f"{t:>7} {kernel:>10} {step_s:8.3f} {t / step_s:9.0f} {flops / 1e12:7.3g} {mfu}")
        del state


def _llm_call(cfg, t: int) -> Call:
    """The decoder's training attention call at T tokens (what `auto` decides on)."""
    text = cfg.text
    return Call(
        q_len=t, kv_len=t, heads=text.num_heads, kv_heads=text.num_kv_heads,
        head_dim=text.head_dim, dtype=cfg.dtype, causal=True, segments=True,
        self_attention=True, decode=False, sliding_window=text.sliding_window,
        backend=jax.default_backend(),
    )  # fmt: skip


def decode_section(sizes: Sizes) -> None:
    sys.path.insert(0, str(Path(__file__).parent))
    import generate as cpu_bench  # benchmarks/generate.py: the checkpoint and prompt builders
    import torch

    from lov_jax.convert.safetensors_io import load_hf_checkpoint
    from lov_jax.inference.engine import GenerationConfig, Generator, PromptInputs

    on_gpu = jax.default_backend() == "gpu"
    dtype = "bfloat16" if on_gpu else "float32"
    device = "cuda" if on_gpu and torch.cuda.is_available() else "cpu"
    hf_ok = device == "cuda" or not on_gpu
    with tempfile.TemporaryDirectory() as tmp:
        hf = cpu_bench.make_hf(Path(tmp), sizes.decode_text)
        cfg, params = load_hf_checkpoint(tmp)
    cfg = cfg.replace(dtype=dtype)
    hf = hf.to(device=device, dtype=getattr(torch, dtype))
    gen = Generator(params, cfg)
    print(
        f"\nDecode, {dtype}, greedy, prompts 96-128 tokens, {sizes.new_tokens} new tokens, "
        f"median of 3; HF generate on {device if hf_ok else 'n/a (no CUDA torch)'}"
    )
    header = f"{'B':>3} {'ours tok/s':>11} {'HF tok/s':>9} {'ours prefill ms':>16}"
    print(header + "\n" + "-" * len(header))
    n = sizes.new_tokens
    gcfg = GenerationConfig(max_new_tokens=n, stop_ids=())
    for b in sizes.batches:
        rows = cpu_bench.prompts(b)
        inputs = [PromptInputs(r, np.zeros((0, 384, 384, 3), np.uint8), []) for r in rows]
        gen.generate(inputs, gcfg)  # compile
        ours = [gen.generate(inputs, gcfg) for _ in range(3)]
        decode = statistics.median(b * o.decode_steps / o.decode_s for o in ours)
        prefill = statistics.median(o.prefill_s for o in ours)
        hf_cell = f"{'n/a':>9}"
        if hf_ok:
            run = _hf_runner(hf, rows, device)
            run(2)  # warm-up
            total, first = statistics.median(run(n) for _ in range(3)), run(1)
            hf_cell = f"{b * (n - 1) / max(total - first, 1e-9):9.1f}"
        print(f"{b:>3} {decode:11.1f} {hf_cell} {prefill * 1e3:16.1f}")


def _hf_runner(model, rows, device: str):
    """HF greedy generate for exactly n new tokens on left-padded rows, on `device`."""
    import torch

    length = max(len(r) for r in rows)
    ids = np.full((len(rows), length), PAD_ID, np.int64)
    mask = np.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, length - len(r) :], mask[i, length - len(r) :] = r, 1
    ids, mask = torch.from_numpy(ids).to(device), torch.from_numpy(mask).to(device)

    def run(n: int) -> float:
        t0 = time.perf_counter()
        with torch.no_grad():
            model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n,
                           min_new_tokens=n, do_sample=False, pad_token_id=PAD_ID,
                           eos_token_id=None)  # fmt: skip
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    return run


PAD_ID = 151643  # Qwen-2's <|endoftext|>, the prompts' pad (benchmarks/generate.py)
SECTIONS = {"attention": attention_section, "train": train_section, "decode": decode_section}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny sizes (CPU check of the script)")
    ap.add_argument("--sections", default=",".join(SECTIONS))
    args = ap.parse_args()
    unknown = set(args.sections.split(",")) - set(SECTIONS)
    if unknown:
        ap.error(f"unknown sections {sorted(unknown)}; known: {list(SECTIONS)}")
    sizes = SMOKE if args.smoke else FULL
    dev = jax.devices()[0]
    smoke = ", smoke sizes" if args.smoke else ""
    print(f"device: {dev.device_kind} ({jax.default_backend()}), jax {jax.__version__}{smoke}; "
          f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')}")  # fmt: skip
    for name in args.sections.split(","):
        t0 = time.perf_counter()
        SECTIONS[name](sizes)
        print(f"  ({name}: {time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
