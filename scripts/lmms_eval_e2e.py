"""lmms-eval's own `openai` model against `lov-jax serve`, scored like `lov-jax eval`.

    scripts/lmms_eval_e2e.sh [WORKDIR]     (installs lmms-eval into a throwaway venv)

On a tiny random checkpoint (built locally) and a small local task (PNG images + jsonl,
no hub access): lmms-eval sends each document to the server as chat completions with
base64 PNG data URIs (`--model openai`, num_concurrent > 1, so the server batches), and
scores the answers with its built-in `exact_match`; `lov-jax eval` runs the same
records in-process. Half the golds are the model's own greedy answers (so the score is
neither 0 nor 1 by construction). Prints both scores and the per-document answers; exits
non-zero when they differ.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

N_DOCS, MAX_NEW = 8, 3
UTILS = """
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).parent


def doc_to_visual(doc):
    return [Image.open(ROOT / doc["image"]).convert("RGB")] if doc.get("image") else []


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["question"]
"""


def task_yaml(data: Path) -> str:
    return f"""task: lovjax_tiny
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_target: answer
generation_kwargs:
  max_new_tokens: {MAX_NEW}
  temperature: 0
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""


def main(work: Path, lmms_python: str) -> int:
    import numpy as np
    from PIL import Image

    from lov_jax.inference import Prompter, generate
    from lov_jax.pretrained import load_pretrained
    from lov_jax.testing.hf_checkpoints import make_tiny_hf

    work.mkdir(parents=True, exist_ok=True)
    ckpt = work / "ckpt"
    if not (ckpt / "config.json").exists():
        make_tiny_hf(ckpt, tie_word_embeddings=False, seed=3)
    tasks = work / "tasks" / "lovjax_tiny"
    tasks.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    questions = ["What shape is this?", "What colour is it?", "How many objects?", "Describe it."]
    records = []
    for k in range(N_DOCS):
        h, w = [(40, 56), (33, 33), (60, 30), (48, 64)][k % 4]
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(tasks / f"{k}.png")
        # Odd documents are text-only (a random tiny model answers every image alike).
        image = {"image": f"{k}.png"} if k % 2 == 0 else {}
        records.append({"id": str(k), **image, "question": f"{questions[k % 4]} ({k})"})
    # Golds: the model's own greedy answer for half the documents, a wrong one for the rest.
    cfg, params = load_pretrained(ckpt)
    prompter = Prompter.from_checkpoint(ckpt)
    for k, r in enumerate(records):
        images = [str(tasks / r["image"])] if "image" in r else []
        text = generate(params, cfg, (r["question"], images, []), prompter=prompter,
                        max_new_tokens=MAX_NEW)  # fmt: skip
        r["answer"] = text if k % 4 < 2 else "not the answer"
    data = tasks / "records.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    (tasks / "utils.py").write_text(UTILS)
    (tasks / "lovjax_tiny.yaml").write_text(task_yaml(data))
    spec = work / "lov_task.yaml"
    spec.write_text(json.dumps({"task": "lovjax_tiny", "data": str(data), "metric": "exact_match",
                                "post_prompt": "", "max_new_tokens": MAX_NEW}))  # fmt: skip

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    lov = [sys.executable, "-m", "lov_jax.cli"]
    log = open(work / "serve.log", "w")  # noqa: SIM115 - closed below
    server = subprocess.Popen(
        [*lov, "serve", "--ckpt", str(ckpt), "--port", str(port), "--model-name", "tiny-ov",
         "--slots", "4", "--context", "2112", "--length-buckets", "64,2048",
         "--warmup-crops", "2"], stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 900
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5)
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    print((work / "serve.log").read_text()[-3000:])
                    return 2
                time.sleep(1)
        out = work / "lmms_out"
        env = {**os.environ, "OPENAI_API_KEY": "EMPTY", "HF_HUB_OFFLINE": "1",
               "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}  # fmt: skip
        t0 = time.perf_counter()
        subprocess.run(
            [lmms_python, "-m", "lmms_eval", "--model", "openai", "--model_args",
             f"model_version=tiny-ov,base_url=http://127.0.0.1:{port}/v1,num_concurrent=4",
             "--tasks", "lovjax_tiny", "--include_path", str(tasks.parent), "--batch_size", "1",
             "--output_path", str(out), "--log_samples"],
            check=True, env=env,
        )  # fmt: skip
        lmms_s = time.perf_counter() - t0
    finally:
        server.terminate()
        server.wait(timeout=60)
        log.close()
    ours = work / "lov_out"
    subprocess.run([*lov, "eval", "--ckpt", str(ckpt), "--task", str(spec), "--out", str(ours)],
                   check=True)  # fmt: skip

    results = json.loads(next(out.rglob("*_results.json")).read_text())
    lmms_score = results["results"]["lovjax_tiny"]["exact_match,none"]
    lmms_samples = [json.loads(line) for line in next(out.rglob("*lovjax_tiny*.jsonl")).open()]
    lmms_answers = {}
    for s in lmms_samples:
        resp = s["filtered_resps"]
        lmms_answers[str(s["doc_id"])] = resp[0] if isinstance(resp, list) else resp
    ours_results = json.loads(next(ours.rglob("results.json")).read_text())
    our_score = _find_score(ours_results)
    our_answers = _our_answers(ours)
    print(f"lmms-eval (openai model -> lov-jax serve): exact_match = {lmms_score}  "
          f"({len(lmms_samples)} docs, {lmms_s:.1f} s)")  # fmt: skip
    print(f"lov-jax eval (in-process):                  exact_match = {our_score}")
    same = {k: lmms_answers.get(k) == v for k, v in our_answers.items()}
    print(f"identical answers: {sum(same.values())}/{len(same)}")
    for k in sorted(our_answers, key=int):
        print(f"  doc {k}: lmms-eval {lmms_answers.get(k)!r}  lov-jax {our_answers[k]!r}")
    ok = abs(lmms_score - our_score) < 1e-9 and all(same.values()) and len(same) == N_DOCS
    print("MATCH" if ok else "MISMATCH")
    return 0 if ok else 1


def _find_score(results: dict) -> float:
    """The exact_match aggregate of lov-jax eval's results.json (lmms-eval's layout)."""
    return float(results["results"]["lovjax_tiny"]["exact_match,none"])


def _our_answers(out: Path) -> dict[str, str]:
    path = next(p for p in out.rglob("*.jsonl") if "sample" in p.name)
    answers = {}
    for line in path.open():
        s = json.loads(line)
        doc = str(s.get("doc_id", s.get("id", ""))).split(":")[-1]
        answers[doc] = s.get("filtered_resps", s.get("prediction", s.get("resps")))
        if isinstance(answers[doc], list):
            answers[doc] = answers[doc][0]
    return answers


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]), sys.argv[2]))
