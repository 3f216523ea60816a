"""Loader worker processes die with the process that started them.

Grain starts its `mp_prefetch` workers with multiprocessing "spawn" as daemons: they
are terminated when the trainer exits normally, but a trainer killed by SIGKILL (OOM
killer, preemption, `kill -9`) leaves them running, decoding into a queue nobody reads.
`die_with_parent` (the `worker_init_fn`) starts a thread in each worker that exits the
worker within `POLL_S` of its parent's death (the worker is then re-parented, so
`os.getppid()` changes). A thread rather than PR_SET_PDEATHSIG: that signal fires when
the *thread* that forked the worker exits, which in Grain is not the main thread.
"""

from __future__ import annotations

import os
import threading
import time

POLL_S = 0.5


def die_with_parent(worker_index: int = 0, worker_count: int = 1) -> None:
    """Grain `worker_init_fn(worker_index, worker_count)`: exit when the parent dies."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(POLL_S)
        os._exit(1)  # no cleanup to run: the work belongs to a dead trainer

    threading.Thread(target=watch, name="lov-jax-parent-watch", daemon=True).start()
