"""What both conversion directions share: atomic output dirs, asset files, run summary."""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import os
import resource
import secrets
import shutil
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from lov_jax.convert.hf_keys import CheckpointError

# Tokenizer / processor / chat-template / generation files copied verbatim, whichever exist.
ASSET_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "preprocessor_config.json",
    "processor_config.json",
    "video_preprocessor_config.json",
    "chat_template.json",
    "chat_template.jinja",
    "generation_config.json",
)


def copy_assets(src: Path | None, dst: Path) -> list[str]:
    """Copy the ASSET_FILES present in `src` into `dst` (created); returns the names."""
    if src is None:
        return []
    names = [n for n in ASSET_FILES if (Path(src) / n).is_file()]
    if names:
        dst.mkdir(parents=True, exist_ok=True)
    for n in names:
        shutil.copy2(Path(src) / n, dst / n)
    return names


def output_problems(out: Path, overwrite: bool, inputs: Sequence[Path]) -> list[str]:
    """Reasons not to write `out`: it exists (without overwrite), or it overlaps an input."""
    out = Path(out).absolute().resolve()
    problems = []
    if out.exists() and not overwrite:
        problems.append(f"output {out} already exists (pass --overwrite to replace it)")
    for inp in inputs:
        inp = Path(inp).absolute().resolve()
        if out == inp or inp in out.parents or out in inp.parents:
            problems.append(f"output {out} overlaps the input {inp}; inputs are never modified")
    return problems


def raise_if(problems: Sequence[str], what: str) -> None:
    if problems:
        lines = "\n  ".join(problems)
        raise CheckpointError(f"{what} ({len(problems)} problem(s)):\n  {lines}")


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        p.unlink(missing_ok=True)


def _fsync(p: Path) -> None:
    fd = os.open(p, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    """fsync every file and directory under `root` (files Orbax already synced cost ~0)."""
    for dirpath, _, files in os.walk(root):
        for f in files:
            _fsync(Path(dirpath) / f)
        _fsync(Path(dirpath))


@contextlib.contextmanager
def atomic_output(out: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a not-yet-existing temp path next to `out`; rename it to `out` on success.

    On any exception the temp path (and Orbax's own `*.orbax-checkpoint-tmp-*`
    siblings of it) is removed and nothing appears under `out`. With `overwrite`
    an existing `out` is moved aside first and deleted only after the rename.
    The contents are fsync'd before the rename and the parent after it, so a crash
    or power loss never leaves `out` naming half-written files.
    """
    out = Path(out).absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    tag = f"{os.getpid()}-{secrets.token_hex(4)}"
    tmp = out.parent / f".{out.name}.partial-{tag}"
    try:
        yield tmp
        _fsync_tree(tmp)
        if out.exists() or out.is_symlink():
            if not overwrite:
                raise CheckpointError(f"output {out} appeared while converting; not replaced")
            old = out.parent / f".{out.name}.old-{tag}"
            out.rename(old)
            tmp.rename(out)
            _remove(old)
        else:
            tmp.rename(out)
        _fsync(out.parent)
    finally:
        for p in glob.glob(glob.escape(str(tmp)) + "*"):
            _remove(Path(p))


def peak_rss_bytes() -> int:
    """Peak resident set size of this process (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


@dataclasses.dataclass
class RunStats:
    """Counters for the summary line of one conversion."""

    name: str
    tensors: int = 0
    bytes: int = 0
    start: float = dataclasses.field(default_factory=time.perf_counter)
    seconds: float = 0.0
    peak_rss: int = 0

    def finish(self) -> RunStats:
        self.seconds = time.perf_counter() - self.start
        self.peak_rss = peak_rss_bytes()
        return self

    def line(self) -> str:
        gb = self.bytes / 1e9
        rate = gb / self.seconds if self.seconds else float("nan")
        return (
            f"{self.name}: {self.tensors} tensors, {gb:.3f} GB in {self.seconds:.1f} s "
            f"({rate:.2f} GB/s), peak RSS {self.peak_rss / 1e9:.2f} GB"
        )


def progress(total: int, desc: str, enabled: bool = True):
    """tqdm bar over tensors (stderr); a no-op object when disabled."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="tensor", disable=not enabled, dynamic_ncols=True)
