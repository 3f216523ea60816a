"""Step metrics: model FLOPs, MFU, and the JSONL / TensorBoard / console writers.

FLOPs model (useful work only; padding and masked attention are not counted):
  matmul FLOPs per token through a weight matrix of N params: 2N forward, 2N for
  the activation gradient (backward), and 2N for the weight gradient if trained.
  * LLM: N_llm = non-embedding params + the head matmul (H * V), per real token.
  * Causal attention per segment of length s, per LLM layer: QK^T and PV cost
    2 * 2 * s^2/2 * (heads * head_dim) forward (half the square is masked), same
    factors as above for the backward.
  * Vision tower: N_vis per patch (729 per 384px crop) plus full attention 2*2*729^2*D
    per layer per crop; projector N_proj per patch. A frozen tower runs forward
    only (no differentiated input), a frozen LLM still back-propagates activations.
MFU = model FLOPs / (step seconds * devices * peak FLOP/s of the device).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from lov_jax.config import ModelConfig

# Dense bf16 peak per chip/GPU (vendor figures).
PEAK_FLOPS = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,
    "TPU v6 lite": 918e12,
    "TPU v6e": 918e12,
    "H100": 989e12,
    "H200": 989e12,
    "A100": 312e12,
}


def peak_flops(device_kind: str) -> float | None:
    for name, flops in PEAK_FLOPS.items():
        if name.lower() in device_kind.lower():
            return flops
    return None


def param_counts(cfg: ModelConfig) -> dict[str, int]:
    v, t = cfg.vision, cfg.text
    vis_layer = 4 * v.hidden_size**2 + 2 * v.hidden_size * v.intermediate_size
    llm_layer = (
        t.hidden_size * t.head_dim * (t.num_heads * 2 + t.num_kv_heads * 2)
        + 3 * t.hidden_size * t.intermediate_size
    )
    return {
        "vision": v.num_layers * vis_layer + v.patch_size**2 * v.num_channels * v.hidden_size,
        "projector": v.hidden_size * t.hidden_size + t.hidden_size**2,
        "llm": t.num_layers * llm_layer + t.hidden_size * t.vocab_size,
    }


def step_flops(cfg: ModelConfig, segment_lengths, num_crops: int, trainable) -> float:
    """Model FLOPs of one optimizer step (all micro-batches, all hosts' data)."""
    n = param_counts(cfg)
    t, v = cfg.text, cfg.vision
    trainable = set(trainable)
    llm_factor = 6 if "llm" in trainable else 4
    proj_factor = 6 if "projector" in trainable else 4
    vis_factor = 6 if "vision" in trainable else 2
    lengths = np.asarray(segment_lengths, np.float64)
    tokens = lengths.sum()
    attn = t.num_layers * 2 * np.sum(lengths**2) * t.num_heads * t.head_dim  # fwd, causal
    llm = llm_factor * n["llm"] * tokens + (llm_factor / 2) * attn
    seq = v.num_patches + int(v.has_cls)  # tower tokens per crop; the projector sees F
    vis_attn = v.num_layers * 4 * seq**2 * v.hidden_size * num_crops
    vision = vis_factor * n["vision"] * num_crops * seq + (vis_factor / 2) * vis_attn
    return float(llm + proj_factor * n["projector"] * num_crops * v.num_features + vision)


def batch_work(batch: dict, features_per_crop: int) -> tuple[list[int], int, int]:
    """(segment lengths, real crops, trained tokens) of a host batch [A, B, ...]."""
    seg = batch["segment_ids"].reshape(-1, batch["segment_ids"].shape[-1])
    lengths = []
    for row in seg:
        ids, counts = np.unique(row[row > 0], return_counts=True)
        lengths += counts.tolist()
    n_crops = batch["pixels"].shape[-4]
    idx = batch["vis_idx"].reshape(-1, batch["vis_idx"].shape[-2], 4)
    w = batch["vis_w"].reshape(idx.shape)
    crops = 0
    for r in range(idx.shape[0]):
        used = idx[r][w[r] != 0] // features_per_crop
        crops += len(np.unique(used[used < n_crops]))
    return lengths, crops, int(batch["loss_mask"].sum())


class MetricWriter:
    """JSONL log + TensorBoard events (process 0 only).

    `resume_step`: the step this run restarts from (0: a fresh start). Records of the
    steps it will redo are dropped from `metrics.jsonl` (`truncate_jsonl`) and TensorBoard
    purges events after it (`purge_step`), so every step is logged once.
    """

    def __init__(self, workdir: str | Path, enabled: bool = True, resume_step: int | None = None):
        self.enabled = enabled
        self.tb = None
        if enabled:
            Path(workdir).mkdir(parents=True, exist_ok=True)
            path = Path(workdir) / "metrics.jsonl"
            if resume_step is not None:
                truncate_jsonl(path, resume_step)
            self.jsonl = open(path, "a")  # noqa: SIM115
            try:
                from tensorboardX import SummaryWriter

                purge = None if resume_step is None else resume_step + 1
                self.tb = SummaryWriter(str(Path(workdir) / "tb"), purge_step=purge)
            except ImportError:  # optional dependency
                self.tb = None

    def write(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        record = {"step": step, "time": time.time(), **metrics}
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        if self.tb is not None:
            for k, v in metrics.items():
                if isinstance(v, int | float) and v is not None:
                    self.tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self.enabled:
            self.jsonl.close()
            if self.tb is not None:
                self.tb.close()


def truncate_jsonl(path: Path, resume_step: int) -> int:
    """Keep the records a run resumed at `resume_step` will not write again; returns how
    many were dropped. A record's "step" counts optimizer steps done when it was written:
    a trained step k logs k + 1, a skipped (non-finite) attempt after k logs k with
    "skipped": true, so the kept ones are step < S and the trained step S. Lines that do
    not parse (a write cut by a kill) are dropped too."""
    if not path.exists():
        return 0
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
            step = int(rec["step"])
        except (ValueError, KeyError, TypeError):
            dropped += 1
            continue
        if step < resume_step or (step == resume_step and not _skipped(rec)):
            kept.append(line)
        else:
            dropped += 1
    if dropped:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(k + "\n" for k in kept))
        tmp.replace(path)
    return dropped


def _skipped(rec: dict) -> bool:
    if "skipped" in rec:
        return bool(rec["skipped"])
    loss = rec.get("loss")  # records written before the marker: a skipped step's loss
    return isinstance(loss, float) and not np.isfinite(loss)
