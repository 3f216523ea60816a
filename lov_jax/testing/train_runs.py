"""Tiny training runs for fault tests: a one-layer model, a stage config, a compile cache.

`MICRO` is the `demo` geometry (112px crops, 8x8 patches, what `SyntheticBatches`
emits) with one layer per tower and a 1024-token vocabulary, so a step compiles and runs
in a few seconds on CPU. `compile_cache(dir)` points JAX's persistent compilation cache
at `dir` (and `env_for_cache(dir)` hands it to a subprocess): every run of the same step
after the first loads the executable instead of compiling it again.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from pathlib import Path

import jax

from lov_jax import config
from lov_jax.token_ids import TokenIds

_DEMO = config.demo(token_ids=TokenIds(pad=0, eos=(1,), image=2))
MICRO = _DEMO.replace(
    text=dataclasses.replace(_DEMO.text, vocab_size=1024, num_layers=1),
    vision=dataclasses.replace(_DEMO.vision, num_layers=1),
)


def stage_config(ckpt_every: int = 2, trainable=("vision", "projector", "llm")):
    """stage2_ov's demo config on a 1-device mesh, every `ckpt_every` steps saved."""
    from configs import stage2_ov

    c = stage2_ov.get_config("demo")
    c.mesh.num_devices = 1
    c.train.ckpt_every = ckpt_every
    c.train.loss_chunk = 32
    c.optim.trainable = tuple(trainable)
    return c


def init_params():
    from lov_jax.models.llava_onevision import init_params as init

    return init(MICRO, jax.random.key(0))


@contextlib.contextmanager
def compile_cache(directory: str | Path):
    """JAX's persistent compilation cache in `directory` while the block runs."""
    from jax._src import compilation_cache

    keys = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
            "jax_persistent_cache_min_entry_size_bytes")  # fmt: skip
    before = {k: getattr(jax.config, k) for k in keys}
    for k, v in zip(keys, (str(directory), 0.0, 0), strict=True):
        jax.config.update(k, v)
    compilation_cache.reset_cache()
    try:
        yield
    finally:
        for k, v in before.items():
            jax.config.update(k, v)
        compilation_cache.reset_cache()


def env_for_cache(directory: str | Path) -> dict:
    """os.environ for a subprocess that shares the cache (and the 8 CPU devices)."""
    return {
        **os.environ,
        "JAX_COMPILATION_CACHE_DIR": str(directory),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
        "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
        "JAX_PLATFORMS": "cpu",
        "JAX_DEFAULT_MATMUL_PRECISION": "highest",  # as tests/conftest.py
    }
