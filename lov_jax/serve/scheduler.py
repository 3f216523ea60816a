"""The batching loop: a bounded queue of jobs feeding a `SlotDecoder`'s slots.

One thread owns the decoder. Each iteration it admits queued jobs into free slots (a
job joins the running batch between two decode steps), runs one step for all slots,
and hands every live job its token. A job ends on a stop id, a stop string, its
max_tokens, its deadline or its cancellation (a client that went away); its slot is
free for the next iteration. HTTP threads only enqueue and read their job's events.
"""

from __future__ import annotations

import collections
import dataclasses
import queue
import threading
import time
from collections.abc import Sequence

from lov_jax.inference.engine import PromptInputs
from lov_jax.inference.slots import Knobs, SlotDecoder

IDLE_S = 5.0  # an idle loop tells the decoder this often (a pod's keep-alive)


class QueueFull(RuntimeError):
    """The bounded queue holds `max_queue` waiting jobs already."""


@dataclasses.dataclass
class Job:
    """One completion (one `n` choice, `index`). Events on `events` (shared by a
    request's choices): (job, "text", delta) while decoding, then (job, "done",
    finish_reason) or (job, "error", message)."""

    prompt: PromptInputs
    max_new: int
    knobs: Knobs = Knobs()
    stop: Sequence[str] = ()
    deadline: float = float("inf")  # time.monotonic() seconds
    events: queue.Queue = dataclasses.field(default_factory=queue.Queue)
    index: int = 0
    tokens: list[int] = dataclasses.field(default_factory=list)
    text: str = ""  # decoded so far, cut at a stop string once one is found
    sent: int = 0  # characters of `text` already sent as deltas
    sampled: int = 0  # tokens sampled, a stop id included (usage.completion_tokens)
    cancelled: threading.Event = dataclasses.field(default_factory=threading.Event)
    first_token_s: float | None = None  # seconds from enqueue to the first token
    enqueued: float = 0.0

    def cancel(self) -> None:
        self.cancelled.set()


class Scheduler:
    """Runs `decoder` on a background thread (`start`/`close`).

    tokenizer: `tokenizers.Tokenizer` (text deltas skip special tokens); stop_ids: the
    checkpoint's eos ids; max_queue: waiting jobs beyond the slots (then `QueueFull`).
    """

    def __init__(
        self, decoder: SlotDecoder, tokenizer, stop_ids: Sequence[int], *, max_queue: int = 64
    ):
        self.decoder, self.tokenizer = decoder, tokenizer
        self.stop_ids = frozenset(int(i) for i in stop_ids)
        self.max_queue = max_queue
        self._pending: collections.deque[Job] = collections.deque()
        self._rows: dict[int, Job] = {}
        self._wake = threading.Condition()
        self._closed = False
        self._thread: threading.Thread | None = None
        self.steps = 0  # decode steps run (a figure for benchmarks and tests)
        self.max_live = 0  # the most jobs decoded together so far

    # ---- HTTP side -------------------------------------------------------------------

    def submit(self, job: Job) -> Job:
        with self._wake:
            if self._closed:
                raise RuntimeError("the scheduler is closed")
            if len(self._pending) >= self.max_queue:
                raise QueueFull(f"{len(self._pending)} requests are waiting (--max-queue)")
            job.enqueued = time.monotonic()
            self._pending.append(job)
            self._wake.notify()
        return job

    @property
    def load(self) -> dict:
        return {"live": len(self._rows), "waiting": len(self._pending),
                "slots": self.decoder.slots}  # fmt: skip

    # ---- loop ------------------------------------------------------------------------

    def start(self) -> Scheduler:
        self._thread = threading.Thread(target=self._loop, name="lov-jax-scheduler", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        with self._wake:
            self._closed = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join()
        for job in list(self._pending) + list(self._rows.values()):
            job.events.put((job, "error", "the server is shutting down"))

    def _loop(self) -> None:
        while True:
            with self._wake:
                while not self._closed and not self._pending and not self._rows:
                    if not self._wake.wait(timeout=IDLE_S):
                        self.decoder.idle()
                if self._closed:
                    self.decoder.close()
                    return
                joining = []
                free = [r for r in range(self.decoder.slots) if r not in self._rows]
                while free and self._pending:
                    job = self._pending.popleft()
                    if not self._expired(job):
                        joining.append((free.pop(0), job))
            for row, job in joining:
                try:
                    first = self.decoder.join(row, job.prompt, job.max_new, job.knobs)
                except Exception as e:  # noqa: BLE001 - the job fails, the server goes on
                    job.events.put((job, "error", f"prefill failed: {e}"))
                    continue
                job.first_token_s = time.monotonic() - job.enqueued
                self._rows[row] = job
                self._emit(row, job, first)
            for row, job in list(self._rows.items()):
                if self._expired(job):
                    self._finish(row)
            if not self._rows:
                continue
            self.max_live = max(self.max_live, len(self._rows))
            try:
                new = self.decoder.step()
            except Exception as e:  # noqa: BLE001 - fail the live jobs, keep serving
                for row, job in list(self._rows.items()):
                    job.events.put((job, "error", f"decode failed: {e}"))
                    self._finish(row)
                continue
            self.steps += 1
            for row, job in list(self._rows.items()):
                self._emit(row, job, int(new[row]))

    def _expired(self, job: Job) -> bool:
        if job.cancelled.is_set():
            return True
        if time.monotonic() > job.deadline:
            job.events.put((job, "error", "the request timed out (--request-timeout)"))
            return True
        return False

    def _finish(self, row: int, reason: str | None = None) -> None:
        job = self._rows.pop(row)
        self.decoder.release(row)
        if reason is not None:
            if job.sent < len(job.text):
                job.events.put((job, "text", job.text[job.sent :]))
            job.events.put((job, "done", reason))

    def _emit(self, row: int, job: Job, token: int) -> None:
        """Account one sampled token; finish the job when it ends."""
        job.sampled += 1
        if token in self.stop_ids:
            return self._finish(row, "stop")
        job.tokens.append(token)
        text = self.tokenizer.decode(job.tokens, skip_special_tokens=True)
        for s in job.stop:
            if (cut := text.find(s)) >= 0:
                job.text = text[:cut]
                return self._finish(row, "stop")
        job.text = text
        if len(job.tokens) >= job.max_new:
            return self._finish(row, "length")
        # Hold back what may still become a stop string or a multi-byte character.
        hold = max((len(s) - 1 for s in job.stop), default=0)
        ready = len(text) - hold
        while ready > job.sent and text[ready - 1] == "\ufffd":
            ready -= 1
        if ready > job.sent:
            job.events.put((job, "text", text[job.sent : ready]))
            job.sent = ready
