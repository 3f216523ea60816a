"""Serving on a pod: process 0 serves HTTP, every process runs the same batches.

The model is sharded over all processes' devices (one global mesh), so every process
must make the same jitted calls with the same host inputs. Process 0's scheduler talks
to a `PodDecoder`, which broadcasts each call (join with its prompt, step, release,
close) before running it; the other processes `follow`: receive, run, repeat. A call is
a fixed int64[4] header, (op, row, payload bytes, 0) (op IDLE: a keep-alive while
process 0 waits for requests), then for a join its (prompt, max_new, knobs) as uint8
(`encode_join`: a JSON header and an .npz of the arrays, loaded with allow_pickle=False;
no pickle), padded to a power of two so the broadcast compiles once per size class
(`jax.experimental.multihost_utils.broadcast_one_to_all`).
"""

from __future__ import annotations

import dataclasses
import io
import json

import jax
import numpy as np
from jax.experimental import multihost_utils

from lov_jax.inference.engine import PromptInputs
from lov_jax.inference.slots import Knobs, SlotDecoder
from lov_jax.visual_layout import VisualItem

JOIN, STEP, RELEASE, CLOSE, IDLE = 1, 2, 3, 4, 5


def is_pod() -> bool:
    return jax.process_count() > 1


def _plain(v):
    return list(v) if isinstance(v, tuple) else v


def encode_join(prompt: PromptInputs, max_new: int, knobs: Knobs) -> bytes:
    """A join's arguments as bytes: u64 JSON length | JSON (max_new, knobs, items) | npz."""
    meta = {
        "max_new": int(max_new),
        "knobs": dataclasses.asdict(knobs),
        "items": [{f.name: _plain(getattr(i, f.name)) for f in dataclasses.fields(i)}
                  for i in prompt.items],
    }  # fmt: skip
    head = json.dumps(meta).encode()
    arrays = io.BytesIO()
    np.savez(arrays, tokens=np.asarray(prompt.tokens), crops=np.asarray(prompt.crops))
    return len(head).to_bytes(8, "little") + head + arrays.getvalue()


def decode_join(payload: bytes) -> tuple[PromptInputs, int, Knobs]:
    """Inverse of `encode_join`."""
    n = int.from_bytes(payload[:8], "little")
    meta = json.loads(payload[8 : 8 + n])
    with np.load(io.BytesIO(payload[8 + n :]), allow_pickle=False) as z:
        tokens, crops = z["tokens"], z["crops"]
    items = [VisualItem(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})
             for d in meta["items"]]  # fmt: skip
    return PromptInputs(tokens, crops, items), int(meta["max_new"]), Knobs(**meta["knobs"])


def _broadcast(header: np.ndarray, payload: bytes | None = None):
    header = np.asarray(multihost_utils.broadcast_one_to_all(header))
    if header[0] != JOIN:
        return header, None
    size = int(header[2])
    buf = np.zeros(max(64, 1 << (size - 1).bit_length()), np.uint8)
    if payload is not None:
        buf[:size] = np.frombuffer(payload, np.uint8)
    buf = np.asarray(multihost_utils.broadcast_one_to_all(buf))
    return header, buf[:size].tobytes()


class PodDecoder:
    """Process 0's view of the decoder: each call is broadcast, then run here too."""

    def __init__(self, decoder: SlotDecoder):
        self.decoder = decoder
        self.slots, self.cache_len, self.gen = decoder.slots, decoder.cache_len, decoder.gen

    def capacity_error(self, prompt, max_new: int):
        return self.decoder.capacity_error(prompt, max_new)

    def join(self, row: int, prompt, max_new: int, knobs: Knobs) -> int:
        payload = encode_join(prompt, max_new, knobs)
        _broadcast(np.array([JOIN, row, len(payload), 0], np.int64), payload)
        return self.decoder.join(row, prompt, max_new, knobs)

    def step(self) -> np.ndarray:
        _broadcast(np.array([STEP, 0, 0, 0], np.int64))
        return self.decoder.step()

    def release(self, row: int) -> None:
        _broadcast(np.array([RELEASE, row, 0, 0], np.int64))
        self.decoder.release(row)

    def idle(self) -> None:
        _broadcast(np.array([IDLE, 0, 0, 0], np.int64))

    def close(self) -> None:
        _broadcast(np.array([CLOSE, 0, 0, 0], np.int64))


def follow(decoder: SlotDecoder) -> int:
    """Processes other than 0: replay process 0's calls until it closes; returns the
    number of decode steps run."""
    steps = 0
    while True:
        header, payload = _broadcast(np.zeros(4, np.int64))
        op, row = int(header[0]), int(header[1])
        if op == JOIN:
            prompt, max_new, knobs = decode_join(payload)
            decoder.join(row, prompt, max_new, knobs)
        elif op == STEP:
            decoder.step()
            steps += 1
        elif op == RELEASE:
            decoder.release(row)
        elif op == CLOSE:
            return steps
        elif op == IDLE:
            continue
        else:
            raise RuntimeError(f"unknown pod call {op}")
