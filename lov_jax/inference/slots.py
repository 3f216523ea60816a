"""Continuous batching: a fixed pool of decode slots over one running KV cache.

    cache (k, v)  dtype[L, B, C, K, Dh]   B slots (rows), C columns
    segment_ids   int32[B, C]             1 = attended, 0 = padding / another request's
    t             int                     the column every row writes at this step

All rows write the same column t each step (the cache's scalar write index), so a
request joins between steps: its prompt is prefilled alone (`Generator.prefill`, bucket
P), copied into its row at columns [t - P, t), and the row's other columns are relabelled
(0 before, 1 from t on). Decoding then attends causally from column t, exactly as
`Generator.generate` attends its own cache: masked columns weigh exactly 0. When t
reaches C the cache is rolled left by the oldest live row's first column (>= 1, since
every admitted request needs P + max_new <= C columns); when a joining prompt needs
t >= P, it is rolled right. Shapes never change: one compilation per prefill bucket,
one insert per P, one roll and one step per greedy / sampled mode.

Sampling is per row (temperature, top_k, top_p, seed): the key of a row's i-th token is
fold_in(key(seed), i), so a request's tokens do not depend on its neighbours.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from lov_jax.inference.engine import Generator, PromptInputs
from lov_jax.inference.sampling import sample_logits
from lov_jax.models.kv_cache import KVCache


@dataclasses.dataclass(frozen=True)
class Knobs:
    """One request's sampling: temperature 0 = greedy; top_k 0 / top_p 1 = off."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0


def sample_rows(logits, seeds, counts, temperature, top_k, top_p, *, greedy: bool):
    """int32[B] from float32[B, V] with per-row knobs (each [B]) and per-row keys."""
    if greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def one(row, seed, count, temp, k, p):
        key = jax.random.fold_in(jax.random.key(seed), count)
        knobs = {"temperature": temp, "top_k": k, "top_p": p}
        return sample_logits(row[None], key, greedy=False, **knobs)[0]

    sampled = jax.vmap(one)(logits, seeds, counts, temperature, top_k, top_p)
    return jnp.where(temperature > 0, sampled, jnp.argmax(logits, axis=-1).astype(jnp.int32))


class SlotDecoder:
    """`slots` rows decoding together over `cache_len` columns (module docstring).

    Host protocol (the scheduler's, and what every process of a pod replays):
    `join(row, prompt, max_new, knobs) -> first token`, `step() -> int32[B] next tokens`
    (rows that are not live produce ignored tokens), `release(row)`.
    """

    def __init__(self, generator: Generator, *, slots: int, cache_len: int):
        self.gen, self.cfg = generator, generator.cfg
        if slots < 1 or cache_len < 2:
            raise ValueError(f"need slots >= 1 and cache_len >= 2, got {slots}, {cache_len}")
        if slots % generator.batch_multiple:
            raise ValueError(f"slots={slots} must be a multiple of {generator.batch_multiple}")
        self.slots, self.cache_len = slots, cache_len
        t = self.cfg.text
        shape = (t.num_layers, slots, cache_len, t.num_kv_heads, t.head_dim)
        if generator.mesh is None:
            self.k = jnp.zeros(shape, jnp.dtype(self.cfg.dtype))
        else:
            kv, _ = generator.abstract_cache(slots, cache_len)
            self.k = jax.jit(lambda: jnp.zeros(shape, kv.dtype), out_shardings=kv.sharding)()
        self.v = jnp.zeros_like(self.k)
        self.seg = np.zeros((slots, cache_len), np.int32)  # host copy of the labels
        self.t = 0
        self.rolls = {"left": 0, "right": 0}  # cache moves so far (a figure; tests read it)
        self.live = np.zeros(slots, bool)
        self.start = np.zeros(slots, np.int32)  # first column of each live row's prompt
        self.tok = np.zeros(slots, np.int32)  # the token each row feeds next
        self.pos = np.zeros(slots, np.int32)  # its RoPE position
        self.count = np.zeros(slots, np.int32)  # tokens sampled so far (the key index)
        self.knobs = {
            "seeds": np.zeros(slots, np.uint32),
            "temperature": np.zeros(slots, np.float32),
            "top_k": np.zeros(slots, np.int32),
            "top_p": np.ones(slots, np.float32),
        }
        # On a mesh, sampled tokens come back replicated (every process reads them) and
        # the cache keeps its sharding.
        rep = kv = None
        if generator.mesh is not None:
            rep = NamedSharding(generator.mesh, PartitionSpec())
            kv = self.k.sharding
        self._sample = jax.jit(sample_rows, static_argnames=("greedy",), out_shardings=rep)
        self._step = jax.jit(self._step_impl, static_argnames=("greedy",), donate_argnums=(1, 2),
                             out_shardings=None if rep is None else (rep, kv, kv))  # fmt: skip
        cache = None if kv is None else (kv, kv)
        self._insert = jax.jit(self._insert_impl, donate_argnums=(0, 1), out_shardings=cache)
        self._roll = jax.jit(self._roll_impl, donate_argnums=(0, 1), out_shardings=cache)

    # ---- device functions ------------------------------------------------------------

    def _step_impl(self, params, k, v, seg, t, tok, pos, knobs, counts, *, greedy: bool):
        ones = jnp.ones((tok.shape[0], 1), jnp.int32)  # decode queries carry segment 1
        cache = KVCache(k, v, seg, t)
        logits, cache = self.gen.model.apply(
            {"params": params}, tok[:, None], pos[:, None], ones, cache=cache
        )
        new = sample_rows(logits[:, 0], knobs["seeds"], counts, knobs["temperature"],
                          knobs["top_k"], knobs["top_p"], greedy=greedy)  # fmt: skip
        return new, cache.k, cache.v

    @staticmethod
    def _insert_impl(k, v, new_k, new_v, row, start):
        # new_k/new_v: dtype[L, 1, P, K, Dh], the prompt's cache from its own prefill.
        at = (0, row, start, 0, 0)
        update = jax.lax.dynamic_update_slice
        return update(k, new_k.astype(k.dtype), at), update(v, new_v.astype(v.dtype), at)

    @staticmethod
    def _roll_impl(k, v, shift):
        # Columns move left by `shift` (right when negative); the labels are redone on host.
        return jnp.roll(k, -shift, axis=2), jnp.roll(v, -shift, axis=2)

    # ---- host protocol ---------------------------------------------------------------

    def _scalar(self, x: int):
        return self.gen.put(np.int32(x), replicated=True)

    def capacity_error(self, prompt: PromptInputs, max_new: int) -> str | None:
        """Why this prompt cannot be admitted (None: it can)."""
        n, crops = len(prompt.tokens), len(prompt.crops)
        context = self.gen.cfg.text.max_position_embeddings
        if n + max_new > context:
            return (
                f"the prompt takes {n} tokens and max_tokens is {max_new}: together they "
                f"exceed the model's context of {context} tokens (text.max_position_embeddings)"
            )
        try:
            p = self.gen.shapes_for([prompt], 1)[1]
        except ValueError as e:
            return (
                f"the prompt takes {n} tokens and {crops} crops, more than the context holds: {e}"
            )
        if p + max_new > self.cache_len:
            return (
                f"the prompt takes {n} tokens (bucket {p}) and max_tokens is {max_new}: "
                f"together they exceed the context of {self.cache_len} tokens"
            )
        return None

    def _relabel(self, shift: int) -> None:
        if shift:
            self.rolls["left" if shift > 0 else "right"] += 1
        with self.gen.context():
            self.k, self.v = self._roll(self.k, self.v, self._scalar(shift))
        self.seg = np.roll(self.seg, -shift, axis=1)
        self.start -= shift
        self.t -= shift
        cols = np.arange(self.cache_len)
        self.seg[:, cols >= self.t] = 1
        if shift < 0:
            self.seg[:, cols < -shift] = 0

    def join(self, row: int, prompt: PromptInputs, max_new: int, knobs: Knobs) -> int:
        """Prefill `prompt` into `row` (free); returns its first token."""
        if self.live[row]:
            raise ValueError(f"slot {row} is busy")
        if err := self.capacity_error(prompt, max_new):
            raise ValueError(err)
        b, p, n, _ = self.gen.shapes_for([prompt], 1)  # b: the mesh's batch multiple
        logits, (pk, pv), host = self.gen.prefill([prompt], shapes=(b, p, n))
        if not self.live.any():
            self.t = p  # nothing to keep
        elif self.t < p:
            self._relabel(self.t - p)
        start = self.t - p
        with self.gen.context():
            self.k, self.v = self._insert(
                self.k, self.v, pk[:, :1], pv[:, :1], self._scalar(row), self._scalar(start)
            )
        self.seg[row] = 0
        self.seg[row, start : self.t] = host["mask"][0]
        self.seg[row, self.t :] = 1
        self.start[row] = start
        self.knobs["seeds"][row] = np.uint32(knobs.seed & 0xFFFFFFFF)
        self.knobs["temperature"][row] = knobs.temperature
        self.knobs["top_k"][row] = knobs.top_k
        self.knobs["top_p"][row] = knobs.top_p
        one = {name: a[row : row + 1] for name, a in self.knobs.items()}
        one = self.gen.put((one, np.zeros(1, np.int32)), replicated=True)
        with self.gen.context():
            first = self._sample(
                logits[:1], one[0]["seeds"], one[1], one[0]["temperature"], one[0]["top_k"],
                one[0]["top_p"], greedy=knobs.temperature <= 0,
            )  # fmt: skip
        self.live[row] = True
        self.tok[row] = int(first[0])
        self.pos[row] = int(host["mask"][0].sum())
        self.count[row] = 1
        return int(first[0])

    def step(self) -> np.ndarray:
        """One token for every row (int32[B]); only live rows' tokens mean anything."""
        if self.t >= self.cache_len:
            self._relabel(int(self.start[self.live].min()) if self.live.any() else self.t)
        greedy = bool((self.knobs["temperature"][self.live] <= 0).all())
        rows = self.gen.put((self.seg, self.tok, self.pos, self.knobs, self.count))
        with self.gen.context():
            new, self.k, self.v = self._step(
                self.gen.params, self.k, self.v, rows[0], self._scalar(self.t), *rows[1:],
                greedy=greedy,
            )  # fmt: skip
        new = np.asarray(new)
        self.t += 1
        self.tok = np.where(self.live, new, 0).astype(np.int32)
        self.pos = np.where(self.live, self.pos + 1, 0).astype(np.int32)
        self.count += 1
        return new

    def warmup(self, lengths, crops=(0,)) -> int:
        """Compile every (prompt bucket, crop bucket) prefill and insert, both step modes
        and the roll, on dummy prompts; returns how many prefill shapes were compiled.
        Afterwards nothing is live."""
        s = self.cfg.vision.image_size
        done = 0
        for p in lengths:
            for n in crops:
                prompt = PromptInputs(
                    np.full(p, self.gen.pad_id, np.int32), np.zeros((n, s, s, 3), np.uint8), []
                )
                if self.capacity_error(prompt, 1) is None:
                    self.join(0, prompt, 1, Knobs())
                    self.release(0)
                    done += 1
        small = PromptInputs(np.full(min(lengths), self.gen.pad_id, np.int32), np.zeros(
            (0, s, s, 3), np.uint8), [])  # fmt: skip
        for temperature in (0.0, 1.0):
            self.join(0, small, 1, Knobs(temperature=temperature))
            self.step()
            self.release(0)
        self._relabel(0)
        return done

    def release(self, row: int) -> None:
        self.live[row] = False
        self.seg[row] = 0

    def idle(self) -> None:
        """Nothing to do for a while (a pod's decoder sends a keep-alive)."""

    def close(self) -> None:
        """No more calls (a pod's decoder releases the other processes)."""
