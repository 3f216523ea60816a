"""`lov-jax serve`: an OpenAI-compatible server with continuous batching and a chat page.

    app.py        HTTP, the chat completions schema, media decoding, errors
    scheduler.py  the batching loop over `lov_jax.inference.slots.SlotDecoder`
    page.html     the chat page served at /

`start(...)` builds the whole stack on a background thread (tests, benchmarks); the
command (lov_jax/serve/commands.py) serves in the foreground.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from lov_jax.config import ModelConfig
from lov_jax.inference.engine import Generator
from lov_jax.inference.prompting import Prompter
from lov_jax.inference.slots import SlotDecoder
from lov_jax.serve.app import ServeConfig, Service, make_server, serve_in_thread
from lov_jax.serve.scheduler import Scheduler


@dataclasses.dataclass(frozen=True)
class Batching:
    """Static shapes of the batcher: `slots` rows over `context` cache columns; prompts
    are padded to `length_buckets`, crops to `crop_buckets` (None: powers of two)."""

    slots: int = 8
    context: int = 4096
    length_buckets: Sequence[int] | None = None
    crop_buckets: Sequence[int] | None = None
    max_queue: int = 64

    def __post_init__(self):
        if self.slots < 1 or self.context < 2 or self.max_queue < 0:
            raise ValueError(f"Batching needs slots >= 1, context >= 2, max_queue >= 0: {self}")


@dataclasses.dataclass
class Running:
    """A started server: its base URL (with /v1) and the parts, for tests and benchmarks."""

    url: str
    service: Service
    http: object

    @property
    def scheduler(self) -> Scheduler:
        return self.service.scheduler

    def close(self) -> None:
        self.http.shutdown()
        self.http.server_close()
        self.scheduler.close()


def build_decoder(
    params, cfg: ModelConfig, batching: Batching = Batching(), *, mesh=None,
    warmup: Sequence[int] | None = (),
) -> SlotDecoder:  # fmt: skip
    """Generator -> SlotDecoder, compiled for every length bucket x (0, *warmup) crop
    buckets (warmup None: compile on demand)."""
    gen = Generator(
        params, cfg, mesh=mesh, length_buckets=batching.length_buckets,
        crop_buckets=batching.crop_buckets,
    )  # fmt: skip
    decoder = SlotDecoder(gen, slots=batching.slots, cache_len=batching.context)
    if warmup is not None and batching.length_buckets:
        decoder.warmup(batching.length_buckets, (0, *warmup))
    return decoder


def build_service(
    params, cfg: ModelConfig, prompter: Prompter, config: ServeConfig | None = None,
    batching: Batching = Batching(), *, mesh=None, warmup: Sequence[int] | None = (),
    decoder=None,
) -> Service:  # fmt: skip
    """SlotDecoder (`build_decoder`, or `decoder`: e.g. a pod's `PodDecoder`) ->
    Scheduler (started) -> Service."""
    config = config or ServeConfig()
    if decoder is None:
        decoder = build_decoder(params, cfg, batching, mesh=mesh, warmup=warmup)
    scheduler = Scheduler(decoder, prompter.tokenizer, cfg.ids.eos, max_queue=batching.max_queue)
    return Service(scheduler.start(), prompter, cfg, config)


def start(params, cfg, prompter, config=None, batching=Batching(), **kw) -> Running:
    """`build_service` + HTTP on a background thread (config default: any free port)."""
    config = config or ServeConfig(port=0)
    service = build_service(params, cfg, prompter, config, batching, **kw)
    http, url = serve_in_thread(service)
    return Running(url, service, http)


__all__ = ["Batching", "Running", "ServeConfig", "Service", "build_decoder", "build_service",
           "make_server", "start"]  # fmt: skip
