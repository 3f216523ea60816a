"""What a resume checks besides the trees: the stage config and the data it was saved with.

Every save's `config` item holds the stage config (`"stage"`) and a fingerprint of the
training data (`"data_fingerprint"`: record count and, per file, size + a hash of its
first and last MiB). A resume compares both with this run's and refuses a change
(`ResumeConfigChanged`, listing each field as saved -> now) unless
`train.allow_config_change` (then one warning). Keys that do not change what is computed
may differ freely: `RESUME_FREE` (checkpoint cadence, mesh, workers, kernels), and so
may keys only one side has (a knob added or removed by another version of lov_jax).
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# Dotted prefixes of stage keys that may differ on resume: how the same computation is
# laid out, checkpointed or logged, never its numbers.
RESUME_FREE = (
    "mesh.",
    "train.ckpt_every",
    "train.ckpt_keep",
    "train.ckpt_keep_period",
    "train.allow_config_change",
    "train.peak_flops_per_device",
    "data.num_workers",
    "model.attention_impl",
    "model.remat_policy",
)
_EDGE = 2**20  # bytes hashed at each end of a data file


class ResumeConfigChanged(ValueError):
    """The stage config or data differ from those the checkpoint was trained with."""


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out = {}
        for k, v in d.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: d}


def _free(key: str) -> bool:
    return any(key == p or key.startswith(p) for p in RESUME_FREE)


def config_changes(saved: dict, now: dict) -> list[str]:
    """'key: saved -> now' for each differing stage key and the data fingerprint."""
    changes = []
    if isinstance(saved.get("stage"), dict) and isinstance(now.get("stage"), dict):
        # JSON round trip: tuples are lists on disk
        a, b = _flat(saved["stage"]), _flat(json.loads(json.dumps(now["stage"])))
        for k in sorted(set(a) & set(b)):  # a key new in this version (or dropped) is not
            if not _free(k) and a[k] != b[k]:  # a change of this run's config
                changes.append(f"{k}: {a[k]!r} -> {b[k]!r}")
    fa, fb = saved.get("data_fingerprint"), now.get("data_fingerprint")
    if fa is not None and fb is not None and fa != fb:
        ka, kb = _flat(fa), _flat(fb)
        for k in sorted(set(ka) | set(kb)):
            if ka.get(k) != kb.get(k):
                changes.append(f"data {k}: {ka.get(k, '<absent>')} -> {kb.get(k, '<absent>')}")
    return changes


def refuse_or_warn(step_dir: Path, changes: list[str], allow: bool) -> None:
    listed = "\n  ".join(changes[:12]) + (f"\n  ... {len(changes) - 12} more" if
                                          len(changes) > 12 else "")  # fmt: skip
    if not allow:
        raise ResumeConfigChanged(
            f"cannot resume from {step_dir}: this run's config / data differ from the ones "
            f"it was trained with:\n  {listed}\n  rerun with the old values, use a new "
            f"--workdir (--config.init_from={step_dir.parent.parent} starts from its weights "
            "only), or pass --config.train.allow_config_change=true to resume anyway"
        )
    message = f"resuming from {step_dir} with a changed config / data:\n  {listed}"
    log.warning(message)
    print(f"WARNING: {message}", flush=True)


def file_fingerprint(path: str | Path) -> str:
    """'<size>:<sha256 of the first and last MiB>' (cheap on multi-GB annotation files)."""
    p = Path(path)
    size = p.stat().st_size
    h = hashlib.sha256()
    with open(p, "rb") as f:
        h.update(f.read(_EDGE))
        if size > 2 * _EDGE:
            f.seek(size - _EDGE)
            h.update(f.read(_EDGE))
        elif size > _EDGE:
            h.update(f.read())
    return f"{size}:{h.hexdigest()[:16]}"


def data_fingerprint(train_path: str, records) -> dict:
    """{"records": N, "files": {name: fingerprint}} of the data config and the files
    `records` (a data_pipelines source) reads."""
    from data_pipelines.sources import source_name

    names = [train_path] + [f for part in source_name(records).split("+") for f in part.split(",")]
    found = {str(n): file_fingerprint(n) for n in dict.fromkeys(names) if Path(n).is_file()}
    return {"records": len(records), "files": found}
