"""tests/post's shared stage-2 policy: a few configs/demo.py stage2_ov steps from the
preset's initialisation on a small shapes set (built once for the session)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def demo(tmp_path_factory):
    from configs import demo as recipe
    from data_pipelines.synthetic import make_shapes_dataset
    from lov_jax.train.run import train_from_config

    out = tmp_path_factory.mktemp("post_demo")
    data = out / "data"
    make_shapes_dataset(data, 60, 10, seed=3)
    c = recipe.stage_config("stage2_ov", out, data, steps=4, seed=3)
    c.init_from = ""  # the preset's initialisation (the test's stand-in for 2-SI)
    train_from_config(c, out / "stage2", progress=False)
    return {"out": out, "data": data, "stage2": out / "stage2"}
