"""Prefill latency and decode tokens/s: lov_jax KV-cache generation vs HF `generate`.

Both run the same random model (built with transformers, saved, loaded by our converter)
on the same left-padded prompts in one process, fp32 on CPU:

    python benchmarks/generate.py [--configs tiny,100m] [--batches 1,8] [--new-tokens 32]

prefill_ms: one forward over the prompts that fills the cache and yields the first
token's logits (ours: jitted, compiled beforehand; its prompt is padded to the length
bucket). decode tok/s: B * (new_tokens - 1) / time of the remaining steps (both forced to
run all steps: no stop ids / min_new_tokens). Each timing is the median of --repeats,
ours and HF interleaved. HF's prefill is `generate(max_new_tokens=1)` (time to first token).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import numpy as np  # noqa: E402

PAD_ID = 151643

# Text sizes (vision stays the tiny tower: prompts are text). "100m": ~102M parameters,
# 78M of them the tied 152k x 512 embedding.
CONFIGS = {
    "tiny": {},  # lov_jax.testing.hf_checkpoints.TINY_TEXT
    "100m": {"hidden_size": 512, "intermediate_size": 1536, "num_layers": 8, "num_heads": 8,
             "num_kv_heads": 2},
}  # fmt: skip


def make_hf(out_dir: Path, text_kw: dict):
    """The shared tiny checkpoint (Qwen-2 tokenizer, tied) with these text sizes, loaded."""
    from transformers import LlavaOnevisionForConditionalGeneration

    from lov_jax.testing.hf_checkpoints import make_tiny_hf

    make_tiny_hf(out_dir, tie_word_embeddings=True, seed=0, **text_kw)
    return LlavaOnevisionForConditionalGeneration.from_pretrained(out_dir).eval()


def prompts(batch: int, seed: int = 0) -> list[np.ndarray]:
    """ChatML-framed random text prompts of 96..128 tokens (distinct lengths: left padding)."""
    rng = np.random.default_rng(seed)
    head, tail = [151644, 872, 198], [151645, 198, 151644, 77091, 198]
    out = []
    for b in range(batch):
        n = 96 + (32 * b) // max(batch, 1) - len(head) - len(tail)
        out.append(np.asarray(head + rng.integers(1000, 100000, n).tolist() + tail, np.int32))
    return out


def hf_runner(model, rows):
    """A callable running HF greedy generate for exactly n new tokens on left-padded rows."""
    import torch

    length = max(len(r) for r in rows)
    ids = np.full((len(rows), length), PAD_ID, np.int64)
    mask = np.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, length - len(r) :], mask[i, length - len(r) :] = r, 1
    ids, mask = torch.from_numpy(ids), torch.from_numpy(mask)
    kw = {"do_sample": False, "pad_token_id": PAD_ID, "eos_token_id": None}

    def run(n: int) -> float:
        t = time.perf_counter()
        with torch.no_grad():
            model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n,
                           min_new_tokens=n, **kw)  # fmt: skip
        return time.perf_counter() - t

    return run


def bench(gen, model, rows, new_tokens: int, repeats: int) -> dict[str, float]:
    """Ours and HF interleaved repeat by repeat, so both see the same machine load."""
    from lov_jax.inference.engine import GenerationConfig, PromptInputs

    inputs = [PromptInputs(r, np.zeros((0, 384, 384, 3), np.uint8), []) for r in rows]
    gcfg = GenerationConfig(max_new_tokens=new_tokens, stop_ids=())
    t = time.perf_counter()
    gen.generate(inputs, gcfg)  # compile
    compile_s = time.perf_counter() - t
    hf = hf_runner(model, rows)
    hf(2)  # warm-up
    ours_p, ours_d, hf_p, hf_t = [], [], [], []
    for _ in range(repeats):
        out = gen.generate(inputs, gcfg)
        ours_p.append(out.prefill_s)
        ours_d.append(len(rows) * out.decode_steps / out.decode_s)
        hf_p.append(hf(1))
        hf_t.append(hf(new_tokens))
    med = statistics.median
    hf_decode = len(rows) * (new_tokens - 1) / max(med(hf_t) - med(hf_p), 1e-9)
    return {"prefill": med(ours_p), "decode": med(ours_d), "hf_prefill": med(hf_p),
            "hf_decode": hf_decode, "compile": compile_s}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", default="tiny,100m")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    import jax
    import torch

    from lov_jax.convert.safetensors_io import load_hf_checkpoint
    from lov_jax.inference.engine import Generator
    from lov_jax.models.llava_onevision import count_params

    print(f"jax {jax.__version__} ({jax.devices()[0].platform}, {os.cpu_count()} cpus), "
          f"torch {torch.__version__} ({torch.get_num_threads()} threads); fp32; "
          f"prompts 96-128 tokens (bucket 128), {args.new_tokens} new tokens, "
          f"median of {args.repeats}")  # fmt: skip
    header = (f"{'config':>6} {'params':>7} {'B':>2} | {'prefill ms':>10} {'HF':>8} | "
              f"{'decode tok/s':>12} {'HF':>8} | {'compile s':>9}")  # fmt: skip
    print(header)
    print("-" * len(header))
    for name in args.configs.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            hf = make_hf(Path(tmp), CONFIGS[name])
            cfg, params = load_hf_checkpoint(tmp)
        gen = Generator(params, cfg)
        n_params = count_params(params)
        for b in (int(x) for x in args.batches.split(",")):
            r = bench(gen, hf, prompts(b), args.new_tokens, args.repeats)
            print(f"{name:>6} {n_params / 1e6:6.1f}M {b:>2} | {r['prefill'] * 1e3:10.1f} "
                  f"{r['hf_prefill'] * 1e3:8.1f} | {r['decode']:12.1f} {r['hf_decode']:8.1f} | "
                  f"{r['compile']:9.1f}")  # fmt: skip


if __name__ == "__main__":
    main()
