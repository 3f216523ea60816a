"""`lov-jax serve` throughput through the `openai` client vs HF `generate` in a loop.

One random checkpoint per config (built with transformers, saved, served by us), fp32 on
CPU, in one process:

    python benchmarks/serve.py [--configs tiny,100m] [--concurrency 1,8,32] [--requests 32]
                               [--max-tokens 32] [--slots 32]

For each concurrency c, the same --requests chat prompts are sent by c client threads
(streaming, so time to first token is seen): requests/s, generated tokens/s (from
`usage`), median time to first token. Every level's texts must equal concurrency 1's
(one request at a time, greedy): `same_as_c1`. HF: `generate` on each prompt alone
(greedy, the checkpoint's eos, the same max tokens), its first token timed with
max_new_tokens=1; `hf_equal` counts HF texts equal to ours. (`transformers serve` needs
its optional serving extras, not installed here; HF's loop is the reference instead.)
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

CONFIGS = {
    "tiny": {},  # lov_jax.testing.hf_checkpoints.TINY_TEXT
    "100m": {"hidden_size": 512, "intermediate_size": 1536, "num_layers": 8, "num_heads": 8,
             "num_kv_heads": 2},
}  # fmt: skip
TOPICS = ["a red square", "two circles", "a moving line", "the sky", "a blue triangle",
          "numbers", "a green dot", "three stars"]  # fmt: skip


def messages(k: int) -> list[dict]:
    # Prompt lengths vary (13 to ~60 tokens) so rows join with different buckets' worth.
    extra = " Explain in detail." * (k % 5)
    return [{"role": "user", "content": f"Question {k}: describe {TOPICS[k % 8]}.{extra}"}]


def run_level(client, model: str, n: int, concurrency: int, max_tokens: int):
    def one(k):
        t0 = time.perf_counter()
        ttft, text, usage = None, "", None
        stream = client.chat.completions.create(
            model=model, messages=messages(k), max_tokens=max_tokens, stream=True,
            stream_options={"include_usage": True},
        )  # fmt: skip
        for chunk in stream:
            if chunk.usage is not None:
                usage = chunk.usage
            for c in chunk.choices:
                if c.delta.content:
                    ttft = ttft or time.perf_counter() - t0
                    text += c.delta.content
        return text, usage.completion_tokens, ttft or time.perf_counter() - t0

    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        outs = list(pool.map(one, range(n)))
    wall = time.perf_counter() - t0
    return [o[0] for o in outs], sum(o[1] for o in outs), [o[2] for o in outs], wall


def hf_loop(hf_dir: Path, cfg, n: int, max_tokens: int):
    import torch
    from transformers import LlavaOnevisionForConditionalGeneration

    from lov_jax.inference import Prompter

    model = LlavaOnevisionForConditionalGeneration.from_pretrained(hf_dir).eval()
    prompter = Prompter.from_checkpoint(hf_dir)
    texts, tokens, ttfts = [], 0, []
    eos = list(model.generation_config.eos_token_id)
    t0 = time.perf_counter()
    for k in range(n):
        # The server's prompt path (Prompter.encode): text-only, so the ids are the tokens.
        x = torch.tensor([prompter.encode(cfg, messages(k)).tokens.tolist()])
        kw = {"do_sample": False, "eos_token_id": eos, "pad_token_id": eos[0]}
        with torch.no_grad():
            s = time.perf_counter()
            model.generate(input_ids=x, max_new_tokens=1, **kw)
            ttfts.append(time.perf_counter() - s)
            out = model.generate(input_ids=x, max_new_tokens=max_tokens, **kw)[0, x.shape[1] :]
        tokens += len(out)
        texts.append(prompter.tokenizer.decode(out.tolist(), skip_special_tokens=True))
    return texts, tokens, ttfts, time.perf_counter() - t0 - sum(ttfts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--configs", default="tiny")
    ap.add_argument("--concurrency", default="1,8,32")
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--slots", type=int, default=32)
    ap.add_argument("--context", type=int, default=256)
    args = ap.parse_args()

    import jax
    import openai

    from lov_jax.inference import Prompter
    from lov_jax.pretrained import load_pretrained
    from lov_jax.serve import Batching, ServeConfig, start
    from lov_jax.testing.hf_checkpoints import make_tiny_hf

    print(f"jax {jax.__version__} on {jax.devices()[0].platform}, {os.cpu_count()} CPUs")
    levels = [int(c) for c in args.concurrency.split(",")]
    for name in args.configs.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            hf_dir = make_tiny_hf(Path(tmp), tie_word_embeddings=True, seed=0, **CONFIGS[name])
            cfg, params = load_pretrained(hf_dir)
            batching = Batching(slots=args.slots, context=args.context,
                                length_buckets=(64, 128), max_queue=4 * args.requests)  # fmt: skip
            t0 = time.perf_counter()
            running = start(params, cfg, Prompter.from_checkpoint(hf_dir),
                            ServeConfig(model_name=name, port=0), batching)  # fmt: skip
            warm = time.perf_counter() - t0
            client = openai.OpenAI(base_url=running.url, api_key="EMPTY", max_retries=0,
                                   timeout=600)  # fmt: skip
            print(f"\n[{name}] {args.requests} requests x max_tokens {args.max_tokens}, "
                  f"{args.slots} slots; server start + warm-up {warm:.1f} s")  # fmt: skip
            print(f"{'system':<22} {'conc':>4} {'req/s':>8} {'tok/s':>9} {'ttft_ms':>9} "
                  f"{'same_as_c1':>10}")  # fmt: skip
            base = None
            try:
                for c in levels:
                    texts, tokens, ttft, wall = run_level(
                        client, name, args.requests, c, args.max_tokens
                    )
                    base = base or texts
                    same = sum(a == b for a, b in zip(texts, base, strict=True))
                    print(f"{'lov-jax serve':<22} {c:>4} {args.requests / wall:>8.2f} "
                          f"{tokens / wall:>9.1f} {statistics.median(ttft) * 1e3:>9.1f} "
                          f"{same:>5}/{len(texts)}")  # fmt: skip
            finally:
                running.close()
            texts, tokens, ttft, wall = hf_loop(hf_dir, cfg, args.requests, args.max_tokens)
            equal = sum(a == b for a, b in zip(texts, base, strict=True))
            print(f"{'HF generate (loop)':<22} {1:>4} {args.requests / wall:>8.2f} "
                  f"{tokens / wall:>9.1f} {statistics.median(ttft) * 1e3:>9.1f} "
                  f"hf_equal {equal}/{len(texts)}")  # fmt: skip


if __name__ == "__main__":
    main()
