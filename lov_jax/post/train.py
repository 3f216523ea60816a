"""`lov-jax dpo`: a DPO config (configs/dpo.py) -> policy, frozen reference, pair loader,
then the step loop with checkpoints, metrics and exact resume.

The model, tokenizer and per-record processing are `lov-jax train`'s
(`lov_jax.train.run`); preference records go through the same sources, Grain loader and
packer as SFT records, each pair one two-part sample (`lov_jax.post.dpo`). The reference
is the `init_from` checkpoint, frozen (LLaVA-NeXT: a second copy of the SFT model). With
`dpo.reference = "precomputed"` a first pass writes `<workdir>/preferences_ref.jsonl`
(the records plus `ref_chosen_logps` / `ref_rejected_logps`, TRL's columns) and training
reads that file and holds no reference params. The workdir is a training run like
`lov-jax train`'s: `load_pretrained(workdir)`, `lov-jax generate --ckpt`, the next round's
`init_from`. With an enabled `lora` block (configs/lora.py's fields) the policy trains
through adapters (`DPOTrainer(lora=)`), the reference is the frozen base with the adapters
off, and checkpoints hold only the trained leaves, as a LoRA `lov-jax train` run's:
`lov-jax convert orbax-to-peft --ckpt WORKDIR [--merge]` exports them.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import time
from pathlib import Path

import jax
import numpy as np

from lov_jax import sharding
from lov_jax.post import dpo

REF_FILE = "preferences_ref.jsonl"


@dataclasses.dataclass
class DPOResult:
    final_step: int
    metrics: dict[int, dict]  # optimizer step -> metrics of this process's run
    resumed_from: int | None
    workdir: Path


def _loader_config(config, cfg, *, num_epochs, shuffle=True, batch_size=None):
    from data_pipelines import loader

    data = config.data
    return loader.LoaderConfig(
        batch_size=batch_size or data.rows_per_host, max_tokens=data.seq_len,
        max_crops=data.max_crops, seed=data.seed, shuffle=shuffle, num_epochs=num_epochs,
        num_workers=data.num_workers, on_error=data.skip_policy, pad_id=cfg.ids.pad,
    )  # fmt: skip


def _open(config, path: str, media_folders: bool = True):
    from data_pipelines import sources

    data = config.data
    folders = media_folders and (data.image_folder or data.video_folder)
    return sources.open_source(
        path, image_folder=(data.image_folder or None) if folders else None,
        video_folder=(data.video_folder or None) if folders else None, seed=data.seed,
    )  # fmt: skip


def pair_process(config, cfg, tokenizer, options: dpo.DPOOptions):
    """DPO record -> two-part Sample with `lov-jax train`'s record processing. For
    `completion="trl"` the chat mask is "assistant" (the answer and its end-of-turn), which
    `dpo.process_pair` extends to the end of each part; else `data.loss_mask` as set."""
    import copy

    from lov_jax.train.run import make_process_fn

    if options.completion == "trl":
        config = copy.deepcopy(config)
        config.data.loss_mask = "assistant"
    return functools.partial(dpo.process_pair, process=make_process_fn(config, cfg, tokenizer),
                             options=options)  # fmt: skip


def precompute_reference(config, cfg, tokenizer, trainer, ref_params, out: Path) -> Path:
    """One pass of the frozen reference over every record: writes `out` (jsonl) with
    `ref_chosen_logps` / `ref_rejected_logps` added (media paths resolved). Records the
    loader would skip are left out (and counted in the log)."""
    from data_pipelines import packing, sample, sources

    data = config.data
    recs = _open(config, data.train_path)
    options = dataclasses.replace(trainer.options, reference="step")
    process = pair_process(config, cfg, tokenizer, options)
    pack = packing.PackConfig(data.seq_len, data.max_crops, pad_id=cfg.ids.pad)
    rows = data.rows_per_host
    done, skipped = [], 0
    pending: list[tuple[dict, sample.Sample]] = []

    def flush():
        batch = packing.empty_rows(rows, pack, cfg)
        for b, (_, s) in enumerate(pending):
            packing.write_row(batch, b, [s], pack, cfg)
        host = {k: v[None] for k, v in batch.items()}  # A = 1
        dpo.check_row_budgets(host, options.max_pairs_per_row, trainer.loss_tokens)
        ref = jax.device_get(trainer.reference_logps(ref_params, global_batch(host, trainer)))
        for b, (rec, _) in enumerate(pending):
            clean = {k: v for k, v in rec.items() if k not in (sources.SOURCE_KEY,
                                                               sources.INDEX_KEY)}  # fmt: skip
            done.append({**clean, dpo.REF_FIELDS[0]: float(ref[0, b, 0, 0]),
                         dpo.REF_FIELDS[1]: float(ref[0, b, 0, 1])})  # fmt: skip
        pending.clear()

    for i in range(jax.process_index(), len(recs), jax.process_count()):
        rec = recs[i]
        try:
            pending.append((rec, process(rec)))
        except sample.BadSample as err:
            skipped += 1
            print(f"[dpo] precompute: skipping {err}")
            continue
        if len(pending) == rows:
            flush()
    if pending:
        flush()
    part = out.with_suffix(f".rank{jax.process_index()}.jsonl")
    part.write_text("".join(json.dumps(r) + "\n" for r in done))
    print(f"[dpo] reference logps of {len(done)} pairs -> {part} ({skipped} skipped)")
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("dpo_precompute")
    if jax.process_index() == 0:
        parts = sorted(out.parent.glob(out.stem + ".rank*.jsonl"))
        out.write_text("".join(p.read_text() for p in parts))
    return out


def global_batch(host: dict, trainer) -> dict:
    """Host-local [A, B_local, ...] arrays -> global jax.Arrays on the trainer's mesh."""
    return {k: jax.make_array_from_process_local_data(trainer.batch_sharding, v)
            for k, v in host.items()}  # fmt: skip


def estimate_steps(config, cfg, process, num_records: int) -> int:
    """Optimizer steps for `train.epochs` passes, from packing up to 256 pairs."""
    from data_pipelines import loader, sources

    recs = _open(config, config.data.train_path)
    probe = min(256, len(recs))
    subset = sources.SubsetSource(recs, np.arange(probe))
    lc = _loader_config(config, cfg, num_epochs=1, batch_size=1)
    rows = sum(1 for _ in loader.make_loader(subset, process, cfg, lc))
    per_row = probe / max(rows, 1)
    per_step = per_row * config.data.rows_per_host * jax.process_count() * config.optim.grad_accum
    return max(1, math.ceil(config.train.epochs * num_records / per_step))


def run_dpo(config, workdir: str | Path, progress: bool = True) -> DPOResult:
    """Train one DPO run of `config` in `workdir` (resuming if it has checkpoints)."""
    from data_pipelines import loader
    from data_pipelines.hf_processor import save_hf_processor_files
    from lov_jax.convert import orbax_io
    from lov_jax.lora import adapters
    from lov_jax.train import checkpoint, metrics
    from lov_jax.train.run import load_tokenizer_for, model_from_config
    from lov_jax.train.step import TrainState, stack_micro_batches

    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    options = dpo.DPOOptions.from_config(config.dpo)
    cfg, init = model_from_config(config)
    tokenizer = load_tokenizer_for(config)
    if cfg.token_ids is None:
        from data_pipelines.tokenizer import qwen2_token_ids

        cfg = cfg.replace(token_ids=qwen2_token_ids(tokenizer))
    if init is None:  # a preset: the seeded random init is policy and reference
        from lov_jax.models.llava_onevision import init_params

        init = jax.tree.map(np.asarray, init_params(cfg, jax.random.key(config.train.seed)))
    if jax.process_index() == 0:
        save_hf_processor_files(workdir / "assets", cfg, tokenizer)
    mesh = sharding.mesh_from_config(config.mesh)
    loss_tokens = config.train.get("loss_tokens_per_row", 0)
    process = pair_process(config, cfg, tokenizer, options)
    recs = _open(config, config.data.train_path)
    total = config.train.num_steps
    if total <= 0:
        total = estimate_steps(config, cfg, process, len(recs))
    lora = adapters.from_stage(config, cfg)
    trainer = dpo.DPOTrainer(cfg, config.optim, options, mesh, total, config.train.loss_chunk,
                             loss_tokens, lora=lora)  # fmt: skip
    manager = checkpoint.make_manager(workdir, keep=config.train.ckpt_keep,
                                      keep_period=config.train.ckpt_keep_period)  # fmt: skip
    restored = checkpoint.restore_latest(manager, trainer.checkpoint_view(trainer.abstract_state()))
    ref_params = None
    if options.reference == "step":
        ref_params = trainer.place_reference(init)
    else:
        ref_file = workdir / REF_FILE
        if not ref_file.exists():  # the base model (no adapters) over every record, once
            ref_step = dpo.DPOTrainer(cfg, config.optim, dataclasses.replace(options,
                                      reference="step"), mesh, total, config.train.loss_chunk,
                                      loss_tokens)  # fmt: skip
            whole = ref_step.place_reference(init)
            precompute_reference(config, cfg, tokenizer, ref_step, whole, ref_file)
            del whole
        recs = _open(config, str(ref_file), media_folders=False)
        # training holds no reference params
    it = loader.make_loader(recs, process, cfg, _loader_config(config, cfg, num_epochs=None))
    if restored is None:
        state, start, resumed_from = trainer.init_state(init), 0, None
    else:
        step, params, opt_state, data_state = restored
        if lora is not None:  # the checkpoint holds the trained leaves; the base is init's
            params = trainer.with_frozen(params, init)
        state = TrainState(step=jax.numpy.asarray(step, jax.numpy.int32), params=params,
                           opt_state=opt_state)  # fmt: skip
        state = jax.device_put(state, trainer.state_sharding)
        it.set_state(data_state)
        start, resumed_from = step, step
    del init
    run_config = {**orbax_io.config_json(cfg), "stage": config.to_dict()}
    writer = metrics.MetricWriter(workdir, enabled=jax.process_index() == 0)
    out: dict[int, dict] = {}
    step = start
    while step < total:
        host = stack_micro_batches([next(it) for _ in range(config.optim.grad_accum)])
        dpo.check_row_budgets(host, options.max_pairs_per_row, loss_tokens)
        if options.reference == "precomputed":
            host.setdefault(dpo.REF_KEY, np.zeros(host["tokens"].shape, np.float32))
        t0 = time.perf_counter()
        state, m = trainer.step(state, ref_params, global_batch(host, trainer))
        m = {k: float(v) for k, v in jax.device_get(m).items()}
        m["step_seconds"] = time.perf_counter() - t0
        if not m.pop("finite"):
            print(f"WARNING: non-finite DPO loss/grad at step {step}: skipped")
            continue
        step += 1
        out[step] = m
        writer.write(step, m)
        if progress and jax.process_index() == 0:
            print(f"[dpo] step {step}/{total} loss {m['loss']:.4f} "
                  f"acc {m['rewards/accuracies']:.3f} margin {m['rewards/margins']:.4f}",
                  flush=True)  # fmt: skip
        if step % config.train.ckpt_every == 0 or step == total:
            data_states = checkpoint.gather_data_states(it.get_state())
            checkpoint.save(manager, step, trainer.checkpoint_view(state), run_config,
                            data_states)  # fmt: skip
    manager.wait_until_finished()
    manager.close()
    writer.close()
    return DPOResult(step, out, resumed_from, workdir)
