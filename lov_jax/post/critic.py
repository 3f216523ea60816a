"""LLaVA-Critic judging: the model card's pointwise / pairwise prompts, parsing, batched
resumable judging (`lov-jax judge`).

Prompts (REFERENCE_VIDEO_POST 4.7, from the lmms-lab/llava-critic-7b card): the text below
follows "<image>\\n" in one user turn of the checkpoint's chat template (`qwen_1_5`),
greedy decoding. Their quirks are kept: "quality of answer answers", the literal
"ASSISTANT:\\n" inside the user turn, the pointwise prompt's trailing space.

Parsing: the card does not say how a judgement becomes a number, and the training rows
were not readable (UNVERIFIED there), so the rule here is ours and stated: pointwise, the
first "N/100" or "N out of 100", else the first number after the word "score", kept if in
[0, 100]; pairwise, which of "first" / "second" (or "response 1" / "2", "answer 1" / "2")
the text names as better, "tie" when it says both are equal. Anything else is unparsable
(None) and counted, never guessed.

Judging input (`--pairs FILE`, json / jsonl): records {"id", "image" | "images" | "video"
(optional), "question" | "prompt", "responses": [...]} or the DPO layout {"chosen",
"rejected"} (responses = [chosen, rejected]). Pointwise scores every response (row id
"<id>#<k>"); pairwise compares responses 0 and 1 (row id "<id>").
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

POINTWISE = (
    "Given an image and a corresponding question, please serve as an unbiased and fair judge "
    "to evaluate the quality of answer answers provided by a Large Multimodal Model (LMM). "
    "Score the response out of 100 and explain your reasoning with specific details. Your "
    "task is provided as follows:\nQuestion: [{question}]\nThe LMM response: [{response}]\n"
    "ASSISTANT:\n "
)
PAIRWISE = (
    "Given an image and a corresponding question, please serve as an unbiased and fair judge "
    "to evaluate the quality of the answers provided by a Large Multimodal Model (LMM). "
    "Determine which answer is better and explain your reasoning with specific details. Your "
    "task is provided as follows:\nQuestion: [{question}]\nThe first response: [{response_1}]"
    "\nThe second response: [{response_2}]\nASSISTANT:\n"
)
MODES = ("pointwise", "pairwise")


def pointwise_prompt(question: str, response: str) -> str:
    return POINTWISE.format(question=question, response=response)


def pairwise_prompt(question: str, response_1: str, response_2: str) -> str:
    return PAIRWISE.format(question=question, response_1=response_1, response_2=response_2)


_OUT_OF = re.compile(r"(\d+(?:\.\d+)?)\s*(?:/|out of)\s*100\b", re.IGNORECASE)
_SCORE = re.compile(r"\bscore\b[^0-9]{0,24}?(\d+(?:\.\d+)?)", re.IGNORECASE)
_TIE = re.compile(r"\b(tie|equally good|equally well|both (?:responses|answers) are equal)",
                  re.IGNORECASE)  # fmt: skip
_BETTER = re.compile(
    r"\b(first|second|response\s*([12])|answer\s*([12]))\b[^.]{0,40}?\b(?:is|was)\s+"
    r"(?:better|superior|preferred|more accurate)", re.IGNORECASE,
)  # fmt: skip
_BETTER_AFTER = re.compile(
    r"\b(?:better|preferred|superior)\b[^.]{0,20}?\b(?:is|:)\s*(?:the\s+)?"
    r"(first|second|response\s*([12])|answer\s*([12]))\b", re.IGNORECASE,
)  # fmt: skip


def parse_score(text: str) -> float | None:
    """A pointwise judgement -> its score in [0, 100], or None (unparsable)."""
    for pattern in (_OUT_OF, _SCORE):
        m = pattern.search(text)
        if m:
            value = float(m.group(1))
            return value if 0.0 <= value <= 100.0 else None
    return None


def parse_preference(text: str) -> int | None:
    """A pairwise judgement -> 1 (first better), 2 (second better), 0 (tie) or None."""
    for pattern in (_BETTER, _BETTER_AFTER):
        m = pattern.search(text)
        if m:
            which = m.group(1).lower()
            digit = m.group(2) or m.group(3)
            return 1 if which == "first" or digit == "1" else 2
    return 0 if _TIE.search(text) else None


# ---- judging input -----------------------------------------------------------------------


def judge_items(record: dict, mode: str, where: str) -> list[dict]:
    """One input record -> the prompts to judge: [{"id", "response_index", "text",
    "images", "videos"}]; a ValueError names the record (`where`) and the field."""
    if mode not in MODES:
        raise ValueError(f"judge mode {mode!r} not in {MODES}")
    rid = record.get("id")
    question = record.get("question", record.get("prompt"))
    if rid is None or not isinstance(question, str):
        raise ValueError(f"{where}: a judge record needs 'id' and a string 'question'/'prompt'")
    question = question.replace("<image>", "").strip()
    if "responses" in record:
        responses = record["responses"]
    elif "chosen" in record and "rejected" in record:
        responses = [record["chosen"], record["rejected"]]
    else:
        raise ValueError(f"{where}: record {rid!r} needs 'responses' or 'chosen'/'rejected'")
    if not isinstance(responses, list) or not all(isinstance(r, str) for r in responses):
        raise ValueError(f"{where}: record {rid!r}: 'responses' must be a list of strings")
    images = record.get("images", record.get("image", []))
    images = [images] if isinstance(images, str) else list(images or [])
    videos = [record["video"]] if record.get("video") else []
    media = {"images": images, "videos": videos}
    if mode == "pointwise":
        return [{"id": f"{rid}#{k}", "record": str(rid), "response_index": k,
                 "text": pointwise_prompt(question, r), **media}
                for k, r in enumerate(responses)]  # fmt: skip
    if len(responses) < 2:
        raise ValueError(f"{where}: record {rid!r}: pairwise judging needs two responses")
    text = pairwise_prompt(question, responses[0], responses[1])
    return [{"id": str(rid), "record": str(rid), "response_index": None, "text": text, **media}]


def read_judge_records(path: str | Path, mode: str, media_root: str | None = None) -> list[dict]:
    """Every prompt to judge in a json / jsonl file, in file order."""
    path = Path(path)
    text = path.read_text()
    if path.suffix == ".jsonl":
        rows = []
        for n, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    rows.append((f"{path}:{n}", json.loads(line)))
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path}:{n}: not JSON: {err}") from err
    else:
        data = json.loads(text)
        if not isinstance(data, list):
            raise ValueError(f"{path}: expected a JSON list of records")
        rows = [(f"{path}[{i}]", r) for i, r in enumerate(data)]
    items = []
    for where, rec in rows:
        if not isinstance(rec, dict):
            raise ValueError(f"{where}: a record must be an object")
        for item in judge_items(rec, mode, where):
            if media_root:
                item["images"] = [os.path.join(media_root, p) for p in item["images"]]
                item["videos"] = [os.path.join(media_root, p) for p in item["videos"]]
            items.append(item)
    return items


# ---- batched, sharded, resumable judging --------------------------------------------------


def _shard_file(out_dir: Path, index: int, count: int) -> Path:
    return out_dir / "shards" / f"judge.rank{index:05d}-of-{count:05d}.jsonl"


def read_judged(out_dir: str | Path) -> dict[str, dict]:
    """Rows already judged in any shard file (a torn last line is ignored)."""
    rows: dict[str, dict] = {}
    for path in sorted((Path(out_dir) / "shards").glob("judge.rank*.jsonl")):
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            rows.setdefault(row["id"], row)
    return rows


def judge(
    items: Sequence[dict],
    generate: Callable[[Sequence[dict]], list[str]],
    out_dir: str | Path,
    mode: str,
    *,
    batch_size: int = 8,
    process_index: int = 0,
    process_count: int = 1,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Judge this process's items not yet judged (item k goes to process k % n), appending
    rows (fsynced per batch) to its shard; `summarize` merges the shards afterwards.
    `generate(items) -> texts` is the critic (greedy). Returns this shard's counts."""
    out_dir = Path(out_dir)
    parse = parse_score if mode == "pointwise" else parse_preference
    done = read_judged(out_dir)
    mine = [it for k, it in enumerate(items) if k % process_count == process_index]
    todo = [it for it in mine if it["id"] not in done]
    path = _shard_file(out_dir, process_index, process_count)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():  # drop a torn tail left by a crash
        data = path.read_bytes()
        if data and not data.endswith(b"\n"):
            path.write_bytes(data[: data.rfind(b"\n") + 1])
    with path.open("a") as f:
        for start in range(0, len(todo), batch_size):
            batch = todo[start : start + batch_size]
            for it, text in zip(batch, generate(batch), strict=True):
                value = parse(text)
                row = {"id": it["id"], "record": it["record"],
                       "response_index": it["response_index"], "judgement": text,
                       "mode": mode, "parsed": value}  # fmt: skip
                f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())
            log(f"[judge] {min(start + batch_size, len(todo))}/{len(todo)} judged")
    return {"assigned": len(mine), "judged": len(todo), "resumed": len(mine) - len(todo)}


def summarize(items: Sequence[dict], out_dir: str | Path, mode: str) -> dict[str, Any]:
    """Merge every shard present: `judgements.jsonl` (rows in input order) and
    `summary.json` (counts, unparsable included). Run once, after every process judged."""
    out_dir = Path(out_dir)
    rows = read_judged(out_dir)
    values = [rows[it["id"]]["parsed"] for it in items if it["id"] in rows]
    summary = {"mode": mode, "items": len(items), "judged": len(values),
               "unparsable": sum(v is None for v in values)}  # fmt: skip
    if mode == "pairwise":
        summary.update({"first_better": values.count(1), "second_better": values.count(2),
                        "ties": values.count(0)})  # fmt: skip
    ordered = [rows[it["id"]] for it in items if it["id"] in rows]
    (out_dir / "judgements.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ordered))
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def model_generate(params, cfg, prompter, *, max_new_tokens: int = 512, mesh=None):
    """`generate(items)` for `judge`: greedy answers of a checkpoint to the critic prompts."""
    from lov_jax.inference.engine import GenerationConfig, Generator

    generator = Generator(params, cfg, mesh=mesh)

    def generate(items):
        encoded = [prompter.encode(cfg, (it["text"], it["images"], it["videos"]))
                   for it in items]  # fmt: skip
        out = generator.generate(encoded, GenerationConfig(max_new_tokens=max_new_tokens))
        tok = prompter.tokenizer
        return [tok.decode(t, skip_special_tokens=True).strip() for t in out.tokens]

    return generate
