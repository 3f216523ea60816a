"""Per-tensor number checks of a conversion: non-finite values, and values the output
dtype cannot hold (`--dtype float16` turns |x| > 65504 into inf).

Each problem names the tensor. By default they are one CheckpointError raised before the
output is renamed into place; with `--allow-nonfinite` each is a warning on stderr.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable

import ml_dtypes
import numpy as np

from lov_jax.convert.hf_keys import CheckpointError


def _finfo(dtype: np.dtype):
    try:
        return ml_dtypes.finfo(dtype)
    except ValueError:  # integer / bool tensors hold no inf or NaN
        return None


def tensor_problems(name: str, x: np.ndarray, out_dtype: np.dtype | None = None) -> list[str]:
    """What is wrong with the numbers of tensor `name` (to be stored as `out_dtype`)."""
    info = _finfo(x.dtype)
    if info is None or x.size == 0:
        return []
    finite = np.isfinite(x)
    problems = []
    bad = x.size - int(np.count_nonzero(finite))
    if bad:
        problems.append(f"{name}: {bad} non-finite value(s) (NaN / inf) of {x.size}")
    out = _finfo(np.dtype(out_dtype)) if out_dtype is not None else None
    if out is not None and float(out.max) < float(info.max):
        with np.errstate(over="ignore"):  # exactly what the cast would store
            big = finite & np.isinf(x.astype(out_dtype))
        over = int(np.count_nonzero(big))
        if over:
            peak = float(np.max(np.abs(x[big].astype(np.float64))))
            problems.append(
                f"{name}: {over} value(s) outside the {np.dtype(out_dtype)} range (max |x| "
                f"{peak:.6g} > {float(out.max):.6g}) would be stored as inf"
            )
    return problems


class NumberCheck:
    """Collects `tensor_problems` over a conversion (thread-safe), then `finish()`."""

    def __init__(
        self,
        out_dtype: str | np.dtype | None,
        allow_nonfinite: bool = False,
        warn: Callable[[str], None] | None = None,
    ):
        self.out_dtype = None if out_dtype is None else np.dtype(out_dtype)
        self.allow = allow_nonfinite
        self.warn = warn or (lambda m: print(f"warning: {m}", file=sys.stderr, flush=True))
        self.problems: dict[str, list[str]] = {}
        self._lock = threading.Lock()

    def __call__(self, name: str, x: np.ndarray, out_dtype: np.dtype | None = None) -> None:
        found = tensor_problems(name, x, out_dtype if out_dtype is not None else self.out_dtype)
        if found:
            with self._lock:
                self.problems.setdefault(name, found)

    def finish(self, what: str) -> None:
        """Raise one CheckpointError naming every tensor, or (allowed) warn about each."""
        lines = [p for name in sorted(self.problems) for p in self.problems[name]]
        if not lines:
            return
        if self.allow:
            for line in lines:
                self.warn(f"{line} (kept: --allow-nonfinite)")
            return
        raise CheckpointError(
            f"{what}: {len(self.problems)} tensor(s) with numbers the output cannot hold "
            "(pass --allow-nonfinite to convert anyway):\n  " + "\n  ".join(lines)
        )
