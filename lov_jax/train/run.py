"""`lov-jax train`: stage config -> model, tokenizer, data loader, then the loop."""

from __future__ import annotations

import dataclasses
import functools
import math
from pathlib import Path

import jax
import numpy as np

from lov_jax import config as model_config
from lov_jax.config import ModelConfig
from lov_jax.train import resume
from lov_jax.train.loop import TrainResult, run_training


def model_from_config(config) -> tuple[ModelConfig, object]:
    """(ModelConfig, params or None): from `init_from` (HF or Orbax) or the preset."""
    overrides = {
        "dtype": config.model.dtype,
        "param_dtype": config.model.param_dtype,
        "remat_policy": config.model.remat_policy,
        "attention_impl": config.model.attention_impl,
    }
    if config.model.vision_aspect_ratio:  # "" keeps the preset's / checkpoint's
        overrides["vision_aspect_ratio"] = config.model.vision_aspect_ratio
    if config.init_from:
        from lov_jax.pretrained import load_pretrained

        cfg, params = load_pretrained(config.init_from, dtype=config.model.param_dtype)
        cfg = cfg.replace(**overrides)
    else:
        cfg, params = model_config.preset(config.model.preset, **overrides), None
    if newline := config.model.video_newline:  # "" keeps the preset's / checkpoint's
        try:
            cfg = cfg.replace(video=dataclasses.replace(cfg.video, newline=newline))
        except ValueError as err:
            raise ValueError(f"model.video_newline {newline!r}: {err}") from err
    return cfg, params


def load_tokenizer_for(config):
    """`init_from`'s own tokenizer, else (a preset) the offline Qwen2 tokenizer."""
    from data_pipelines.tokenizer import build_qwen2_tokenizer
    from lov_jax.pretrained import load_tokenizer

    return load_tokenizer(config.init_from) if config.init_from else build_qwen2_tokenizer()


def make_process_fn(config, cfg: ModelConfig, tokenizer):
    from data_pipelines import chat, media, records

    options = records.RecordOptions(
        chat=chat.ChatOptions(
            template=config.data.template,
            loss_mask=config.data.loss_mask,
            system_prompt=config.data.system_prompt or None,  # or chat.TEMPLATE_DEFAULT
        ),
        video=media.VideoOptions(
            frames_upbound=config.data.frames_upbound,
            force_sample=config.data.force_sample,
            add_time_instruction=config.data.add_time_instruction,
        ),
        max_tokens=config.data.seq_len,
        max_crops=config.data.max_crops,
    )
    records.check_row_budget(tokenizer, options)  # data.seq_len below the template's frame
    return functools.partial(records.process_record, cfg=cfg, tokenizer=tokenizer, options=options)


# LoaderConfig field -> the config.data field it comes from (errors name the config's)
_DATA_FIELDS = {"batch_size": "rows_per_host", "max_tokens": "seq_len", "max_crops": "max_crops",
                "num_workers": "num_workers", "on_error": "skip_policy"}  # fmt: skip


def loader_config(data, **kw):
    """config.data (+ overrides) -> LoaderConfig; a bad value names its `data.*` field."""
    from data_pipelines import loader

    fields = {k: data[v] for k, v in _DATA_FIELDS.items()}
    try:
        return loader.LoaderConfig(**{**fields, "seed": data.seed, **kw})
    except ValueError as err:
        msg = str(err)
        for k, v in _DATA_FIELDS.items():
            msg = msg.replace(f"loader {k}=", f"data.{v}=")
        raise ValueError(msg) from None


def make_data(config, cfg: ModelConfig, tokenizer):
    """(records source, loader iterator) for config.data, repeating over epochs."""
    from data_pipelines import loader, sources

    data = config.data
    lc = loader_config(data, num_epochs=None, pad_id=cfg.ids.pad)
    process = make_process_fn(config, cfg, tokenizer)  # budgets checked before any read
    recs = sources.open_source(
        data.train_path, image_folder=data.image_folder or None,
        video_folder=data.video_folder or None, seed=data.seed, on_error=data.skip_policy,
    )  # fmt: skip
    it = loader.make_loader(recs, process, cfg, lc)
    return recs, it


def estimate_steps(config, cfg: ModelConfig, tokenizer, num_records: int) -> int:
    """Optimizer steps for `train.epochs` passes, from packing a sample of the data.

    Counts samples per packed row on up to 256 records (this process's share), so one
    "epoch" is approximate; pass train.num_steps for an exact count.
    """
    from data_pipelines import loader, sources

    data = config.data
    recs = sources.open_source(data.train_path, image_folder=data.image_folder or None,
                               video_folder=data.video_folder or None, seed=data.seed,
                               on_error=data.skip_policy)  # fmt: skip
    probe = min(256, len(recs))
    lc = loader_config(data, batch_size=1, num_epochs=1, num_workers=0, on_error="skip",
                       pad_id=cfg.ids.pad)  # fmt: skip
    subset = sources.SubsetSource(recs, np.arange(probe))
    it = loader.make_loader(subset, make_process_fn(config, cfg, tokenizer), cfg, lc)
    rows = sum(1 for _ in it)
    per_row = probe / max(rows, 1)
    per_step = per_row * data.rows_per_host * jax.process_count() * config.optim.grad_accum
    return max(1, math.ceil(config.train.epochs * num_records / per_step))


def train_from_config(config, workdir: str | Path, progress: bool = True) -> TrainResult:
    """Everything `lov-jax train` does, under the workdir lock (a second trainer on the
    same workdir refuses before loading anything)."""
    from lov_jax.train.loop import check_train_knobs, workdir_locked

    check_train_knobs(config)  # before the model, tokenizer and data are loaded
    with workdir_locked(workdir):
        return _train_from_config(config, Path(workdir), progress)


def _train_from_config(config, workdir: Path, progress: bool) -> TrainResult:
    from data_pipelines.hf_processor import save_hf_processor_files
    from lov_jax.train.optimizer import check_groups

    check_groups(config.optim)  # a typo in a group name, before anything is loaded
    workdir = Path(workdir)
    cfg, params = model_from_config(config)
    tokenizer = load_tokenizer_for(config)
    if cfg.token_ids is None:  # a preset: the ids are the tokenizer's (Qwen-2 ChatML)
        from data_pipelines.tokenizer import qwen2_token_ids

        cfg = cfg.replace(token_ids=qwen2_token_ids(tokenizer))
    if jax.process_index() == 0:  # tokenizer/processor files for `convert orbax-to-hf`
        save_hf_processor_files(workdir / "assets", cfg, tokenizer)
    recs, data_iter = make_data(config, cfg, tokenizer)
    total = config.train.num_steps
    if total <= 0:
        total = estimate_steps(config, cfg, tokenizer, len(recs))

    def init():
        if params is not None:
            return params
        from lov_jax.models.llava_onevision import init_params

        host = jax.tree.map(np.asarray, init_params(cfg, jax.random.key(config.train.seed)))
        return host

    fingerprint = resume.data_fingerprint(config.data.train_path, recs)
    return run_training(config, cfg, workdir, data_iter, init, total, progress=progress,
                        data_fingerprint=fingerprint)  # fmt: skip
