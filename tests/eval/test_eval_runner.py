"""Eval runner: task files, bad-record accounting, 2-process sharding, resume, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lov_jax.eval import runner
from lov_jax.eval.tasks import BadRecord, load_task, read_records

OPTS = ["dog", "cat", "bird", "fish"]


def _records(media: Path):
    Image.fromarray(np.zeros((40, 60, 3), np.uint8)).save(media / "ok.png")
    (media / "corrupt.png").write_bytes(b"not a png")
    recs = [
        {"id": "mc1", "question": "Which animal?", "image": "ok.png", "options": OPTS,
         "answer": "B", "metric": "mmbench"},
        {"id": "mc2", "question": "Which animal? 2", "images": ["ok.png", "ok.png"],
         "options": OPTS, "answer": "fish", "metric": "mmmu"},
        {"id": "vqa1", "question": "How many?", "image": "ok.png",
         "answers": ["2"] * 2 + ["3"] * 8, "metric": "vqav2_accuracy"},
        {"id": "doc1", "question": "Title?", "answer": "hello", "metric": "anls"},
        {"id": "chart1", "question": "Value?", "answer": "10", "metric": "chartqa"},
        {"id": "em1", "question": "Capital?", "answer": "Paris"},
        {"id": "missing1", "question": "Where?", "image": "nope.png", "answer": "x"},
        {"id": "noanswer", "question": "Where?"},
        {"id": "corrupt1", "question": "What?", "image": "corrupt.png", "answer": "x"},
    ]  # fmt: skip
    lines = [json.dumps(r) for r in recs]
    lines.insert(5, "{not json")
    return lines


# What the fake model answers, by question prefix, and the resulting scores.
ANSWERS = {
    "Which animal? 2": "(D)",  # mmmu -> D = fish: 1
    "Which animal?": "The answer is C",  # mmbench -> C != B: 0
    "How many?": "two",  # -> "2": 2 of 10 -> 0.6
    "Title?": "helo",  # anls 0.8
    "Value?": "10.4",  # relaxed 1
    "Capital?": "paris",  # exact match (ignore case) 1
}


class FakePredictor:
    def __init__(self, fail_after: int | None = None):
        self.calls, self.fail_after = [], fail_after

    def encode(self, request):
        for p in request.images:
            with Image.open(p) as im:
                im.load()
        return request

    def predict(self, encoded, max_new_tokens):
        if self.fail_after is not None and len(self.calls) >= self.fail_after:
            raise KeyboardInterrupt("preempted")
        self.calls += [r.id for r in encoded]
        return [next(v for k, v in ANSWERS.items() if r.question.startswith(k)) for r in encoded]


@pytest.fixture
def task(tmp_path):
    media = tmp_path / "media"
    media.mkdir()
    data = tmp_path / "mix.jsonl"
    data.write_text("\n".join(_records(media)) + "\n")
    spec = tmp_path / "mix.yaml"
    spec.write_text(f"task: mix\ndata: {data.name}\nmedia_root: media\nmax_new_tokens: 8\n"
                    "ignore_case: true\n")  # fmt: skip
    return spec


def _stable(results):
    return {k: v for k, v in results.items() if k != "config"}


def test_task_records_and_bad_inputs(task):
    spec = load_task(task)
    recs = read_records(spec)
    assert len(recs) == 10  # nothing dropped
    bad = {r.id: r.reason for r in recs if isinstance(r, BadRecord)}
    assert bad == {"missing1": "missing_media", "noanswer": "malformed_record",
                   "mix:5": "malformed_record"}  # fmt: skip
    mc = next(r for r in recs if r.id == "mc1")
    # lmms-eval's mmbench_doc_to_text layout (question, its options block, post prompt)
    assert mc.question == ("Which animal? There are several options:\nA. dog\nB. cat\nC. bird\n"
                           "D. fish\n\nAnswer with the option's letter from the given choices "
                           "directly.")  # fmt: skip


def test_run_eval_scores_and_reports(task, tmp_path):
    out = tmp_path / "out"
    logs = []
    results = runner.run_eval([task], out, FakePredictor(), batch_size=2, log=logs.append)
    res = results["results"]["mix"]
    # bad records score 0 under their record's metric (default exact_match); values are
    # named as lmms-eval names them, prefixed by the metric where two metrics share one
    assert res["gpt_eval_score,none"] == 0.0  # MMBench, percent
    assert res["mmmu_acc,none"] == 1.0
    assert res["vqav2_accuracy:exact_match,none"] == pytest.approx(0.6)
    assert res["anls,none"] == pytest.approx(0.8)
    assert res["relaxed_overall,none"] == 1.0
    assert res["exact_match:exact_match,none"] == pytest.approx(1 / 5)  # em1 + 4 bad records
    assert results["n-samples"]["mix"] == {"original": 10, "effective": 10}
    bad = results["bad_records"]["mix"]
    assert bad["count"] == 4 and set(bad["ids"]) == {"missing1", "noanswer", "mix:5", "corrupt1"}
    assert bad["by_reason"] == {"missing_media": 1, "malformed_record": 2, "bad_media": 1}
    assert any("corrupt1" in line and "bad_media" in line for line in logs)
    rows = [json.loads(x) for x in (out / "samples_mix.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows][:3] == ["mc1", "mc2", "vqa1"]
    assert {"id", "prompt", "prediction", "target", "score"} <= set(rows[0])
    assert rows[0]["parsed"] == "C" and rows[0]["target"] == "B"
    assert sum(r["n"] for r in results["table"]) == 10


def test_two_process_shards_merge_to_single_process_result(task, tmp_path):
    single = runner.run_eval([task], tmp_path / "one", FakePredictor(), log=lambda s: None)
    spec, out = load_task(task), tmp_path / "two"
    seen = []
    for rank in (0, 1):
        pred = FakePredictor()
        runner.evaluate_shard(spec, pred, out, process_index=rank, process_count=2,
                              log=lambda s: None)  # fmt: skip
        seen.append(set(pred.calls))
    assert seen[0] and seen[1] and not seen[0] & seen[1]
    agg = runner.aggregate_task(spec, runner.read_scored(out, "mix"))
    merged = runner.write_outputs(out, [spec], [agg], "lov_jax", {})
    assert _stable(merged) == _stable(single)
    one = tmp_path / "one" / "samples_mix.jsonl"
    assert (out / "samples_mix.jsonl").read_text() == one.read_text()


def test_resume_after_preemption_gives_same_aggregate(task, tmp_path):
    ref = runner.run_eval([task], tmp_path / "ref", FakePredictor(), batch_size=2,
                          log=lambda s: None)  # fmt: skip
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        runner.run_eval([task], out, FakePredictor(fail_after=2), batch_size=2,
                        log=lambda s: None)  # fmt: skip
    shard = runner.shard_path(out, "mix", 0, 1)
    done = {json.loads(x)["id"] for x in shard.read_text().splitlines()}
    assert 2 <= len(done) < 10
    with shard.open("a") as f:
        f.write(
            '{"id": "torn',
        )  # a write cut by the preemption
    again = FakePredictor()
    results = runner.run_eval([task], out, again, batch_size=2, log=lambda s: None)
    assert not set(again.calls) & done  # nothing scored twice
    assert results == ref
    assert (out / "results.json").read_text() == (tmp_path / "ref" / "results.json").read_text()
    # a third run scores nothing and changes nothing
    idle = FakePredictor()
    assert runner.run_eval([task], out, idle, log=lambda s: None) == ref and not idle.calls


def test_eval_cli_with_tiny_model(tmp_path):
    from lov_jax import cli
    from lov_jax.testing.hf_checkpoints import make_tiny_hf

    hf_dir = make_tiny_hf(tmp_path / "hf", seed=0)
    media = tmp_path / "m"
    media.mkdir()
    Image.fromarray(np.full((50, 70, 3), 128, np.uint8)).save(media / "a.png")
    recs = [
        {"id": "a", "question": "Color?", "image": "m/a.png", "answer": "gray"},
        {"id": "b", "question": "Pick", "options": OPTS, "answer": "A", "metric": "mmbench"},
        {"id": "c", "question": "Gone", "image": "m/zzz.png", "answer": "x"},
    ]
    data = tmp_path / "t.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    out = tmp_path / "out"
    argv = ["eval", "--ckpt", str(hf_dir), "--task", str(data), "--out", str(out),
            "--batch-size", "2"]  # fmt: skip
    assert cli.main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["n-samples"]["t"] == {"original": 3, "effective": 3}
    assert results["bad_records"]["t"]["ids"] == ["c"]
    rows = [json.loads(x) for x in (out / "samples_t.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == ["a", "b", "c"]
    assert all(isinstance(r["prediction"], str) for r in rows[:2])


class KeyedPredictor(FakePredictor):
    def __init__(self, fingerprint: str):
        super().__init__()
        self.fingerprint = fingerprint


def test_resume_keys_on_checkpoint_and_task_content(task, tmp_path):
    out, logs = tmp_path / "out", []
    scored = {"mc1", "mc2", "vqa1", "doc1", "chart1", "em1"}  # the records reaching the model
    first = KeyedPredictor("ckpt-a")
    runner.run_eval([task], out, first, log=logs.append)
    assert set(first.calls) == scored
    same = KeyedPredictor("ckpt-a")
    runner.run_eval([task], out, same, log=logs.append)
    assert same.calls == []  # resumed: nothing to do
    # another checkpoint: every record is scored again, and said so
    other = KeyedPredictor("ckpt-b")
    results = runner.run_eval([task], out, other, log=logs.append)
    assert set(other.calls) == scored and any("another checkpoint" in x for x in logs)
    assert results["config"]["fingerprints"]["model"] == "ckpt-b"
    rows = [json.loads(x) for x in (out / "samples_mix.jsonl").read_text().splitlines()]
    assert {r["key"][0] for r in rows} == {"ckpt-b"} and len(rows) == 10
    # an edited task file (em1's answer): its hash changes, the records are scored again
    data = tmp_path / "mix.jsonl"
    data.write_text(data.read_text().replace('"answer": "Paris"', '"answer": "Rome"'))
    edited = KeyedPredictor("ckpt-b")
    results = runner.run_eval([task], out, edited, log=logs.append)
    assert set(edited.calls) == scored
    assert results["results"]["mix"]["exact_match:exact_match,none"] == 0.0  # paris != Rome


def test_model_fingerprint_sees_params_templates_and_knobs():
    class Cfg:
        def to_hf_config(self):
            return {"text_config": {"vocab_size": 7}}

    rng = np.random.default_rng(5)
    params = {"a": {"kernel": rng.normal(size=(300, 301)).astype(np.float32)},
              "b": np.arange(5, dtype=np.int32)}  # fmt: skip
    fp = runner.model_fingerprint(params, Cfg(), temperature=0.0)
    assert fp == runner.model_fingerprint(params, Cfg(), temperature=0.0)
    changed = {**params, "a": {"kernel": params["a"]["kernel"] * 1.001}}
    assert runner.model_fingerprint(changed, Cfg(), temperature=0.0) != fp
    assert runner.model_fingerprint(params, Cfg(), temperature=0.7) != fp
    other_dtype = {**params, "b": params["b"].astype(np.int64)}
    assert runner.model_fingerprint(other_dtype, Cfg(), temperature=0.0) != fp


def test_duplicate_record_ids_name_both_lines(tmp_path):
    data = tmp_path / "dup.jsonl"
    recs = [{"id": "x", "question": "q1", "answer": "a"}, {"id": "y", "question": "q2",
            "answer": "b"}, {"id": "x", "question": "q3", "answer": "c"}]  # fmt: skip
    data.write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    with pytest.raises(ValueError, match=r"dup.jsonl: record id 'x' on line 3 repeats line 1"):
        read_records(load_task(data))


def test_record_beyond_the_context_is_a_counted_bad_record(task, tmp_path):
    from lov_jax.inference.engine import ContextError, fit_context

    class Short(FakePredictor):
        def check_fits(self, encoded, max_new_tokens):
            fit_context([len(encoded.question)], max_new_tokens, 60, clip=False)

    pred = Short()
    results = runner.run_eval([task], tmp_path / "o", pred, log=lambda s: None)
    bad = results["bad_records"]["mix"]
    recs = [r for r in read_records(load_task(task)) if not isinstance(r, BadRecord)]
    long = {r.id for r in recs if len(r.question) + 8 > 60} - {"corrupt1"}  # (bad media first)
    assert 0 < len(long) < len(recs) and not long & set(pred.calls)
    assert bad["by_reason"]["too_long_tokens"] == len(long) and long <= set(bad["ids"])
    with pytest.raises(ContextError):
        Short().check_fits(read_records(load_task(task))[0], 8)
