"""Train-step figures (issue "Figures"): ours vs HF transformers + PyTorch, and compile time.

    .venv/bin/python benchmarks/train_step.py [--configs tiny,100m] [--rows 1] [--repeats 3]
                                              [--skip-hf] [--peak-flops F] [--compile-layers 2,24]
                                              [--loss-tokens K]

1. One full-model optimizer step (forward + backward + AdamW, grad-norm clipping at 1.0,
   fp32) per config, ours (`lov_jax.train.step.Trainer`, one device) and HF's
   `LlavaOnevisionForConditionalGeneration` + `torch.optim.AdamW` on the SAME weights
   (our random init exported with `params_to_hf`) and the SAME batch: `--rows` rows, one
   unpacked 384x384 single-image sample per row (anyres: 2 crops, 1485 image tokens) plus
   a 16-token answer; the loss is on the answer only. Step time is the median of
   `--repeats` steps after one warm-up step (ours: the warm-up includes the compile).
   Both columns take the same model FLOPs (`lov_jax.train.metrics.step_flops`); MFU is
   against `--peak-flops`, by default the measured FLOP/s of a large fp32 matmul under
   jax on this machine (CPU has no vendor peak), so "MFU" here means "fraction of what
   a big GEMM reaches".
2. Compile time of our train step (`jit(...).lower(...).compile()`) for the tiny config
   with 2 and with 24 layers in both towers: the layers are scanned, so it barely grows.

Configs: `100m` is defined here (vision 384 wide x 4 layers at 384px, Qwen-2 512 wide x
8 layers, the real 152000 vocab: ~0.1B params, three quarters of it the tied embedding);
any other name is a preset of `lov_jax.config`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from configs import stage2_ov
from lov_jax import config
from lov_jax.convert.hf_keys import params_to_hf
from lov_jax.convert.safetensors_io import write_safetensors
from lov_jax.models.llava_onevision import abstract_params, count_params, init_params
from lov_jax.sharding import make_mesh
from lov_jax.testing.hf_checkpoints import our_batch, single_image_sample
from lov_jax.testing.tokenizers import qwen2_token_ids
from lov_jax.train import metrics
from lov_jax.train.step import Trainer, stack_micro_batches

IMAGE_HW = (384, 384)  # anyres 1x1 grid: base crop + 1 grid crop
ANSWER_TOKENS = 16
TRAINABLE = ("vision", "projector", "llm")
MAX_GRAD_NORM = 1.0  # = stage2_ov optim.max_grad_norm, applied on the HF side too


def model_config(name: str) -> config.ModelConfig:
    """The preset (or the 100m sizes) with Qwen-2's special ids: the prompts are Qwen ChatML."""
    return _sizes(name).replace(token_ids=qwen2_token_ids())


def _sizes(name: str) -> config.ModelConfig:
    if name == "100m":
        vision = config.VisionConfig(
            hidden_size=384, intermediate_size=1536, num_layers=4, num_heads=6
        )
        text = config.TextConfig(
            vocab_size=152000, hidden_size=512, intermediate_size=1536, num_layers=8,
            num_heads=8, num_kv_heads=2, head_dim=64, tie_word_embeddings=True,
        )  # fmt: skip
        return config.ModelConfig(vision=vision, text=text)
    return config.preset(name)


@dataclasses.dataclass
class Workload:
    """The same samples as our batch contract and as HF kwargs (one sample per row)."""

    ours: dict  # batch contract, [B, L] / [B, N, S, S, 3] ...
    hf: dict  # numpy input_ids/attention_mask/pixel_values/image_sizes/labels
    lengths: list[int]  # real tokens per row
    crops: int  # real crops over all rows


def make_workload(cfg: config.ModelConfig, rows: int, seed: int = 0) -> Workload:
    rng = np.random.default_rng(seed)
    samples = []
    for r in range(rows):
        s = single_image_sample(*IMAGE_HW, cfg, seed=seed + r)
        answer = rng.integers(1000, 150000, ANSWER_TOKENS).astype(np.int32)
        s.tokens = np.concatenate([s.tokens, answer])
        samples.append(s)
    length, n_crops = len(samples[0].tokens), len(samples[0].crops)
    ours = our_batch(samples, cfg, length, n_crops)
    tokens = ours["tokens"]
    # targets[t] = tokens[t + 1]; trained where t + 1 is an answer token, which is what
    # HF's labels (-100 elsewhere, shifted inside the model) select.
    ours["targets"] = np.concatenate([tokens[:, 1:], np.zeros((rows, 1), np.int32)], 1)
    ours["loss_mask"] = np.zeros((rows, length), np.float32)
    ours["loss_mask"][:, length - 1 - ANSWER_TOKENS : length - 1] = 1.0
    labels = np.full((rows, length), -100, np.int64)
    labels[:, -ANSWER_TOKENS:] = tokens[:, -ANSWER_TOKENS:]
    hf = {
        "input_ids": tokens.astype(np.int64),
        "attention_mask": np.ones((rows, length), np.int64),
        "pixel_values": np.concatenate([s.hf_kwargs["pixel_values"] for s in samples]),
        "image_sizes": np.concatenate([s.hf_kwargs["image_sizes"] for s in samples]),
        "labels": labels,
    }
    return Workload(ours, hf, [length] * rows, n_crops * rows)


def make_trainer(cfg: config.ModelConfig, loss_tokens: int = 0) -> Trainer:
    c = stage2_ov.get_config("tiny")
    mesh = make_mesh(devices=jax.devices()[:1])
    return Trainer(cfg, c.optim, mesh, total_steps=100, loss_chunk=c.train.loss_chunk,
                   loss_tokens_per_row=loss_tokens)  # fmt: skip


def time_ours(
    cfg, host_params, work: Workload, repeats: int, loss_tokens: int = 0
) -> tuple[float, float, float]:
    """(first step s incl. compile, median step s, first-step loss)."""
    trainer = make_trainer(cfg, loss_tokens)
    state = trainer.init_state(host_params)
    batch = jax.device_put(stack_micro_batches([work.ours]), trainer.batch_sharding)
    t0 = time.perf_counter()
    state, m = trainer.step(state, batch)
    jax.block_until_ready((state, m))
    loss = float(m["loss"])
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        state, m = trainer.step(state, batch)
        jax.block_until_ready((state, m))
        times.append(time.perf_counter() - t0)
    return first, statistics.median(times), loss


def time_hf(cfg, host_params, work: Workload, repeats: int) -> tuple[float, float]:
    """(median step s, first-step loss) of HF + torch AdamW on the same weights and batch."""
    import torch
    from transformers import LlavaOnevisionForConditionalGeneration

    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as d:
        write_safetensors(params_to_hf(host_params, cfg), d)
        (Path(d) / "config.json").write_text(json.dumps(cfg.to_hf_config(), indent=2))
        model, info = LlavaOnevisionForConditionalGeneration.from_pretrained(
            d, dtype=torch.float32, output_loading_info=True
        )
    bad = {k: v for k, v in info.items() if v and k != "error_msgs"}
    if bad:
        raise RuntimeError(f"HF load of our weights is incomplete: {bad}")
    model.train()
    c = stage2_ov.get_config("tiny").optim
    opt = torch.optim.AdamW(
        model.parameters(), lr=c.lr, betas=(c.b1, c.b2), eps=c.eps, weight_decay=c.weight_decay
    )
    inputs = {k: torch.from_numpy(v) for k, v in work.hf.items()}

    def step() -> float:
        loss = model(**inputs).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    loss = step()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), loss


def matmul_flops(n: int = 2048, repeats: int = 5) -> float:
    """Achieved FLOP/s of an fp32 [n, n] @ [n, n] under jax on the default device."""
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        f(a).block_until_ready()
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / statistics.median(times)


def compile_times(layers: list[int], rows: int) -> list[tuple[int, float, float]]:
    """(layers, lower s, compile s) of our train step, tiny widths, both towers at `layers`."""
    base = config.tiny()
    work = make_workload(base, rows)
    batch = stack_micro_batches([work.ours])
    out = []
    for n in layers:
        cfg = base.replace(
            vision=dataclasses.replace(base.vision, num_layers=n),
            text=dataclasses.replace(base.text, num_layers=n),
        )
        trainer = make_trainer(cfg)
        state = trainer.abstract_state()
        t0 = time.perf_counter()
        lowered = trainer.lower(state, batch)
        t1 = time.perf_counter()
        lowered.compile()
        t2 = time.perf_counter()
        out.append((n, t1 - t0, t2 - t1))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--configs", default="tiny,100m")
    p.add_argument("--rows", type=int, default=1, help="rows (= samples) per step")
    p.add_argument("--repeats", type=int, default=3, help="timed steps after one warm-up")
    p.add_argument("--skip-hf", action="store_true")
    p.add_argument("--loss-tokens", type=int, default=0,
                   help="ours: train.loss_tokens_per_row (0: the vocab head on every position, "
                        f"as HF does; {ANSWER_TOKENS}: only on the answer)")  # fmt: skip
    p.add_argument("--peak-flops", type=float, default=0.0, help="FLOP/s for MFU (0: measure)")
    p.add_argument("--compile-layers", default="2,24", help="'' skips the compile figure")
    args = p.parse_args()

    dev = jax.devices()[0]
    print(f"device: {dev.device_kind} ({jax.default_backend()}), jax {jax.__version__}")
    peak, how = args.peak_flops, "--peak-flops"
    if not peak and metrics.peak_flops(dev.device_kind):
        peak, how = metrics.peak_flops(dev.device_kind), "vendor bf16 peak"
    if not peak:
        peak, how = matmul_flops(), "measured fp32 2048^3 matmul, jax"
    print(f"reference peak for MFU: {peak / 1e9:.1f} GFLOP/s ({how})")

    header = (
        f"{'config':<8} {'params':>8} {'rows x tok':>10} {'GFLOP':>7} | "
        f"{'ours s':>7} {'tok/s':>7} {'MFU':>6} {'loss':>7} | "
        f"{'HF s':>7} {'tok/s':>7} {'MFU':>6} {'loss':>7} | {'speedup':>7}"
    )
    rows_out, firsts = [], []
    for name in args.configs.split(","):
        cfg = model_config(name)
        n_params = count_params(abstract_params(cfg, boxed=False))
        host = jax.tree.map(np.asarray, init_params(cfg, jax.random.key(0)))
        work = make_workload(cfg, args.rows)
        flops = metrics.step_flops(cfg, work.lengths, work.crops, TRAINABLE)
        tokens = sum(work.lengths)
        # Copies: the step donates its state, and HF loads `host` afterwards.
        ours = time_ours(cfg, jax.tree.map(np.copy, host), work, args.repeats, args.loss_tokens)
        first, ours_s, ours_loss = ours
        firsts.append((name, first))
        row = (
            f"{name:<8} {n_params / 1e6:>7.1f}M {args.rows:>3} x {work.lengths[0]:<4} "
            f"{flops / 1e9:>7.0f} | {ours_s:>7.3f} {tokens / ours_s:>7.0f} "
            f"{flops / ours_s / peak:>6.1%} {ours_loss:>7.4f} | "
        )
        if args.skip_hf:
            row += f"{'-':>7} {'-':>7} {'-':>6} {'-':>7} | {'-':>7}"
        else:
            hf_s, hf_loss = time_hf(cfg, host, work, args.repeats)
            row += (
                f"{hf_s:>7.3f} {tokens / hf_s:>7.0f} {flops / hf_s / peak:>6.1%} "
                f"{hf_loss:>7.4f} | {hf_s / ours_s:>6.2f}x"
            )
        rows_out.append(row)
    print(f"\nTrain step, fp32, full model trainable, median of {args.repeats} after 1 warm-up")
    print(header)
    print("-" * len(header))
    print("\n".join(rows_out))
    print("  loss: first step, same weights and batch (ours and HF should agree)")
    print("  ours first step incl. compile: " + ", ".join(f"{n} {s:.1f}s" for n, s in firsts))

    if args.compile_layers:
        layers = [int(x) for x in args.compile_layers.split(",")]
        print("\nCompile time of our train step (tiny widths, both towers at N layers, scanned)")
        print(f"{'layers':>6} {'lower s':>8} {'compile s':>10}")
        for n, lower_s, compile_s in compile_times(layers, args.rows):
            print(f"{n:>6} {lower_s:>8.2f} {compile_s:>10.2f}")


if __name__ == "__main__":
    main()
