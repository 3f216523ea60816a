"""Optimizer-state and parameter memory with and without LoRA, from abstract shapes.

    .venv/bin/python benchmarks/lora_memory.py [--preset ov_0_5b] [--r 128]

Full fine-tuning trains projector + LLM (LLaVA's finetune.sh); LoRA trains the adapters
(LLaVA's finetune_lora.sh defaults: the LLM's attention + MLP projections) + the
projector. AdamW keeps mu and nu (fp32) per trained param. Nothing is allocated.
"""

from __future__ import annotations

import argparse

import jax
import numpy as np
from ml_collections import ConfigDict

from configs.common import base_config
from lov_jax import config, sharding
from lov_jax.lora import adapters
from lov_jax.testing.tokenizers import qwen2_token_ids
from lov_jax.train.step import Trainer


def _bytes(tree) -> int:
    return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def figures(preset: str, r: int, base_dtype: str) -> dict[str, dict[str, float]]:
    cfg = config.preset(preset, token_ids=qwen2_token_ids())
    optim = ConfigDict(base_config("tiny").optim.to_dict())
    optim.trainable = ("projector", "llm")
    mesh = sharding.make_mesh(devices=jax.devices()[:1])
    out = {}
    lcfg = adapters.LoraConfig(r=r, alpha=2 * r, base_dtype=base_dtype)
    for name, lora in (("full", None), (f"lora r={r}", adapters.Lora(lcfg, cfg))):
        state = Trainer(cfg, optim, mesh, 100, 1024, lora=lora).abstract_state()
        trained = (
            sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.opt_state) if x.ndim) // 2
        )  # mu + nu
        out[name] = {
            "trained params (M)": trained / 1e6,
            "optimizer state (GB)": _bytes(state.opt_state) / 1e9,
            "params (GB)": _bytes(state.params) / 1e9,
        }
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="ov_0_5b")
    p.add_argument("--r", type=int, default=128)
    p.add_argument("--base-dtype", default="bfloat16", choices=adapters.BASE_DTYPES)
    args = p.parse_args()
    for name, row in figures(args.preset, args.r, args.base_dtype).items():
        cells = ", ".join(f"{k} {v:.3f}" for k, v in row.items())
        print(f"{args.preset} {name} (LoRA base {args.base_dtype}): {cells}")


if __name__ == "__main__":
    main()
