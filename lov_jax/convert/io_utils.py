"""What both conversion directions share: atomic output dirs, asset files, run summary.

Every conversion output is written as a hidden `.<out>.partial-<pid>-<hex>` sibling and
renamed into place (`atomic_output`); it holds a MARKER file, the only proof that
`--overwrite` may replace it. While a conversion runs, an owner file
`.<out>.partial-<tag>.owner` (host, pid) sits beside the partial: the next conversion into
the same parent removes the partials of owners that died (SIGKILL, power loss), names the
ones it cannot judge, and refuses to write an `out` a live conversion is writing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import glob
import json
import os
import resource
import secrets
import shutil
import socket
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


# Written into every conversion output; `--overwrite` replaces only a directory holding it.
MARKER = ".lov_jax_convert.json"


def is_tool_output(path: Path) -> bool:
    """Whether `path` is a directory a lov-jax conversion wrote (it holds MARKER)."""
    path = Path(path)
    return path.is_dir() and not path.is_symlink() and (path / MARKER).is_file()


def _not_ours(out: Path) -> str:
    return (
        f"output {out} exists and was not written by lov-jax convert (no {MARKER} in it): "
        "--overwrite replaces only a conversion output; remove it yourself or choose "
        "another --out"
    )


def output_problems(out: Path, overwrite: bool, inputs: Sequence[Path]) -> list[str]:
    """Reasons not to write `out`: it exists (without overwrite, or with overwrite but not
    written by a conversion), or it overlaps an input."""
    out = Path(out).absolute().resolve()
    problems = []
    if out.exists() or out.is_symlink():
        if not overwrite:
            problems.append(f"output {out} already exists (pass --overwrite to replace it)")
        elif not is_tool_output(out):
            problems.append(_not_ours(out))
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


_OWNER_SUFFIX = ".owner"
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def _note(message: str) -> None:
    print(f"note: {message}", file=sys.stderr, flush=True)


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def clean_orphans(parent: Path, out_name: str | None = None) -> list[Path]:
    """Remove the partial outputs in `parent` whose conversion died; returns them.

    A partial's owner file names its host and pid: a dead pid on this host is an orphan
    (removed; an `.old-<tag>` it had moved aside is put back when its `out` is missing). A
    live owner writing `out_name` is an error (two conversions to one output); partials
    without an owner, or of another host, are only named."""
    parent = Path(parent)
    if not parent.is_dir():
        return []
    host, removed = socket.gethostname(), []
    for owner in sorted(parent.glob(f".*.partial-*{_OWNER_SUFFIX}")):
        partial = owner.name[: -len(_OWNER_SUFFIX)]
        name, _, tag = partial[1:].rpartition(".partial-")
        try:
            info = json.loads(owner.read_text())
            who, pid = str(info["host"]), int(info["pid"])
        except (OSError, ValueError, KeyError, TypeError):
            _note(f"{owner}: unreadable owner file of a partial conversion output; left alone")
            continue
        if who != host or _pid_alive(pid):
            if name == out_name:
                raise CheckpointError(
                    f"output {parent / name} is being written by another conversion (pid {pid} "
                    f"on {who}, {parent / partial}); wait for it or choose another --out"
                )
            continue
        old, out = parent / f".{name}.old-{tag}", parent / name
        if old.exists():
            if out.exists():
                _remove(old)
            else:
                old.rename(out)  # killed between moving the old output aside and the rename
                _note(f"restored {out} (a killed --overwrite had moved it aside)")
        for p in sorted(glob.glob(glob.escape(str(parent / partial)) + "*")):
            if p != str(owner):
                _remove(Path(p))
        owner.unlink(missing_ok=True)
        removed.append(parent / partial)
        _note(f"removed {parent / partial}: partial output of a killed conversion (pid {pid})")
    owned = {p.name[: -len(_OWNER_SUFFIX)] for p in parent.glob(f".*.partial-*{_OWNER_SUFFIX}")}
    for p in sorted(parent.glob(".*.partial-*")):
        stem = p.name.split(".orbax-checkpoint-tmp")[0]
        if not p.name.endswith(_OWNER_SUFFIX) and stem not in owned:
            _note(f"{p} looks like a partial conversion output without an owner; remove it "
                  "if no conversion is writing it")  # fmt: skip
    return removed


@contextlib.contextmanager
def atomic_output(out: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a not-yet-existing temp path next to `out`; rename it to `out` on success.

    First removes orphaned partial outputs in the parent (`clean_orphans`). On any
    exception the temp path (and Orbax's own `*.orbax-checkpoint-tmp-*` siblings of
    it) is removed and nothing appears under `out`; a full disk is one CheckpointError.
    The finished dir gets MARKER. With `overwrite` an existing `out` (a conversion
    output, MARKER) is moved aside first and deleted only after the rename.
    The contents are fsync'd before the rename and the parent after it, so a crash
    or power loss never leaves `out` naming half-written files.
    """
    out = Path(out).absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    clean_orphans(out.parent, out.name)
    tag = f"{os.getpid()}-{secrets.token_hex(4)}"
    tmp = out.parent / f".{out.name}.partial-{tag}"
    owner = Path(str(tmp) + _OWNER_SUFFIX)
    try:
        owner.write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid()}))
        _fsync(out.parent)
        yield tmp
        (tmp / MARKER).write_text(json.dumps({"written_by": "lov-jax convert"}) + "\n")
        _fsync_tree(tmp)
        if out.exists() or out.is_symlink():
            if not overwrite:
                raise CheckpointError(f"output {out} appeared while converting; not replaced")
            if not is_tool_output(out):
                raise CheckpointError(_not_ours(out))
            old = out.parent / f".{out.name}.old-{tag}"
            out.rename(old)
            tmp.rename(out)
            _remove(old)
        else:
            tmp.rename(out)
        _fsync(out.parent)
    except OSError as e:
        if e.errno not in _DISK_FULL:
            raise
        raise CheckpointError(
            f"no space left on the device of {out.parent} while writing {out} ({e.strerror}); "
            "nothing was written there: free space and rerun"
        ) from e
    finally:
        for p in glob.glob(glob.escape(str(tmp)) + "*"):
            if p != str(owner):
                _remove(Path(p))
        owner.unlink(missing_ok=True)  # last: the partial is gone


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
