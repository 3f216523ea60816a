"""Prefill + KV-cache decode under `jax.jit`, with shape buckets and mesh sharding.

A batch of prompts is LEFT padded to a prompt-length bucket P (docs/reference.md 6.1:
positions = cumsum(mask) - 1, padding masked through segment id 0) and its crops to a
crop-count bucket N, so a long eval compiles once per (B, P, N, M) and not per sample.

    prefill: tokens int32[B, P], pixels uint8[B, N, S, S, 3], vis_idx/vis_w [B, P, 4]
             -> first-step logits float32[B, V], cache (k, v) dtype[L, B, P + M, K, Dh]
    decode:  one `lax.while_loop` of single-token steps writing slot P + i - 1, until
             every row has emitted a stop id or max_new_tokens are out: int32[B, M]

M is the max-new-tokens bucket. Slots are labelled by `kv_segment_ids` int32[B, P + M]
(the prompt's attention mask, then ones); decode queries carry segment 1 and attend
causally from their slot, so padding is never attended.
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding

from lov_jax import batch as batch_contract
from lov_jax import sharding, visual_layout
from lov_jax.config import ModelConfig
from lov_jax.inference.sampling import sample_logits
from lov_jax.models.kv_cache import CACHE_AXES, KVCache
from lov_jax.models.llava_onevision import LlavaOnevision, abstract_params

MAX_STOP_IDS = 8  # stop ids travel as a traced int32[8] (padded with -1): no recompiles
MIN_LENGTH_BUCKET = 64
MIN_NEW_TOKENS_BUCKET = 16
PREFILL_KEYS = ("tokens", "pixels", "vis_idx", "vis_w")  # of the batch contract; + mask


@dataclasses.dataclass(frozen=True)
class GenerationConfig:
    """Decoding knobs. temperature 0 = greedy; top_k 0 and top_p 1 disable the filters;
    stop_ids None = the checkpoint's eos ids (`cfg.token_ids.eos`), () = never stop.
    clip_to_context: when prompt + max_new_tokens exceed the model's context, generate
    only what fits (with a warning) instead of raising ContextError."""

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    stop_ids: tuple[int, ...] | None = None
    seed: int = 0
    clip_to_context: bool = False

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0


class ContextError(ValueError):
    """A prompt (plus the tokens to generate) longer than the model's context."""


def fit_context(lengths: Sequence[int], max_new_tokens: int, context: int, clip: bool) -> int:
    """max_new_tokens that keeps every prompt (of `lengths` tokens) inside `context`
    (the model's `text.max_position_embeddings`): unchanged, clipped (`clip`, warned), or
    a ContextError naming the prompt."""
    r = max(range(len(lengths)), key=lambda i: lengths[i])
    n = lengths[r]
    where = f"prompt {r}" if len(lengths) > 1 else "the prompt"
    if n >= context:
        raise ContextError(
            f"{where} takes {n} tokens, the model's whole context of {context} "
            "(text.max_position_embeddings) or more: shorten it or use fewer images / frames"
        )
    if n + max_new_tokens <= context:
        return max_new_tokens
    if not clip:
        raise ContextError(
            f"{where} takes {n} tokens and max_new_tokens is {max_new_tokens}: together they "
            f"exceed the model's context of {context} (text.max_position_embeddings); lower "
            "--max-new-tokens or pass --clip-to-context"
        )
    fit = context - n
    print(
        f"warning: {where} takes {n} tokens: generating at most {fit} new tokens, not "
        f"{max_new_tokens} (the model's context is {context}; --clip-to-context)",
        file=sys.stderr,
        flush=True,
    )
    return fit


@dataclasses.dataclass
class PromptInputs:
    """One prompt, host side: expanded token ids, its crops and visual items."""

    tokens: np.ndarray  # int32[T], placeholders expanded
    crops: np.ndarray  # uint8[n, S, S, 3]
    items: list  # list[visual_layout.VisualItem], in placeholder order


@dataclasses.dataclass
class GenerationOutput:
    tokens: list[list[int]]  # per prompt: generated ids, up to and including a stop id
    stopped: list[bool]  # whether the row ended on a stop id (else max_new_tokens)
    first_logits: np.ndarray  # float32[B, V]: the prefill step's logits (parity checks)
    prefill_s: float
    decode_s: float
    decode_steps: int  # single-token steps the decode loop ran (after the prefill token)
    shapes: tuple[int, int, int, int]  # (B, P, N, M) actually compiled for


def bucket(n: int, buckets: Sequence[int] | None, minimum: int) -> int:
    """Smallest bucket >= n: from the given list, else a power of two >= minimum."""
    if buckets:
        for b in sorted(buckets):
            if b >= n:
                return int(b)
        raise ValueError(f"{n} exceeds the largest bucket {max(buckets)}")
    return max(minimum, 1 << max(n - 1, 0).bit_length())


def build_batch(
    prompts: Sequence[PromptInputs],
    cfg: ModelConfig,
    *,
    length: int,
    num_crops: int,
    batch_size: int,
    pad_id: int,
) -> dict[str, np.ndarray]:
    """Left-padded prefill arrays: the batch contract's tokens / pixels / vis_idx / vis_w /
    positions (`lov_jax.batch`) plus `mask` int32[B, P] (1 on prompt tokens); extra rows
    are all padding."""
    batch = batch_contract.empty_batch(
        batch_size, length, num_crops, cfg, pad_id=pad_id, keys=PREFILL_KEYS
    )
    batch["mask"] = np.zeros((batch_size, length), np.int32)
    for r, p in enumerate(prompts):
        n, c = len(p.tokens), len(p.crops)
        if n > length or c > num_crops:
            raise ValueError(f"prompt {r}: {n} tokens / {c} crops exceed {length} / {num_crops}")
        if n and not 0 <= int(p.tokens.min()) <= int(p.tokens.max()) < cfg.text.vocab_size:
            raise ValueError(
                f"prompt {r}: token ids span [{int(p.tokens.min())}, {int(p.tokens.max())}], "
                f"outside the embedding table (vocab_size {cfg.text.vocab_size}): is the "
                "tokenizer the checkpoint's own?"
            )
        batch["tokens"][r, length - n :] = p.tokens
        batch["mask"][r, length - n :] = 1
        batch["pixels"][r, :c] = p.crops
        if p.items:
            idx, w = visual_layout.place_taps(batch["tokens"][r], p.items, cfg, num_crops)
            batch["vis_idx"][r], batch["vis_w"][r] = idx, w
    # HF GenerationMixin: cumsum(mask) - 1; padded entries are masked, their value is moot.
    batch["positions"] = np.maximum(np.cumsum(batch["mask"], axis=1) - 1, 0).astype(np.int32)
    return batch


class Generator:
    """Jitted prefill/decode for one model; reuse it across calls to reuse compilations.

    params: the plain params tree (numpy or jax). With `mesh`, params are placed by the
    rules table (heads over `tensor`, embed over `fsdp`) and batches over data x fsdp;
    the batch is padded to a multiple of that size.
    """

    def __init__(
        self,
        params,
        cfg: ModelConfig,
        *,
        mesh: jax.sharding.Mesh | None = None,
        rules: Sequence[tuple] = sharding.LOGICAL_AXIS_RULES,
        length_buckets: Sequence[int] | None = None,
        crop_buckets: Sequence[int] | None = None,
        pad_id: int | None = None,
    ):
        self.cfg = cfg = cfg.replace(remat_policy="none")
        self.mesh, self.rules = mesh, tuple(rules)
        self.pad_id = cfg.ids.pad if pad_id is None else pad_id
        self.length_buckets, self.crop_buckets = length_buckets, crop_buckets
        self.model = LlavaOnevision(cfg)  # one call: prefill and decode pass it a KVCache
        self.batch_multiple = 1
        if mesh is None:
            self.params = jax.tree.map(jnp.asarray, params)
            self._data_sharding = None
        else:
            self.batch_multiple = sharding.batch_shards(mesh.shape, self.rules)
            self._data_sharding = sharding.batch_sharding(mesh, self.rules)
            with self._context():
                shardings = sharding.params_sharding(abstract_params(cfg), mesh, self.rules)
                self.params = jax.device_put(params, shardings)
        self._prefill = jax.jit(self._prefill_impl, static_argnames=("cache_len",))
        self._decode = jax.jit(
            self._decode_impl, static_argnames=("greedy", "prompt_len"), donate_argnums=(2,)
        )
        self.compiled_shapes: set[tuple[int, int, int, int]] = set()

    def _context(self):
        stack = contextlib.ExitStack()
        if self.mesh is not None:
            stack.enter_context(jax.set_mesh(self.mesh))
            stack.enter_context(sharding.activation_rules(self.rules))
        return stack

    # ---- AOT seams (`lov-jax plan --decode`) -------------------------------------------

    def abstract_cache(self, batch: int, cache_len: int, mesh: jax.sharding.Mesh | None = None):
        """The decode loop's KV cache as ShapeDtypeStructs, sharded by the rules table on
        `mesh` (default: this generator's): (k, v) dtype[L, B, C, K, Dh]."""
        t = self.cfg.text
        spec = self._spec_on(mesh or self.mesh)
        shape = (t.num_layers, batch, cache_len, t.num_kv_heads, t.head_dim)
        kv = jax.ShapeDtypeStruct(shape, jnp.dtype(self.cfg.dtype), sharding=spec(*CACHE_AXES))
        return kv, kv

    def lower_decode(
        self,
        params,
        *,
        batch: int,
        cache_len: int,
        new_tokens: int,
        greedy: bool = True,
        mesh: jax.sharding.Mesh | None = None,
    ) -> jax.stages.Lowered:
        """The jitted decode loop lowered for `batch` rows and `cache_len` cache slots, the
        last `new_tokens` of them generated; nothing is allocated.

        params: arrays or ShapeDtypeStructs (with shardings on `mesh`); every other input
        is abstract, sharded by the rules table on `mesh` (default: this generator's).
        """
        mesh = mesh or self.mesh
        spec, v = self._spec_on(mesh), self.cfg.text.vocab_size
        rows, scalar = spec("activation_batch"), spec()
        abstract = jax.ShapeDtypeStruct
        args = (
            abstract(
                (batch, v), jnp.float32, sharding=spec("activation_batch", "activation_vocab")
            ),
            self.abstract_cache(batch, cache_len, mesh),
            abstract((batch, cache_len), jnp.int32, sharding=rows),  # kv segment ids
            abstract((batch,), jnp.int32, sharding=rows),  # next positions
            abstract((), jax.eval_shape(jax.random.key, 0).dtype, sharding=scalar),
            abstract((), jnp.float32, sharding=scalar),  # temperature
            abstract((), jnp.int32, sharding=scalar),  # top_k
            abstract((), jnp.float32, sharding=scalar),  # top_p
            abstract((MAX_STOP_IDS,), jnp.int32, sharding=scalar),
            abstract((), jnp.int32, sharding=scalar),  # max_new
        )
        with sharding.activation_rules(self.rules), jax.set_mesh(mesh):
            return self._decode.lower(
                params, *args, greedy=greedy, prompt_len=cache_len - new_tokens
            )

    def _spec_on(self, mesh):
        def spec(*names):
            return NamedSharding(mesh, sharding.logical_to_spec(names, self.rules))

        return spec

    # ---- device functions ------------------------------------------------------------

    def _prefill_impl(self, params, batch, *, cache_len: int):
        t = self.cfg.text
        # Slots: the prompt's attention mask, then ones for the tokens decode will write.
        slots = jnp.pad(
            batch["mask"], ((0, 0), (0, cache_len - batch["mask"].shape[1])), constant_values=1
        )
        empty = KVCache.empty(
            t.num_layers, slots, t.num_kv_heads, t.head_dim, jnp.dtype(self.cfg.dtype)
        )
        # Left padding: the last column holds every row's last prompt token.
        logits, cache = self.model.apply(
            {"params": params}, batch["tokens"], batch["positions"], batch["mask"],
            batch["pixels"], batch["vis_idx"], batch["vis_w"], empty, output="last_logits",
        )  # fmt: skip
        return logits[:, 0], (cache.k, cache.v)

    def _decode_impl(
        self, params, logits0, cache, kv_segment_ids, next_pos, rng, temperature, top_k, top_p,
        stop_ids, max_new, *, greedy: bool, prompt_len: int,
    ):  # fmt: skip
        variables = {"params": params}
        b, slots = logits0.shape[0], kv_segment_ids.shape[1] - prompt_len
        knobs = {"greedy": greedy, "temperature": temperature, "top_k": top_k, "top_p": top_p}
        rng, key = jax.random.split(rng)
        tok = sample_logits(logits0, key, **knobs)
        out = jnp.full((b, slots), self.pad_id, jnp.int32).at[:, 0].set(tok)
        done = jnp.isin(tok, stop_ids)
        ones = jnp.ones((b, 1), jnp.int32)
        cache = KVCache(*cache, kv_segment_ids, jnp.int32(prompt_len))  # the prompt's slots

        def cond(state):
            i, _, done, _, _, _ = state
            return (i < max_new) & ~jnp.all(done)

        def body(state):
            i, tok, done, out, cache, rng = state
            positions = (next_pos + i - 1)[:, None]
            logits, cache = self.model.apply(variables, tok[:, None], positions, ones, cache=cache)
            rng, key = jax.random.split(rng)
            new = jnp.where(done, self.pad_id, sample_logits(logits[:, 0], key, **knobs))
            out = jax.lax.dynamic_update_slice_in_dim(out, new[:, None], i, axis=1)
            return i + 1, new, done | jnp.isin(new, stop_ids), out, cache, rng

        state = (jnp.int32(1), tok, done, out, cache, rng)
        steps, _, _, out, cache, _ = jax.lax.while_loop(cond, body, state)
        # The cache is returned so its donated buffer is reused.
        return out, steps - 1, (cache.k, cache.v)

    # ---- host API --------------------------------------------------------------------

    def shapes_for(self, prompts: Sequence[PromptInputs], max_new_tokens: int):
        """(B, P, N, M) buckets a batch of these prompts runs under."""
        b = -(-len(prompts) // self.batch_multiple) * self.batch_multiple
        p = bucket(max(len(x.tokens) for x in prompts), self.length_buckets, MIN_LENGTH_BUCKET)
        crops = max(len(x.crops) for x in prompts)
        n = 0 if crops == 0 else bucket(crops, self.crop_buckets, 1)
        m = bucket(max_new_tokens, None, MIN_NEW_TOKENS_BUCKET)
        return b, p, n, m

    def generate(
        self, prompts: Sequence[PromptInputs], gen: GenerationConfig = GenerationConfig()
    ) -> GenerationOutput:
        if not prompts:
            raise ValueError("no prompts")
        stop_ids = self.cfg.ids.eos if gen.stop_ids is None else tuple(gen.stop_ids)
        if len(stop_ids) > MAX_STOP_IDS:
            raise ValueError(f"at most {MAX_STOP_IDS} stop ids")
        vocab = self.cfg.text.vocab_size
        if any(not 0 <= i < vocab for i in stop_ids):
            raise ValueError(f"stop ids {list(stop_ids)} must lie in [0, {vocab})")
        if gen.max_new_tokens < 1:
            raise ValueError("max_new_tokens must be >= 1")
        lengths = [len(x.tokens) for x in prompts]
        max_new = fit_context(
            lengths, gen.max_new_tokens, self.cfg.text.max_position_embeddings,
            gen.clip_to_context,
        )  # fmt: skip
        gen = dataclasses.replace(gen, max_new_tokens=max_new)
        b, p, n, m = self.shapes_for(prompts, gen.max_new_tokens)
        self.compiled_shapes.add((b, p, n, m))
        stop = np.full((MAX_STOP_IDS,), -1, np.int32)
        stop[: len(stop_ids)] = stop_ids
        with self._context():
            t0 = time.perf_counter()
            logits0, cache, host = self.prefill(prompts, shapes=(b, p, n), cache_len=p + m)
            logits0.block_until_ready()
            t1 = time.perf_counter()
            kv_seg = np.concatenate([host["mask"], np.ones((b, m), np.int32)], axis=1)
            next_pos = host["mask"].sum(axis=1).astype(np.int32)
            out, steps, _ = self._decode(
                self.params, logits0, cache, self._put(kv_seg), self._put(next_pos),
                jax.random.key(gen.seed), jnp.float32(gen.temperature), jnp.int32(gen.top_k),
                jnp.float32(gen.top_p), jnp.asarray(stop), jnp.int32(gen.max_new_tokens),
                greedy=gen.greedy, prompt_len=p,
            )  # fmt: skip
            out = np.asarray(out)
            t2 = time.perf_counter()
        tokens, stopped = [], []
        stop_set = set(stop_ids)
        for row in out[: len(prompts), : gen.max_new_tokens]:
            hits = [i for i, t in enumerate(row) if int(t) in stop_set]
            end = hits[0] + 1 if hits else len(row)
            tokens.append([int(t) for t in row[:end]])
            stopped.append(bool(hits))
        return GenerationOutput(
            tokens=tokens,
            stopped=stopped,
            first_logits=np.asarray(logits0)[: len(prompts)],
            prefill_s=t1 - t0,
            decode_s=t2 - t1,
            decode_steps=int(steps),
            shapes=(b, p, n, m),
        )

    def prefill(
        self,
        prompts: Sequence[PromptInputs],
        *,
        shapes: tuple[int, int, int] | None = None,
        cache_len: int | None = None,
    ):
        """The prompts' prefill alone: (first-step logits float32[B, V], cache (k, v)
        dtype[L, B, cache_len, K, Dh] with the prompts at slots 0..P-1, the host batch of
        `build_batch`). shapes: (B, P, N) (default: this generator's buckets); cache_len
        default P. The continuous batcher (lov_jax/inference/slots.py) copies the cache
        into a running one."""
        if shapes is None:
            shapes = self.shapes_for(prompts, 1)[:3]
        b, p, n = shapes
        host = build_batch(
            prompts, self.cfg, length=p, num_crops=n, batch_size=b, pad_id=self.pad_id
        )
        with self._context():
            logits0, cache = self._prefill(self.params, self._put(host), cache_len=cache_len or p)
        return logits0, cache, host

    def context(self):
        """The mesh and activation rules this generator's jitted calls run under."""
        return self._context()

    def put(self, tree, replicated: bool = False):
        """Host arrays onto the mesh: rows over data x fsdp (leading axis), or replicated;
        without a mesh, onto the default device. On a pod every process passes the same
        values."""
        if replicated and self.mesh is not None:
            return jax.device_put(tree, NamedSharding(self.mesh, jax.sharding.PartitionSpec()))
        return self._put(tree)

    def _put(self, tree):
        if self._data_sharding is None:
            return jax.tree.map(jnp.asarray, tree)
        return jax.device_put(tree, self._data_sharding)
