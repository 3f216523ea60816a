"""Conversion speed and memory on a random-weight checkpoint with real OV shapes.

    python benchmarks/convert.py [--preset ov_0_5b|ov_7b|llava15_7b|...] [--dtype float16|bfloat16]
                                 [--workdir DIR] [--keep]

Builds an HF checkpoint (llava-hf hub key layout, `--dtype`, 5 GB shards, config.json
from `ModelConfig.to_hf_config`) by streaming random tensors to disk, then runs, each
in a fresh subprocess so that peak RSS (`wait4` ru_maxrss) is per run:
  hf-to-orbax   `lov-jax convert hf-to-orbax` (dtype kept)
  orbax-to-hf   `lov-jax convert orbax-to-hf` from that Orbax checkpoint
  hf load+save  `<the preset's HF class>.from_pretrained(dir, dtype=...)` (Llava /
                LlavaNext / LlavaOnevision ...ForConditionalGeneration)
                + `save_pretrained` (the transformers baseline on the same files)
Wall time includes interpreter start and imports for every row. The input was
just written, so reads come from the page cache in every row alike. Dirty pages
are flushed (`sync`) before each row, so no row pays for an earlier row's writes;
the `+ sync s` column is the time of a `sync` right after the row: what is left to
make its output durable (our writers fsync through Orbax/TensorStore and
`os.fsync`; `save_pretrained` returns with its files still in the page cache).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from lov_jax.architectures import hf_class_name
from lov_jax.config import PRESETS, preset
from lov_jax.convert.export import ShardWriter
from lov_jax.convert.hf_keys import hf_entries, target_shapes, unused_fill
from lov_jax.convert.safetensors_io import read_safetensors
from lov_jax.token_ids import TokenIds

_HF_BASELINE = """
import sys, torch, transformers
dtype = getattr(torch, sys.argv[3])
m = getattr(transformers, sys.argv[4]).from_pretrained(sys.argv[1], dtype=dtype)
m.save_pretrained(sys.argv[2])
"""
# Random weights need ids only inside the table (config.json carries them; no tokenizer).
_IDS = TokenIds(pad=0, eos=(1,), image=2, video=3)
_PRESETS = sorted(p for p in PRESETS if not p.startswith(("tiny", "demo")))


def _cfg(preset_name: str):
    cfg = preset(preset_name)
    video = _IDS.video if cfg.architecture == "llava_onevision" else None
    return cfg.replace(token_ids=dataclasses.replace(_IDS, video=video))


def build_checkpoint(out: Path, preset_name: str, dtype: str, seed: int = 0) -> int:
    """Random HF checkpoint with the preset's exact shapes; returns its tensor bytes."""
    cfg = _cfg(preset_name)
    flat = target_shapes(cfg)
    np_dtype = np.dtype(dtype) if dtype != "bfloat16" else np.dtype("bfloat16")
    plan = []
    for name, path, layer, tf in hf_entries(cfg, "hf_legacy"):
        full = flat[path]
        plan.append((name, np_dtype, tf.hf_shape(full[1:] if layer is not None else full)))
    fill = unused_fill(cfg, "hf_legacy", np_dtype)  # CLIP's pooler norm, as exports write it
    plan += [(name, x.dtype, x.shape) for name, x in fill.items()]
    out.mkdir(parents=True)
    writer = ShardWriter(out, plan, "5GB")
    rng = np.random.default_rng(seed)
    total = 0
    for name, dt, shape in plan:
        x = fill.get(name)
        if x is None:
            x = (rng.standard_normal(shape, np.float32) * 0.02).astype(dt)
        writer.write(name, x)
        total += x.nbytes
    writer.close_file()
    writer.write_index()
    hf = {**cfg.to_hf_config(), "dtype": dtype}
    (out / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
    return total


def run(cmd: list[str]) -> tuple[float, float, int, str]:
    """(wall s, sync s after it, peak RSS bytes, stdout) of one fresh subprocess."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "TRANSFORMERS_VERBOSITY": "error"}
    os.sync()
    t0 = time.perf_counter()
    with tempfile.TemporaryFile() as so, tempfile.TemporaryFile() as se:
        proc = subprocess.Popen(cmd, stdout=so, stderr=se, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        so.seek(0)
        se.seek(0)
        out, err = so.read().decode(), se.read().decode()
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{err[-3000:]}")
    t1 = time.perf_counter()
    os.sync()
    return wall, time.perf_counter() - t1, usage.ru_maxrss * 1024, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--preset", default="ov_0_5b", choices=_PRESETS + ["tiny_llava_next"])
    ap.add_argument("--dtype", default="float16", choices=["float16", "bfloat16"])
    ap.add_argument("--workdir", default=None, help="default: a temp dir under /tmp")
    ap.add_argument("--keep", action="store_true", help="keep the written checkpoints")
    ap.add_argument("--skip-hf", action="store_true", help="skip the transformers baseline")
    ap.add_argument("--reuse-src", action="store_true", help="reuse WORKDIR/hf_src of a --keep run")
    args = ap.parse_args()

    work = Path(args.workdir or tempfile.mkdtemp(prefix="lov_convert_bench_"))
    work.mkdir(parents=True, exist_ok=True)
    src, ob, back, hf_out = (work / n for n in ("hf_src", "orbax", "hf_back", "hf_resaved"))
    reuse = args.reuse_src and (src / "config.json").is_file()
    for p in (ob, back, hf_out) if reuse else (src, ob, back, hf_out):
        shutil.rmtree(p, ignore_errors=True)
    try:
        t0 = time.perf_counter()
        if reuse:
            size = sum(x.nbytes for x in read_safetensors(src).values())
        else:
            size = build_checkpoint(src, args.preset, args.dtype)
        print(f"{'reused' if reuse else 'built'} {args.preset} {args.dtype}: {size / 1e9:.2f} GB "
              f"in {time.perf_counter() - t0:.0f} s at {src}", flush=True)  # fmt: skip

        cli = [sys.executable, "-m", "lov_jax.cli", "convert"]
        rows = []
        wall, syn, rss, out = run([*cli, "hf-to-orbax", "--hf", str(src), "--out", str(ob),
                                   "--no-progress"])  # fmt: skip
        rows.append(("hf-to-orbax", wall, syn, rss, out.strip()))
        wall, syn, rss, out = run([*cli, "orbax-to-hf", "--ckpt", str(ob), "--out", str(back),
                                   "--no-progress"])  # fmt: skip
        rows.append(("orbax-to-hf", wall, syn, rss, out.strip()))
        if not args.skip_hf:
            torch_dtype = {"float16": "float16", "bfloat16": "bfloat16"}[args.dtype]
            hf_class = hf_class_name(_cfg(args.preset).architecture)
            wall, syn, rss, _ = run([sys.executable, "-c", _HF_BASELINE, str(src), str(hf_out),
                                     torch_dtype, hf_class])  # fmt: skip
            rows.append(("hf load+save", wall, syn, rss, ""))

        gb = size / 1e9
        print(f"\n{args.preset} {args.dtype}, checkpoint {gb:.2f} GB, {os.cpu_count()} CPUs")
        print(f"| {'run':<13} | wall s | + sync s | GB/s | peak RSS GB | RSS / ckpt |")
        print(f"| {'-' * 13} | -----: | -------: | ---: | ----------: | ---------: |")
        for name, wall, syn, rss, _ in rows:
            print(f"| {name:<13} | {wall:6.1f} | {syn:8.1f} | {gb / wall:4.2f} | "
                  f"{rss / 1e9:11.2f} | {rss / size:10.2f} |")  # fmt: skip
        for name, *_, line in rows:
            if line:
                print(f"  {name} summary: {line.splitlines()[-1]}")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
