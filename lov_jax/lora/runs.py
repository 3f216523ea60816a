"""LoRA training runs <-> PEFT adapters / merged checkpoints, and their `lov-jax convert`
commands:

    lov-jax convert orbax-to-peft --ckpt RUN --out DIR            # PEFT adapter dir
    lov-jax convert orbax-to-peft --ckpt RUN --out DIR --merge    # full HF dir, W + s A B
    lov-jax convert peft-to-orbax --base CKPT --adapter DIR --out DIR   # merged Orbax

A LoRA run's checkpoints hold only the trained leaves (adapters + fully trained modules,
`Trainer.checkpoint_view`) with the stage config; the base is the stage's `init_from`
(or `--base`). The merged outputs are ordinary checkpoints: generate / eval / serve /
orbax-to-hf take them unchanged.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from flax import traverse_util

from lov_jax.convert import io_utils
from lov_jax.convert.hf_keys import CheckpointError
from lov_jax.lora import adapters, peft_io


def read_run(ckpt: str | Path, step: int | None = None):
    """(ModelConfig, Lora, trained params [nested numpy], stage dict) of a LoRA run step."""
    import orbax.checkpoint as ocp

    from lov_jax import architectures
    from lov_jax.convert import orbax_io
    from lov_jax.convert.hf_keys import target_shapes

    step_dir = orbax_io.readable_step_dir(ckpt, step)  # past corrupt steps, warned
    with ocp.Checkpointer(ocp.JsonCheckpointHandler()) as ckptr:
        stored = ckptr.restore(step_dir / orbax_io.CONFIG)
    stage = stored.get("stage") if isinstance(stored, dict) else None
    lcfg = adapters.from_config((stage or {}).get("lora"))
    if lcfg is None:
        raise CheckpointError(
            f"{step_dir}: not a LoRA run (its stage config has no enabled `lora` block); "
            "use `convert orbax-to-hf`"
        )
    # The stored config.json is exact (vocab, tying): its shapes stand in for the leaves
    # a LoRA checkpoint does not store.
    cfg0 = architectures.from_hf_config(stored["model"], source=str(step_dir))
    meta = {p: (s, np.dtype(np.float32)) for p, s in target_shapes(cfg0).items()}
    cfg = orbax_io.read_config(step_dir, meta)
    stored_meta = orbax_io.param_metadata(step_dir)
    trained = {p: orbax_io.restore_leaf(step_dir, p) for p in stored_meta}
    trained = traverse_util.unflatten_dict({tuple(p.split("/")): x for p, x in trained.items()})
    return cfg, adapters.Lora(lcfg, cfg), trained, stage, step_dir


def orbax_to_peft(
    ckpt: str | Path,
    out: str | Path,
    *,
    step: int | None = None,
    merge: bool = False,
    base: str | Path | None = None,
    dtype: str | None = None,
    overwrite: bool = False,
) -> io_utils.RunStats:
    """A LoRA run's step -> a PEFT adapter dir, or (`merge`) the merged full HF dir."""
    from lov_jax.convert import orbax_io

    ckpt, out = Path(ckpt).absolute(), Path(out).absolute()
    stats = io_utils.RunStats("orbax-to-peft")
    io_utils.raise_if(io_utils.output_problems(out, overwrite, [ckpt]), f"cannot export {ckpt}")
    cfg, lora, trained, stage, step_dir = read_run(ckpt, step)
    flat = traverse_util.flatten_dict(trained)
    others = {k: v for k, v in flat.items() if not adapters.is_adapter(k)}
    np_dtype = np.dtype(dtype or "float32")
    base_path = base or stage.get("init_from") or None
    with io_utils.atomic_output(out, overwrite) as tmp:
        if not merge:
            peft_io.export_adapter(
                trained, lora, tmp, trained=traverse_util.unflatten_dict(others),
                base_model_name_or_path=str(base_path or ""), dtype=np_dtype,
            )  # fmt: skip
            stats.tensors = len(flat)
        else:
            params = merged_params(cfg, lora, trained, base_path)
            stats.tensors = write_hf(tmp, cfg, params, np_dtype, orbax_io.find_assets(step_dir))
    return stats.finish()


def merged_params(cfg, lora: adapters.Lora, trained, base_path) -> dict:
    """Base params (HF dir or Orbax) with the trained leaves over them, adapters merged."""
    from lov_jax.convert.hf_keys import target_shapes
    from lov_jax.pretrained import load_pretrained

    if not base_path:
        raise CheckpointError("--merge needs the base: --base DIR (the run has no init_from)")
    base_cfg, base = load_pretrained(base_path)
    if target_shapes(base_cfg) != target_shapes(cfg):
        raise CheckpointError(f"--base {base_path}: its params differ from the run's model")
    flat = traverse_util.flatten_dict(base)
    flat.update(traverse_util.flatten_dict(trained))
    return lora.merge(traverse_util.unflatten_dict(flat))


def write_hf(out: Path, cfg, params, dtype: np.dtype, assets) -> int:
    from lov_jax.convert.export import write_hf_metadata
    from lov_jax.convert.hf_keys import params_to_hf
    from lov_jax.convert.safetensors_io import write_safetensors

    tensors = {k: v.astype(dtype) for k, v in params_to_hf(params, cfg).items()}
    out.mkdir(parents=True, exist_ok=True)
    write_safetensors(tensors, out)
    write_hf_metadata(out, cfg, dtype, assets)
    return len(tensors)


def peft_to_orbax(
    base: str | Path, adapter: str | Path, out: str | Path, *, overwrite: bool = False
) -> io_utils.RunStats:
    """A base checkpoint (HF dir or Orbax) + a PEFT adapter dir -> merged Orbax checkpoint."""
    from lov_jax.convert import orbax_io
    from lov_jax.pretrained import asset_dir, load_pretrained

    out = Path(out).absolute()
    stats = io_utils.RunStats("peft-to-orbax")
    io_utils.raise_if(io_utils.output_problems(out, overwrite, [Path(base)]), "cannot convert")
    cfg, params = load_pretrained(base)
    merged = peft_io.apply_adapter(params, adapter, cfg)
    with io_utils.atomic_output(out, overwrite) as tmp:
        orbax_io.save_checkpoint(tmp, merged, cfg, assets_from=asset_dir(base))
    stats.tensors = len(traverse_util.flatten_dict(merged))
    return stats.finish()


# ---- commands ------------------------------------------------------------------------


def _orbax_to_peft(args) -> int:
    from lov_jax.convert.commands import _report

    return _report(
        orbax_to_peft, args.ckpt, args.out, step=args.step, merge=args.merge, base=args.base,
        dtype=args.dtype, overwrite=args.overwrite,
    )  # fmt: skip


def _peft_to_orbax(args) -> int:
    from lov_jax.convert.commands import _report

    return _report(peft_to_orbax, args.base, args.adapter, args.out, overwrite=args.overwrite)


def add_commands(sub) -> None:
    """`convert orbax-to-peft` / `convert peft-to-orbax` on the convert subparsers."""
    a = sub.add_parser("orbax-to-peft", help="LoRA training run -> PEFT adapter dir (or --merge)")
    a.add_argument("--ckpt", required=True, help="LoRA training run dir or step dir")
    a.add_argument("--out", required=True, help="new adapter dir (or HF dir with --merge)")
    a.add_argument("--step", type=int, default=None, help="training step (default: latest)")
    a.add_argument("--merge", action="store_true", help="write the merged full HF checkpoint")
    a.add_argument("--base", default=None, help="base checkpoint (default: the run's init_from)")
    a.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None)
    a.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    a.set_defaults(func=_orbax_to_peft)

    b = sub.add_parser("peft-to-orbax", help="base + PEFT adapter dir -> merged Orbax checkpoint")
    b.add_argument("--base", required=True, help="base checkpoint (HF dir or Orbax)")
    b.add_argument("--adapter", required=True, help="PEFT adapter dir (adapter_config.json)")
    b.add_argument("--out", required=True, help="new Orbax checkpoint directory")
    b.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    b.set_defaults(func=_peft_to_orbax)
