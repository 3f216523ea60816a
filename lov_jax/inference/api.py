"""`generate(params, cfg, requests, prompter=...)`: chat messages or (prompt, images, videos)
in, text out. Prompt rendering and placement of visual items: lov_jax/inference/prompting.py.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from lov_jax.config import ModelConfig
from lov_jax.inference.engine import GenerationConfig, GenerationOutput, Generator
from lov_jax.inference.prompting import Prompter, Request


def generate(
    params,
    cfg: ModelConfig,
    requests: Request | Sequence[Request],
    *,
    prompter: Prompter,
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    stop_ids: Sequence[int] | None = None,
    seed: int = 0,
    num_frames: int = 8,
    generator: Generator | None = None,
    mesh=None,
    return_output: bool = False,
    clip_to_context: bool = False,
) -> str | list[str] | tuple[list[str], GenerationOutput]:
    """Generate answers. One request -> one string; a list of requests -> a batch.

    A request is chat messages (list of dicts) or a (prompt, images, videos) tuple;
    `prompter` (`Prompter.from_checkpoint(dir)`) holds the checkpoint's tokenizer and
    chat template. Decoding stops on `stop_ids` (default: the checkpoint's eos ids) or
    `max_new_tokens`; text is decoded without special tokens. Pass a `Generator` to
    reuse its compilations. A prompt + `max_new_tokens` beyond the model's context is a
    ContextError (`clip_to_context`: generate what fits, with a warning).
    """
    single = isinstance(requests, tuple) or (bool(requests) and isinstance(requests[0], Mapping))
    batch = [requests] if single else list(requests)
    inputs = [prompter.encode(cfg, r, num_frames) for r in batch]
    gen = generator or Generator(params, cfg, mesh=mesh)
    stops = None if stop_ids is None else tuple(stop_ids)
    gcfg = GenerationConfig(max_new_tokens, temperature, top_k, top_p, stops, seed, clip_to_context)
    out = gen.generate(inputs, gcfg)
    texts = [prompter.tokenizer.decode(t, skip_special_tokens=True) for t in out.tokens]
    if return_output:
        return texts, out
    return texts[0] if single else texts
