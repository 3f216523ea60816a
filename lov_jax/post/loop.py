"""The iterative DPO loop of LLaVA-OneVision-Chat (`lov-jax dpo-loop`; REFERENCE_VIDEO_POST 4.6).

    M_0 = config.init_from
    round r = 1..R, in <workdir>/round_<r>/:
      samples.jsonl  K responses per prompt from M_{r-1} (temperature, top-p, batched)
      judge/         scores: a LLaVA-Critic checkpoint, pointwise (lov_jax/post/critic.py),
                     or the rule judge (exact match with the prompt's "answer")
      pairs.jsonl    best vs worst response per prompt (DPO json layout); prompts whose
                     best and worst scores tie, or with an unparsable score, are dropped
                     and counted (the reference leaves ties unspecified)
      train/         one DPO run (lov_jax/post/train.py) from M_{r-1}, reference M_{r-1}
      merged/        with an enabled `lora` block: train/'s adapters merged into M_{r-1}
                     (`convert orbax-to-peft --merge`), the round's M_r
      round.json     the round's record: counts, the last step's metrics, seconds
Every stage resumes: sampling and judging append fsynced rows and skip what is there,
pairs are rebuilt from them, training resumes from its checkpoints, and a round with
`round.json` is done. The prompts file: json / jsonl records {"id", "question" | "prompt",
"image" | "images" | "video" (optional, under data.image_folder / video_folder),
"answer" (the rule judge's)}.
"""

from __future__ import annotations

import copy
import json
import os
import random
import re
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

JUDGES = ("critic", "rule")


def read_prompts(path: str | Path) -> list[dict]:
    """Prompt records in file order; a ValueError names the file and line / index."""
    path = Path(path)
    if path.suffix == ".jsonl":
        rows = [(f"{path}:{n}", line) for n, line in enumerate(path.read_text().splitlines(), 1)
                if line.strip()]  # fmt: skip
        recs = []
        for where, line in rows:
            try:
                recs.append((where, json.loads(line)))
            except json.JSONDecodeError as err:
                raise ValueError(f"{where}: not JSON: {err}") from err
    else:
        data = json.loads(path.read_text())
        if not isinstance(data, list):
            raise ValueError(f"{path}: expected a JSON list of prompt records")
        recs = [(f"{path}[{i}]", r) for i, r in enumerate(data)]
    out, seen = [], set()
    for where, r in recs:
        if not isinstance(r, dict) or "id" not in r:
            raise ValueError(f"{where}: a prompt record needs an 'id'")
        q = r.get("question", r.get("prompt"))
        if not isinstance(q, str):
            raise ValueError(f"{where}: record {r['id']!r} needs a string 'question'/'prompt'")
        if str(r["id"]) in seen:
            raise ValueError(f"{where}: duplicate id {r['id']!r}")
        seen.add(str(r["id"]))
        out.append({**r, "id": str(r["id"]), "question": q.replace("<image>", "").strip()})
    return out


def media_of(record: dict, image_folder: str = "", video_folder: str = ""):
    """(image paths, video paths) of a prompt record, joined to the folders."""
    images = record.get("images", record.get("image", []))
    images = [images] if isinstance(images, str) else list(images or [])
    videos = [record["video"]] if record.get("video") else []
    return ([os.path.join(image_folder, p) for p in images],
            [os.path.join(video_folder, p) for p in videos])  # fmt: skip


def normalize_answer(text: str) -> str:
    return re.sub(r"[\s.!?,;:]+$", "", text.strip().lower())


def rule_score(record: dict, response: str) -> float:
    """The rule judge: 1 when the response equals the record's answer (case and trailing
    punctuation ignored), else 0."""
    if "answer" not in record:
        raise ValueError(f"prompt {record['id']!r}: the rule judge needs an 'answer'")
    return float(normalize_answer(response) == normalize_answer(str(record["answer"])))


# ---- resumable row files ------------------------------------------------------------------


def _read_rows(path: Path) -> list[dict]:
    rows = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a torn last line: redone
    return rows


def _append(path: Path, rows: Sequence[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        data = path.read_bytes()
        if data and not data.endswith(b"\n"):
            path.write_bytes(data[: data.rfind(b"\n") + 1])
    with path.open("a") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows))
        f.flush()
        os.fsync(f.fileno())


# ---- stages -------------------------------------------------------------------------------


def sample_responses(
    prompts: Sequence[dict], generate: Callable[[Sequence[dict], int], list[str]],
    out: Path, k: int, batch_size: int,
) -> list[dict]:  # fmt: skip
    """K responses per prompt appended to `out` ({"id", "k", "response"}); prompts with all
    K rows already there are skipped. `generate(prompts, batch_index)` returns K texts per
    prompt, prompt-major."""
    done = {}
    for row in _read_rows(out):
        done.setdefault(row["id"], {})[row["k"]] = row
    todo = [p for p in prompts if len(done.get(p["id"], {})) < k]
    for b in range(0, len(todo), batch_size):
        batch = todo[b : b + batch_size]
        texts = generate(batch, b // batch_size)
        _append(out, [{"id": p["id"], "k": j, "response": texts[i * k + j]}
                      for i, p in enumerate(batch) for j in range(k)])  # fmt: skip
    rows = {}
    for row in _read_rows(out):
        rows.setdefault((row["id"], row["k"]), row)
    return [rows[(p["id"], j)] for p in prompts for j in range(k)]


def build_pairs(prompts: Sequence[dict], samples: Sequence[dict], scores: dict) -> tuple:
    """(DPO records best vs worst, counts). `scores[(id, k)]`: float or None (unparsable)."""
    by_id: dict[str, list[tuple[int, str]]] = {}
    for s in samples:
        by_id.setdefault(s["id"], []).append((s["k"], s["response"]))
    pairs, counts = [], {"ties": 0, "unparsable": 0, "pairs": 0}
    for p in prompts:
        scored = [(scores[(p["id"], k)], k, text) for k, text in by_id.get(p["id"], [])]
        if any(s is None for s, _, _ in scored):
            counts["unparsable"] += 1
            scored = [x for x in scored if x[0] is not None]
        if len(scored) < 2:
            continue
        best = max(scored, key=lambda x: (x[0], -x[1]))  # first of the best
        worst = min(scored, key=lambda x: (x[0], x[1]))
        if best[0] == worst[0] or best[2] == worst[2]:
            counts["ties"] += 1
            continue
        media = {key: p[key] for key in ("image", "images", "video") if key in p}
        if "images" in media:
            media["image"] = media.pop("images")
        pairs.append({"id": p["id"], **media, "prompt": p["question"], "chosen": best[2],
                      "rejected": worst[2], "scores": [best[0], worst[0]]})  # fmt: skip
    counts["pairs"] = len(pairs)
    return pairs, counts


def model_sampler(ckpt: str | Path, lc, image_folder: str = "", video_folder: str = ""):
    """`generate(prompts, batch_index)` sampling `lc.samples_per_prompt` answers per prompt
    from a checkpoint (temperature / top-p of `lc`, a seed per round and batch)."""
    from lov_jax.inference.engine import GenerationConfig, Generator
    from lov_jax.inference.prompting import Prompter
    from lov_jax.pretrained import load_pretrained

    cfg, params = load_pretrained(ckpt)
    prompter = Prompter.from_checkpoint(ckpt)
    generator = Generator(params, cfg)
    k = lc.samples_per_prompt

    def generate(prompts, batch_index):
        encoded = []
        for p in prompts:
            images, videos = media_of(p, image_folder, video_folder)
            one = prompter.encode(cfg, (p["question"], images, videos), num_frames=4)
            encoded += [one] * k
        gen = GenerationConfig(max_new_tokens=lc.max_new_tokens, temperature=lc.temperature,
                               top_p=lc.top_p, seed=lc.seed * 100003 + batch_index)  # fmt: skip
        out = generator.generate(encoded, gen)
        tok = prompter.tokenizer
        return [tok.decode(t, skip_special_tokens=True).strip() for t in out.tokens]

    return generate


def _judge_round(config, prompts, samples, rdir: Path) -> dict:
    lc = config.loop
    if lc.judge == "rule":
        by_id = {p["id"]: p for p in prompts}
        return {(s["id"], s["k"]): rule_score(by_id[s["id"]], s["response"]) for s in samples}
    from lov_jax.inference.prompting import Prompter
    from lov_jax.post import critic
    from lov_jax.pretrained import load_pretrained

    by_id = {p["id"]: p for p in prompts}
    items = []
    for s in samples:
        images, videos = media_of(by_id[s["id"]], config.data.image_folder,
                                  config.data.video_folder)  # fmt: skip
        items.append({"id": f"{s['id']}#{s['k']}", "record": s["id"], "response_index": s["k"],
                      "text": critic.pointwise_prompt(by_id[s["id"]]["question"], s["response"]),
                      "images": images, "videos": videos})  # fmt: skip
    cfg, params = load_pretrained(lc.critic)
    generate = critic.model_generate(params, cfg, Prompter.from_checkpoint(lc.critic))
    critic.judge(items, generate, rdir / "judge", "pointwise", batch_size=lc.batch_size)
    critic.summarize(items, rdir / "judge", "pointwise")
    rows = critic.read_judged(rdir / "judge")
    return {(s["id"], s["k"]): rows[f"{s['id']}#{s['k']}"]["parsed"] for s in samples}


def check_loop_config(config) -> None:
    lc = config.loop
    if lc.judge not in JUDGES:
        raise ValueError(f"loop.judge {lc.judge!r} not in {JUDGES}")
    if lc.judge == "critic" and not lc.critic:
        raise ValueError("loop.judge='critic' needs loop.critic (a critic checkpoint)")
    if lc.samples_per_prompt < 2:
        raise ValueError(f"loop.samples_per_prompt must be >= 2, got {lc.samples_per_prompt}")
    if lc.rounds < 1 or lc.batch_size < 1:
        raise ValueError("loop.rounds and loop.batch_size must be >= 1")
    if not config.init_from:
        raise ValueError("the loop starts from a checkpoint: set init_from")


def run_loop(config, workdir: str | Path, prompts_path: str | Path,
             sampler: Callable[..., Callable] = model_sampler) -> list[dict]:  # fmt: skip
    """Run (or resume) every round; returns the rounds' records (`round.json`)."""
    from lov_jax.post.train import run_dpo

    check_loop_config(config)
    workdir = Path(workdir)
    prompts = read_prompts(prompts_path)
    lc = config.loop
    records, init = [], config.init_from
    for r in range(1, lc.rounds + 1):
        rdir = workdir / f"round_{r}"
        done = rdir / "round.json"
        if done.exists():
            records.append(json.loads(done.read_text()))
            init = _round_policy(config, rdir, init)
            print(f"[loop] round {r}: done earlier ({rdir})")
            continue
        t0 = time.time()
        rng = random.Random(lc.seed + r)  # the order prompts are sampled in
        order = list(prompts)
        rng.shuffle(order)
        gen = sampler(init, _round_loop_config(lc, r), config.data.image_folder,
                      config.data.video_folder)  # fmt: skip
        samples = sample_responses(order, gen, rdir / "samples.jsonl", lc.samples_per_prompt,
                                   lc.batch_size)  # fmt: skip
        t1 = time.time()
        scores = _judge_round(config, prompts, samples, rdir)
        pairs, counts = build_pairs(prompts, samples, scores)
        _write_jsonl(rdir / "pairs.jsonl", pairs)
        t2 = time.time()
        if not pairs:
            raise ValueError(f"round {r}: no preference pairs ({counts}); nothing to train on")
        rc = copy.deepcopy(config)
        rc.init_from = str(init)
        rc.data.train_path = str(rdir / "pairs.jsonl")
        result = run_dpo(rc, rdir / "train")
        last = result.metrics[max(result.metrics)] if result.metrics else {}
        record = {"round": r, "init": str(init), "prompts": len(prompts),
                  "samples": len(samples), **counts,
                  "mean_score": _mean([s for s in scores.values() if s is not None]),
                  "steps": result.final_step, "last_metrics": last,
                  "seconds": {"sample": t1 - t0, "judge": t2 - t1,
                              "train": time.time() - t2}}  # fmt: skip
        done.write_text(json.dumps(record, indent=1))
        print(
            f"[loop] round {r}: {counts['pairs']} pairs ({counts['ties']} ties, "
            f"{counts['unparsable']} unparsable), mean score {record['mean_score']:.3f}"
        )
        records.append(record)
        init = _round_policy(config, rdir, init)
    return records


def _round_policy(config, rdir: Path, init) -> str:
    """M_r: the round's DPO run, or with LoRA its adapters merged into M_{r-1} (a LoRA
    run's checkpoints hold only the trained leaves)."""
    from lov_jax.lora import adapters

    if adapters.from_config(config.get("lora")) is None:
        return str(rdir / "train")
    merged = rdir / "merged"
    if not (merged / "config.json").exists():
        from lov_jax.lora.runs import orbax_to_peft

        orbax_to_peft(rdir / "train", merged, merge=True, base=init, overwrite=True)
    return str(merged)


def _round_loop_config(lc, r: int):
    out = copy.deepcopy(lc)
    out.seed = lc.seed * 1000 + r
    return out


def _mean(values: Sequence[float]) -> float:
    return float(np.mean(values)) if values else float("nan")


def _write_jsonl(path: Path, rows: Sequence[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmp.replace(path)


# ---- synthetic preferences (the embedded shapes data) -------------------------------------


def answer_swap_pairs(records: Sequence[dict], seed: int = 0) -> list[dict]:
    """Single-turn LLaVA records with a `task` -> DPO records: chosen the record's answer,
    rejected another answer of the same task seen in `records` (a correct vs a wrong
    answer)."""
    rng = random.Random(seed)
    answers: dict[str, set[str]] = {}
    for r in records:
        answers.setdefault(r["task"], set()).add(r["conversations"][1]["value"])
    out = []
    for r in records:
        q, a = r["conversations"][0]["value"], r["conversations"][1]["value"]
        wrong = sorted(answers[r["task"]] - {a})
        if not wrong:
            continue
        media = {k: r[k] for k in ("image", "video") if k in r}
        out.append({"id": r["id"], **media, "prompt": q, "chosen": a,
                    "rejected": rng.choice(wrong), "task": r["task"]})  # fmt: skip
    return out


def preference_accuracy(params, cfg, tokenizer, pairs: Sequence[dict], config) -> dict:
    """Fraction of pairs whose chosen answer the model gives a higher summed log-prob than
    the rejected one (no reference: the model's own preference), per `task` and "all".
    Media paths are under `config.data`'s folders; one pair per row, `rows_per_host` rows
    per call."""
    import jax

    from data_pipelines import packing, sources
    from lov_jax import sharding
    from lov_jax.post import dpo
    from lov_jax.post.train import global_batch, pair_process

    data = config.data
    options = dpo.DPOOptions.from_config(config.dpo)
    loss_tokens = config.train.get("loss_tokens_per_row", 0)
    trainer = dpo.DPOTrainer(cfg, config.optim, options, sharding.mesh_from_config(config.mesh),
                             1, config.train.loss_chunk, loss_tokens)  # fmt: skip
    process = pair_process(config, cfg, tokenizer, options)
    pack = packing.PackConfig(data.seq_len, data.max_crops, pad_id=cfg.ids.pad)
    params = trainer.place_reference(params)
    wins: dict[str, list[float]] = {}
    for start in range(0, len(pairs), data.rows_per_host):
        chunk = pairs[start : start + data.rows_per_host]
        batch = packing.empty_rows(data.rows_per_host, pack, cfg)
        for b, rec in enumerate(chunk):
            rec = sources.resolve_media(rec, data.image_folder or None, data.video_folder or None)
            packing.write_row(batch, b, [process(rec)], pack, cfg)
        host = {k: v[None] for k, v in batch.items()}  # A = 1
        dpo.check_row_budgets(host, options.max_pairs_per_row, loss_tokens)
        logps = jax.device_get(trainer.reference_logps(params, global_batch(host, trainer)))
        for b, rec in enumerate(chunk):
            win = float(logps[0, b, 0, 0] > logps[0, b, 0, 1])
            wins.setdefault(rec.get("task", "all"), []).append(win)
    every = [w for v in wins.values() for w in v]
    return {"all": _mean(every), **{t: _mean(v) for t, v in sorted(wins.items())}}
