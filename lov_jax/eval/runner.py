"""Eval jobs: shard records over JAX processes, score, resume, gather, aggregate.

Layout of `--out`:
    shards/<task>.rank<i>-of-<n>.jsonl   append-only per-process scored rows (resume state)
    samples_<task>.jsonl                 merged rows in record order (process 0)
    results.json                         lmms-eval style aggregate (process 0)

Process i of n evaluates records k with k % n == i. Each finished batch is appended and
fsynced, so a rerun with the same `--out` (any process count) skips every record already
scored in any shard file and ends with the same aggregate. A row counts as scored only
under its key (model fingerprint, task content hash, record id): rows of another
checkpoint (or prompt template, or sampling temperature), or of an edited task file,
are scored again (and said so), never reused. A record that is malformed or
whose media is missing/undecodable is scored 0 and reported with its id and reason: it
stays in the denominator and is counted under `bad_records`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

from data_pipelines.sample import Reason
from lov_jax.eval import metrics
from lov_jax.eval.tasks import BadRecord, Request, TaskSpec, load_task, read_records


class Predictor(Protocol):
    """What the runner needs from a model: per-record encoding (may raise on bad media)
    and batched answers."""

    def encode(self, request: Request) -> Any: ...

    def predict(self, encoded: Sequence[Any], max_new_tokens: int) -> list[str]: ...


def model_fingerprint(params, cfg, prompter=None, **knobs) -> str:
    """A hash of what decides a model's answers: the config, the params (every leaf's path,
    shape, dtype and up to 64k evenly strided values: any retrained, merged or other
    checkpoint differs), the prompter's templates and the decoding knobs."""
    import numpy as np

    from lov_jax.convert.hf_keys import flatten

    h = hashlib.sha256(json.dumps(cfg.to_hf_config(), sort_keys=True, default=str).encode())
    for path, leaf in sorted(flatten(params).items()):
        x = np.asarray(leaf)
        flat = x.reshape(-1)
        sample = np.ascontiguousarray(flat[:: max(1, flat.size // 65536)])
        h.update(f"{path}{x.shape}{x.dtype}".encode())
        h.update(sample.view(np.uint8).tobytes())
    if prompter is not None:
        for part in (prompter.chat_template, prompter.conv_template, prompter.system):
            h.update(repr(part).encode())
    h.update(json.dumps(knobs, sort_keys=True).encode())
    return h.hexdigest()[:16]


def task_fingerprint(spec: TaskSpec) -> str:
    """A hash of the task's content: its settings and the bytes of its records file."""
    settings = {k: v for k, v in spec.config().items() if k not in ("source", "data")}
    h = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    h.update(spec.data.read_bytes())
    return h.hexdigest()[:16]


class ModelPredictor:
    """`Predictor` over `lov_jax.inference` (greedy by default; stops on the eos ids).

    `fingerprint` (`model_fingerprint`) keys its rows for resuming."""

    def __init__(self, params, cfg, prompter, *, mesh=None, temperature: float = 0.0):
        from lov_jax.inference.engine import Generator

        self.cfg, self.prompter, self.temperature = cfg, prompter, temperature
        self.fingerprint = model_fingerprint(params, cfg, prompter, temperature=temperature)
        self.generator = Generator(params, cfg, mesh=mesh)
        self.batch_multiple = self.generator.batch_multiple

    def encode(self, request: Request):
        req = (request.question, request.images, request.videos)
        return self.prompter.encode(self.cfg, req, num_frames=request.num_frames)

    def check_fits(self, encoded, max_new_tokens: int) -> None:
        """ContextError when the prompt + max_new_tokens exceed the model's context."""
        from lov_jax.inference.engine import fit_context

        context = self.cfg.text.max_position_embeddings
        fit_context([len(encoded.tokens)], max_new_tokens, context, clip=False)

    def predict(self, encoded, max_new_tokens: int) -> list[str]:
        from lov_jax.inference.engine import GenerationConfig

        gen = GenerationConfig(
            max_new_tokens=max_new_tokens,
            temperature=self.temperature,
        )
        out = self.generator.generate(list(encoded), gen)
        tok = self.prompter.tokenizer
        return [tok.decode(t, skip_special_tokens=True).strip() for t in out.tokens]


def _too_long(err: Exception) -> bool:
    from lov_jax.inference.engine import ContextError

    return isinstance(err, ContextError)


# ---- per-process shard -------------------------------------------------------------------


def shard_path(out_dir: Path, task: str, index: int, count: int) -> Path:
    return Path(out_dir) / "shards" / f"{task}.rank{index:05d}-of-{count:05d}.jsonl"


def read_scored(out_dir: str | Path, task: str, key: list | None = None) -> dict[str, dict]:
    """Every row already scored for `task` in any shard file (a torn last line is ignored);
    with `key` ([model fingerprint, task hash]) only the rows scored under it."""
    rows: dict[str, dict] = {}
    for path in sorted((Path(out_dir) / "shards").glob(f"{task}.rank*.jsonl")):
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # interrupted mid-write
            if key is None or row.get("key") == key:
                rows.setdefault(row["id"], row)
    return rows


def run_key(spec: TaskSpec, predictor) -> list:
    """[model fingerprint (None for a predictor without one), task content hash]."""
    return [getattr(predictor, "fingerprint", None), task_fingerprint(spec)]


def _open_for_append(path: Path):
    """Append handle; drops a torn (newline-less) tail left by a crash."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        data = path.read_bytes()
        if data and not data.endswith(b"\n"):
            path.write_bytes(data[: data.rfind(b"\n") + 1])
    return path.open("a")


def _error_row(spec: TaskSpec, bad: BadRecord) -> dict:
    return {
        "id": bad.id, "index": bad.index, "task": spec.name, "prompt": bad.prompt,
        "prediction": None, "parsed": None, "target": bad.target, "score": 0.0,
        "metric": bad.metric or spec.metric, "meta": bad.meta,
        "error": {"reason": bad.reason, "message": bad.message},
    }  # fmt: skip


def _scored_row(spec: TaskSpec, req: Request, prediction: str) -> dict:
    try:
        sample = metrics.Sample(req.id, prediction, req.answers, req.options, req.meta)
        value, parsed = metrics.score(req.metric, sample, **spec.metric_args())
        error = None
    except ValueError as err:
        value, parsed, error = 0.0, None, {"reason": Reason.SCORING_FAILED, "message": str(err)}
    target = req.answers[0] if len(req.answers) == 1 else req.answers
    return {
        "id": req.id, "index": req.index, "task": spec.name, "prompt": req.question,
        "images": req.images, "videos": req.videos, "prediction": prediction,
        "parsed": parsed, "target": target, "score": value, "metric": req.metric,
        "meta": req.meta, "error": error,
    }  # fmt: skip


def evaluate_shard(
    spec: TaskSpec,
    predictor: Predictor,
    out_dir: str | Path,
    *,
    process_index: int = 0,
    process_count: int = 1,
    batch_size: int = 8,
    limit: int | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, int]:
    """Score this process's records not yet scored; append rows to its shard file."""
    records = read_records(spec)[:limit]
    mine = [r for i, r in enumerate(records) if i % process_count == process_index]
    key = run_key(spec, predictor)
    done = read_scored(out_dir, spec.name, key)
    todo = [r for r in mine if r.id not in done]
    stale = read_scored(out_dir, spec.name).keys() & {r.id for r in todo}
    if stale:
        log(
            f"[{spec.name}] {len(stale)} row(s) in {out_dir} were scored by another checkpoint "
            "or task version (model / task fingerprints differ): scoring them again"
        )
    stats = {"assigned": len(mine), "skipped": len(mine) - len(todo), "scored": 0, "errors": 0}
    path = shard_path(Path(out_dir), spec.name, process_index, process_count)
    with _open_for_append(path) as f:

        def write(rows):
            for row in rows:
                f.write(json.dumps({**row, "key": key}, sort_keys=True) + "\n")
                stats["scored"] += 1
                stats["errors"] += row["error"] is not None
            f.flush()
            os.fsync(f.fileno())

        pending: list[tuple[Request, Any]] = []

        def flush():
            if not pending:
                return
            preds = predictor.predict([e for _, e in pending], spec.max_new_tokens)
            write([_scored_row(spec, r, p) for (r, _), p in zip(pending, preds, strict=True)])
            pending.clear()

        for rec in todo:
            if isinstance(rec, BadRecord):
                log(f"[{spec.name}] bad record {rec.id}: {rec.reason}: {rec.message}")
                write([_error_row(spec, rec)])
                continue
            try:
                encoded = predictor.encode(rec)
                if hasattr(predictor, "check_fits"):  # prompt + new tokens within the context
                    predictor.check_fits(encoded, spec.max_new_tokens)
            except Exception as err:  # noqa: BLE001 - any decode failure is a counted bad record
                reason = Reason.TOO_LONG_TOKENS if _too_long(err) else Reason.BAD_MEDIA
                bad = BadRecord(rec.id, rec.index, reason, f"{type(err).__name__}: {err}",
                                rec.question, rec.answers, rec.metric, rec.meta)  # fmt: skip
                log(f"[{spec.name}] bad record {rec.id}: {bad.reason}: {bad.message}")
                write([_error_row(spec, bad)])
                continue
            pending.append((rec, encoded))
            if len(pending) == batch_size:
                flush()
        flush()
    return stats


# ---- gather and aggregate ----------------------------------------------------------------


def aggregate_task(spec: TaskSpec, rows: dict[str, dict], limit: int | None = None) -> dict:
    """Each metric's values over ALL records of the task (bad records score 0)."""
    records = read_records(spec)[:limit]
    ordered, missing = [], []
    for rec in records:
        row = rows.get(rec.id)
        (ordered.append(row) if row is not None else missing.append(rec.id))
    bad = [r for r in ordered if r["error"] is not None]
    reasons: dict[str, int] = {}
    for r in bad:
        reasons[r["error"]["reason"]] = reasons.get(r["error"]["reason"], 0) + 1
    values = metrics.aggregate(ordered)  # each metric's lmms-eval aggregation
    return {
        "rows": ordered,
        "values": values,
        "n": len(records),
        "bad": {"count": len(bad), "by_reason": reasons, "ids": [r["id"] for r in bad]},
        "missing": missing,
    }


def results_json(
    specs: Sequence[TaskSpec], aggs: Sequence[dict], model: str, model_config: dict
) -> dict:
    """lmms-eval's results layout (`results`, `configs`, `n-samples`, `config`, ...) plus a
    flat `table` and our `bad_records`. No timestamps: reruns produce identical files."""
    out: dict[str, Any] = {
        "results": {}, "configs": {}, "versions": {}, "n-shot": {}, "higher_is_better": {},
        "n-samples": {}, "bad_records": {}, "missing": {}, "table": [],
        "config": {"model": model, **model_config},
    }  # fmt: skip
    for spec, agg in zip(specs, aggs, strict=True):
        res = {"alias": spec.name}
        for metric, v in agg["values"].items():
            res[f"{metric},none"] = v["value"]
            res[f"{metric}_stderr,none"] = "N/A" if math.isnan(v["stderr"]) else v["stderr"]
            out["table"].append(
                {"task": spec.name, "metric": metric, "value": v["value"], "n": v["n"],
                 "bad_records": agg["bad"]["count"], "model": model}
            )  # fmt: skip
        out["results"][spec.name] = res
        out["configs"][spec.name] = spec.config()
        out["versions"][spec.name] = "lov_jax-1"
        out["n-shot"][spec.name] = 0
        out["higher_is_better"][spec.name] = {m: True for m in agg["values"]}
        scored = agg["n"] - len(agg["missing"])
        out["n-samples"][spec.name] = {"original": agg["n"], "effective": scored}
        out["bad_records"][spec.name] = agg["bad"]
        out["missing"][spec.name] = agg["missing"]
    return out


def gather_rows(rows: dict[str, dict]) -> dict[str, dict]:
    """All processes' rows on every process (JAX multi-controller); identity on one."""
    import jax

    if jax.process_count() == 1:
        return rows
    import numpy as np
    from jax.experimental import multihost_utils

    blob = np.frombuffer(json.dumps(rows).encode(), np.uint8)
    sizes = multihost_utils.process_allgather(np.asarray([blob.size], np.int64))
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[: blob.size] = blob
    blobs = multihost_utils.process_allgather(padded)
    merged: dict[str, dict] = {}
    for size, b in zip(sizes.reshape(-1), blobs, strict=True):
        merged.update(json.loads(bytes(b[: int(size)]).decode()))
    return merged


def write_outputs(out_dir: str | Path, specs, aggs, model: str, model_config: dict) -> dict:
    out_dir = Path(out_dir)
    for spec, agg in zip(specs, aggs, strict=True):
        with (out_dir / f"samples_{spec.name}.jsonl").open("w") as f:
            for row in agg["rows"]:
                f.write(json.dumps(row, sort_keys=True) + "\n")
    results = results_json(specs, aggs, model, model_config)
    (out_dir / "results.json").write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    return results


def run_eval(
    task_paths: Sequence[str | Path],
    out_dir: str | Path,
    predictor: Predictor,
    *,
    batch_size: int = 8,
    limit: int | None = None,
    model: str = "lov_jax",
    model_config: dict | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
    log: Callable[[str], None] = print,
) -> dict | None:
    """Evaluate every task; returns the results dict on process 0 (None elsewhere)."""
    import jax

    index = jax.process_index() if process_index is None else process_index
    count = jax.process_count() if process_count is None else process_count
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    specs = [load_task(p) for p in task_paths]
    if len({s.name for s in specs}) != len(specs):
        raise ValueError(f"task names collide: {[s.name for s in specs]}")
    aggs, keys = [], {}
    for spec in specs:
        stats = evaluate_shard(
            spec, predictor, out_dir, process_index=index, process_count=count,
            batch_size=batch_size, limit=limit, log=log,
        )  # fmt: skip
        log(f"[{spec.name}] process {index}/{count}: {stats}")
        keys[spec.name] = key = run_key(spec, predictor)
        mine = read_scored(out_dir, spec.name, key)
        rows = gather_rows(mine)
        aggs.append(aggregate_task(spec, rows, limit))
    if index != 0:
        return None
    fingerprints = {"model": getattr(predictor, "fingerprint", None),
                    "tasks": {name: k[1] for name, k in keys.items()}}  # fmt: skip
    config = {**(model_config or {}), "fingerprints": fingerprints}
    results = write_outputs(out_dir, specs, aggs, model, config)
    log(format_table(results))
    return results


def format_table(results: dict) -> str:
    lines = ["| task | metric | value | n | bad |", "|---|---|---|---|---|"]
    for r in results["table"]:
        lines.append(
            f"| {r['task']} | {r['metric']} | {r['value']:.4f} | {r['n']} | {r['bad_records']} |"
        )
    return "\n".join(lines)
