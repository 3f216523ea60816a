"""DPO on the embedded shapes data: one round from a demo stage-2 checkpoint.

Preferences come from the synthetic tasks (`loop.answer_swap_pairs`): chosen the correct
answer, rejected a wrong answer of the same task. Measured before and after the round on
the held-out test split: the preference accuracy (the model's own summed log-prob of the
correct answer above the wrong one, `loop.preference_accuracy`) and the task accuracy
(greedy exact match through the eval runner, as `lov-jax demo` reports it).
`run_shapes_dpo` writes `<out>/report.json`.

`lora=True`: the same round through LoRA adapters (configs/lora.py's recipe scaled to the
64-wide demo LLM: r 8, alpha 16, dropout 0.05 on its projections; the projector trained
fully, the tower frozen). The run is then exported as `lov-jax convert orbax-to-peft`
exports it: the PEFT adapter dir `<out>/peft_adapter` and the merged HF dir
`<out>/dpo_merged`, which the "after" figures are measured on.

    python -m lov_jax.post.shapes --stage2 DEMO/stage2_ov --data DEMO/data --out DIR [--lora]
"""

from __future__ import annotations

import json
import time
from pathlib import Path

LORA_LR = 2e-3  # the adapters (full DPO: 2e-4 over the whole LLM)
LORA = {"r": 8, "alpha": 16.0, "dropout": 0.05}  # the demo LLM is 64 wide: r 128 would be 2x it


def shapes_dpo_config(stage2: str | Path, data: str | Path, pairs: str | Path, steps: int,
                      seed: int = 0, lora: bool = False):  # fmt: skip
    """configs/dpo.py at the demo's scale: its rows, templates and devices (configs/demo.py),
    larger learning rates (the demo model is small and barely trained), `steps` steps;
    `lora`: through adapters (`LORA`, configs/lora.py's trained groups)."""
    from configs import dpo as recipe

    c = recipe.get_config("demo")
    c.init_from = str(stage2)
    c.data.train_path = str(pairs)
    c.data.image_folder = c.data.video_folder = str(data)
    c.data.system_prompt = ""  # as the demo's stage 2 (prompts as the HF template renders)
    c.data.seed = c.train.seed = seed
    c.data.seq_len, c.data.max_crops, c.data.rows_per_host = 1024, 24, 4
    c.data.frames_upbound = 4
    c.mesh.num_devices = 1
    c.optim.lr, c.optim.vision_lr, c.optim.grad_accum = 2e-4, 2e-5, 1
    c.train.num_steps = c.train.ckpt_every = steps
    c.train.ckpt_keep = 1
    c.train.loss_chunk = 128
    c.train.loss_tokens_per_row = 96  # only the answers' targets go through the vocab
    c.dpo.max_pairs_per_row = 12  # 1024-token rows hold up to ~8 pairs here
    if lora:
        c.lora.update(enabled=True, seed=seed, **LORA)
        c.optim.trainable = ("projector", "llm")  # the LLM through its adapters
        c.optim.lr, c.optim.projector_lr = LORA_LR, 2e-4
    return c


def _task_accuracy(ckpt: Path, data: Path, out: Path) -> dict:
    from lov_jax.demo import write_eval_tasks
    from lov_jax.eval.runner import ModelPredictor, run_eval
    from lov_jax.inference.prompting import Prompter
    from lov_jax.pretrained import load_pretrained

    cfg, params = load_pretrained(ckpt)
    tasks = out / "eval_tasks"
    tasks.mkdir(parents=True, exist_ok=True)
    results = run_eval(write_eval_tasks(data, tasks), out / "eval",
                       ModelPredictor(params, cfg, Prompter.from_checkpoint(ckpt)),
                       batch_size=16, log=lambda s: None)  # fmt: skip
    table = {r["task"].removeprefix("shapes_"): r["value"] for r in results["table"]}
    return {"mean": sum(table.values()) / len(table), **table}


def _pref_accuracy(ckpt: Path, pairs: list[dict], config) -> dict:
    from lov_jax.post.loop import preference_accuracy
    from lov_jax.pretrained import load_pretrained, load_tokenizer

    cfg, params = load_pretrained(ckpt)
    return preference_accuracy(params, cfg, load_tokenizer(ckpt), pairs, config)


def run_shapes_dpo(stage2: str | Path, data: str | Path, out: str | Path, steps: int = 60,
                   seed: int = 0, lora: bool = False) -> dict:  # fmt: skip
    """Pairs from `data`/train.json, one DPO round of `steps` from `stage2` (through LoRA
    adapters with `lora`), figures on `data`/test.json before and after; returns (and
    writes) the report."""
    from lov_jax.lora.runs import orbax_to_peft
    from lov_jax.post.loop import answer_swap_pairs
    from lov_jax.post.train import run_dpo

    stage2, data, out = Path(stage2), Path(data), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    single_turn = lambda rs: [r for r in rs if len(r["conversations"]) == 2]  # noqa: E731
    train = answer_swap_pairs(single_turn(json.loads((data / "train.json").read_text())), seed)
    test = answer_swap_pairs(single_turn(json.loads((data / "test.json").read_text())), seed + 1)
    pairs_path = out / "pairs_train.jsonl"
    pairs_path.write_text("".join(json.dumps(p) + "\n" for p in train))
    config = shapes_dpo_config(stage2, data, pairs_path, steps, seed, lora)
    t0 = time.time()
    before = {"preference_accuracy": _pref_accuracy(stage2, test, config),
              "task_accuracy": _task_accuracy(stage2, data, out / "before")}  # fmt: skip
    t1 = time.time()
    result = run_dpo(config, out / "dpo", progress=False)
    policy = out / "dpo"
    if lora:  # a LoRA run holds adapters + projector: exported, then measured merged
        orbax_to_peft(policy, out / "peft_adapter", overwrite=True)
        orbax_to_peft(policy, out / "dpo_merged", merge=True, overwrite=True)
        policy = out / "dpo_merged"
    t2 = time.time()
    after = {"preference_accuracy": _pref_accuracy(policy, test, config),
             "task_accuracy": _task_accuracy(policy, data, out / "after")}  # fmt: skip
    last = result.metrics[max(result.metrics)] if result.metrics else {}
    seconds = {"measure": t1 - t0, "dpo": t2 - t1, "total": time.time() - t0}
    report = {"steps": steps, "lora": lora, "seed": seed, "train_pairs": len(train),
              "test_pairs": len(test), "before": before, "after": after,
              "first_train_metrics": result.metrics.get(1, {}), "last_train_metrics": last,
              "policy": str(policy), "seconds": seconds}  # fmt: skip
    (out / "report.json").write_text(json.dumps(report, indent=1))
    return report


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(description="One DPO round on the shapes data (figures)")
    p.add_argument("--stage2", required=True, help="the demo's stage-2 run (DEMO/stage2_ov)")
    p.add_argument("--data", required=True, help="the demo's shapes data (DEMO/data)")
    p.add_argument("--out", required=True, help="a new directory for the round")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lora", action="store_true", help="through LoRA adapters")
    args = p.parse_args(argv)
    report = run_shapes_dpo(args.stage2, args.data, args.out, args.steps, args.seed, args.lora)
    print_report(report)
    return 0


def print_report(report: dict) -> None:
    kind = "LoRA" if report["lora"] else "full fine-tuning"
    print(
        f"shapes DPO round, {kind}: {report['steps']} steps, seed {report['seed']}, "
        f"{report['train_pairs']} train pairs, {report['test_pairs']} held-out pairs"
    )
    for name in ("preference_accuracy", "task_accuracy"):
        before, after = report["before"][name], report["after"][name]
        head = "all" if name == "preference_accuracy" else "mean"
        tasks = [k for k in before if k != head]
        print(
            f"  {name:19s} {before[head]:.3f} -> {after[head]:.3f}   "
            + ", ".join(f"{t} {before[t]:.2f}->{after[t]:.2f}" for t in tasks)
        )
    first, last = report["first_train_metrics"], report["last_train_metrics"]
    if last:
        print(
            f"  train loss {first['loss']:.4f} -> {last['loss']:.4f}, "
            f"rewards/accuracies {first['rewards/accuracies']:.3f} -> "
            f"{last['rewards/accuracies']:.3f}; {report['seconds']['total']:.0f}s"
        )


if __name__ == "__main__":
    raise SystemExit(main())
