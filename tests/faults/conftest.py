"""tests/faults' shared tiny training run: JAX's compile cache for the session (and the
subprocesses that kill runs) and one uninterrupted 4-step run to compare against."""

from __future__ import annotations

import jax
import numpy as np
import pytest

BASE_STEPS = 4


@pytest.fixture(scope="session")
def fault_cache(tmp_path_factory):
    """The persistent compile cache dir (lov_jax/testing/train_runs.py), active meanwhile."""
    from lov_jax.testing import train_runs

    path = tmp_path_factory.getbasetemp() / "jax_cache"
    with train_runs.compile_cache(path):
        yield path


@pytest.fixture(scope="session")
def fault_base(fault_cache, tmp_path_factory):
    """An uninterrupted 4-step run saved at steps 2 and 4: workdir, losses, host state."""
    from lov_jax.testing.batches import SyntheticBatches
    from lov_jax.testing.train_runs import MICRO, init_params, stage_config
    from lov_jax.train.loop import run_training

    work = tmp_path_factory.mktemp("fault_base") / "w"
    result = run_training(stage_config(), MICRO, work, SyntheticBatches(), init_params,
                          BASE_STEPS, progress=False)  # fmt: skip
    host = jax.tree.map(np.asarray, result.state)
    return {"work": work, "losses": result.losses, "params": host.params, "opt": host.opt_state}
