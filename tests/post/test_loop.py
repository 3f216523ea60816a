"""DPO runs, the iterative loop and critic judging on the demo model and the shapes data.

The policy is the `demo` fixture's stage-2 checkpoint (tests/post/conftest.py);
preferences come from the synthetic tasks.
"""

from __future__ import annotations

import json
import math

import pytest

from lov_jax.post import critic, loop, shapes


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_shapes_dpo_round_raises_preference_accuracy(demo, lora):
    out = demo["out"] / f"shapes_dpo_{'lora' if lora else 'full'}"
    report = shapes.run_shapes_dpo(demo["stage2"], demo["data"], out, steps=6, seed=3, lora=lora)
    before, after = report["before"], report["after"]
    print(json.dumps({k: report[k] for k in ("before", "after")}, indent=1))
    assert report["test_pairs"] >= 6 and report["train_pairs"] > 20
    assert after["preference_accuracy"]["all"] > before["preference_accuracy"]["all"]
    assert after["task_accuracy"]["mean"] >= before["task_accuracy"]["mean"]
    assert set(report["last_train_metrics"]) >= set(
        ["loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
         "logps/chosen", "logps/rejected"])  # fmt: skip
    # the round's artefacts
    assert json.loads((out / "report.json").read_text())["after"] == after
    assert len((out / "pairs_train.jsonl").read_text().splitlines()) == report["train_pairs"]
    assert (out / "dpo" / "checkpoints" / "6").is_dir()
    if lora:  # the PEFT adapter dir and the merged HF dir the "after" figures come from
        from lov_jax.convert import orbax_io

        stored = orbax_io.param_metadata(orbax_io.resolve_checkpoint(out / "dpo"))
        assert all(p.startswith("multi_modal_projector/") or p.endswith(("/lora_a", "/lora_b"))
                   for p in stored), sorted(stored)  # fmt: skip
        adapter = json.loads((out / "peft_adapter" / "adapter_config.json").read_text())
        assert adapter["r"] == shapes.LORA["r"] and adapter["peft_type"] == "LORA"
        assert (out / "peft_adapter" / "adapter_model.safetensors").exists()
        assert report["policy"] == str(out / "dpo_merged")
        assert (out / "dpo_merged" / "config.json").exists()


def test_precomputed_reference_equals_the_reference_in_the_step(demo, tmp_path):
    from lov_jax.post.train import REF_FILE, run_dpo

    pairs = loop.answer_swap_pairs(json.loads((demo["data"] / "test.json").read_text()))
    path = tmp_path / "pairs.json"
    path.write_text(json.dumps(pairs))
    runs = {}
    for mode in ("step", "precomputed"):
        c = shapes.shapes_dpo_config(demo["stage2"], demo["data"], path, steps=2)
        c.dpo.reference = mode
        runs[mode] = run_dpo(c, tmp_path / mode, progress=False).metrics
    assert (tmp_path / "precomputed" / REF_FILE).exists()
    # step 1: policy == reference, so the loss is log 2 only if the stored logps are right
    assert runs["precomputed"][1]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    for step in (1, 2):
        for key in ("loss", "grad_norm", "rewards/margins", "logps/chosen"):
            assert runs["precomputed"][step][key] == pytest.approx(
                runs["step"][step][key], abs=1e-5), (step, key)  # fmt: skip
    # resuming a finished run trains nothing more
    c = shapes.shapes_dpo_config(demo["stage2"], demo["data"], path, steps=2)
    again = run_dpo(c, tmp_path / "step", progress=False)
    assert again.resumed_from == 2 and again.metrics == {}


def _prompts(demo, n=6):
    recs = json.loads((demo["data"] / "test.json").read_text())
    out = []
    for r in recs[:n]:
        row = {"id": r["id"], "question": r["conversations"][0]["value"],
               "answer": r["conversations"][1]["value"]}  # fmt: skip
        row.update({k: r[k] for k in ("image", "video") if k in r})
        out.append(row)
    return out


def test_loop_runs_end_to_end_and_resumes(demo, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    rows = _prompts(demo)
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    answers = {r["id"]: r["answer"] for r in rows}
    calls = []

    def sampler(ckpt, lc, image_folder, video_folder):
        generate = loop.model_sampler(ckpt, lc, image_folder, video_folder)

        def wrapped(batch, index):
            calls.append((str(ckpt), len(batch)))
            texts = generate(batch, index)
            assert len(texts) == len(batch) * lc.samples_per_prompt
            # the barely trained policy is never right: its first sample per prompt is
            # replaced by the answer, so that the rule judge has a best and a worst
            k = lc.samples_per_prompt
            return [answers[p["id"]] if j == 0 else texts[i * k + j]
                    for i, p in enumerate(batch) for j in range(k)]  # fmt: skip

        return wrapped

    c = shapes.shapes_dpo_config(demo["stage2"], demo["data"], "", steps=1)
    c.loop.update(rounds=2, samples_per_prompt=2, temperature=1.0, max_new_tokens=3,
                  batch_size=4, judge="rule")  # fmt: skip
    records = loop.run_loop(c, tmp_path / "loop", prompts, sampler=sampler)
    assert [r["round"] for r in records] == [1, 2]
    assert records[1]["init"] == str(tmp_path / "loop" / "round_1" / "train")
    for r in records:
        assert r["samples"] == 12 and r["pairs"] + r["ties"] == 6 and r["pairs"] >= 1
        assert r["steps"] == 1 and "rewards/accuracies" in r["last_metrics"]
    lines = (tmp_path / "loop/round_1/pairs.jsonl").read_text().splitlines()
    pairs = [json.loads(x) for x in lines]
    assert all(p["chosen"] == answers[p["id"]] and p["scores"] == [1.0, 0.0] for p in pairs)
    assert {ck for ck, _ in calls} == {str(demo["stage2"]), records[1]["init"]}

    # resume: round 1 is done; round 2 lost its record and pairs, keeps samples and training
    (tmp_path / "loop/round_2/round.json").unlink()
    (tmp_path / "loop/round_2/pairs.jsonl").unlink()
    calls.clear()
    again = loop.run_loop(c, tmp_path / "loop", prompts, sampler=sampler)
    assert calls == [] and again[1]["pairs"] == records[1]["pairs"]
    assert again[1]["steps"] == 1


def test_loop_config_and_prompt_errors(demo, tmp_path):
    c = shapes.shapes_dpo_config(demo["stage2"], demo["data"], "", steps=1)
    c.loop.judge = "gpt"
    with pytest.raises(ValueError, match="loop.judge"):
        loop.check_loop_config(c)
    c.loop.judge = "critic"
    with pytest.raises(ValueError, match="loop.critic"):
        loop.check_loop_config(c)
    bad = tmp_path / "p.jsonl"
    bad.write_text('{"id": "a", "question": "q"}\n{"id": "a", "question": "r"}\n')
    with pytest.raises(ValueError, match=r"p.jsonl:2: duplicate id"):
        loop.read_prompts(bad)
    with pytest.raises(ValueError, match="needs an 'answer'"):
        loop.rule_score({"id": "x"}, "red")


def test_critic_prompts_and_parsing():
    p = critic.pointwise_prompt("What is it?", "A cat.")
    assert p.endswith("Question: [What is it?]\nThe LMM response: [A cat.]\nASSISTANT:\n ")
    assert "quality of answer answers" in p
    q = critic.pairwise_prompt("Q", "one", "two")
    assert "The first response: [one]\nThe second response: [two]\nASSISTANT:\n" in q
    assert critic.parse_score("The response deserves 85/100 because ...") == 85.0
    assert critic.parse_score("I would rate it 72 out of 100.") == 72.0
    assert critic.parse_score("Score: 64. The answer ...") == 64.0
    assert critic.parse_score("Overall score is 250") is None  # out of range
    assert critic.parse_score("A fine answer.") is None
    assert critic.parse_preference("The first response is better because ...") == 1
    assert critic.parse_preference("Overall, Response 2 is more accurate.") == 2
    assert critic.parse_preference("The better answer is the second one.") == 2
    assert critic.parse_preference("Both answers are equal; it is a tie.") == 0
    assert critic.parse_preference("Hard to say.") is None


def test_judge_is_batched_sharded_resumable_and_counts_unparsable(tmp_path):
    recs = [{"id": f"r{i}", "prompt": f"<image>\nq{i}", "image": f"img{i}.png",
             "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(5)]  # fmt: skip
    path = tmp_path / "pairs.json"
    path.write_text(json.dumps(recs))
    items = critic.read_judge_records(path, "pointwise", media_root="/m")
    assert len(items) == 10 and items[1]["id"] == "r0#1" and items[0]["images"] == ["/m/img0.png"]
    assert "Question: [q0]" in items[0]["text"]
    seen = []

    def generate(batch):
        seen.extend(it["id"] for it in batch)
        return ["Score: 80" if it["response_index"] == 0 else "no idea" for it in batch]

    out = tmp_path / "judged"
    for index in (0, 1):  # two processes, each its share
        critic.judge(items, generate, out, "pointwise", batch_size=3, process_index=index,
                     process_count=2)  # fmt: skip
    assert sorted(seen) == sorted(it["id"] for it in items)
    assert len(list((out / "shards").glob("*.jsonl"))) == 2
    summary = critic.summarize(items, out, "pointwise")
    assert summary["judged"] == 10 and summary["unparsable"] == 5
    seen.clear()
    again = critic.judge(items, generate, out, "pointwise")  # resume: nothing left
    assert seen == [] and again == {"assigned": 10, "judged": 0, "resumed": 10}
    rows = [json.loads(x) for x in (out / "judgements.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == [it["id"] for it in items]
    assert [r["parsed"] for r in rows[:2]] == [80.0, None]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "x", "prompt": "q"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:1: record 'x' needs 'responses'"):
        critic.read_judge_records(bad, "pairwise")


def test_judge_command_on_a_checkpoint(demo, tmp_path):
    from lov_jax.cli import main

    recs = [{"id": "a", "prompt": "What colour?", "image": "media/" + _first_image(demo),
             "responses": ["red", "blue"]}]  # fmt: skip
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps(recs[0]) + "\n")
    argv = ["judge", "--ckpt", str(demo["stage2"]), "--pairs", str(path), "--out",
            str(tmp_path / "j"), "--mode", "pairwise", "--media-root", str(demo["data"]),
            "--max-new-tokens", "4"]  # fmt: skip
    assert main(argv) == 0
    summary = json.loads((tmp_path / "j" / "summary.json").read_text())
    assert summary["judged"] == 1
    assert summary["unparsable"] + summary["first_better"] + summary["second_better"] + \
        summary["ties"] == 1  # fmt: skip


def _first_image(demo) -> str:
    recs = json.loads((demo["data"] / "test.json").read_text())
    ref = next(r["image"] for r in recs if isinstance(r.get("image"), str))
    return ref.removeprefix("media/")
