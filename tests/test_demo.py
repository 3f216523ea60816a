"""`lov-jax demo` end to end at smoke scale, and the synthetic data it trains on.

The full demo (the README's main command, ~8 min) is what reaches the accuracy bar;
here every stage runs for a few steps on a few records, so the test checks the
plumbing (data -> stage 1 -> stage 2 from stage 1 -> eval -> HF export -> transformers
reload) and the report, not accuracy.
"""

from __future__ import annotations

import json
from collections import Counter

import pytest

from data_pipelines.synthetic import (
    CHANCE,
    COLORS,
    COUNT_WORDS,
    SI_TASKS,
    TASKS,
    TRAIN_MIX,
    make_shapes_dataset,
)


@pytest.mark.parametrize("multi_turn", [False, True])
def test_shapes_dataset_records(tmp_path, multi_turn):
    paths = make_shapes_dataset(tmp_path, n_train=14, n_test=10, seed=3, multi_turn=multi_turn)
    train = json.loads(paths["train"].read_text())
    test = json.loads(paths["test"].read_text())
    assert Counter(r["task"] for r in train) == {t: 2 * TRAIN_MIX[t] for t in TASKS}
    assert Counter(r["task"] for r in test) == {t: 2 for t in TASKS}
    answers = {"color": set(COLORS), "position": {"left", "right"}, "count": set(COUNT_WORDS),
               "compare": {"yes", "no"}, "motion": {"left", "right"}}  # fmt: skip
    for r in test:  # one question each; the answer is in the task's answer set
        human, gpt = r["conversations"]
        assert human["value"].count("<image>") == (2 if r["task"] == "compare" else 1)
        assert gpt["value"] in answers[r["task"]], r
    for r in train:  # multi-turn where the media supports it; <image> only in turn 1
        turns = r["conversations"]
        assert [t["from"] for t in turns] == ["human", "gpt"] * (len(turns) // 2)
        assert all("<image>" not in t["value"] for t in turns[2:])
        multi = multi_turn and r["task"] not in ("count", "compare")
        assert len(turns) == (4 if multi else 2)
        media = r.get("image", r.get("video"))
        for m in media if isinstance(media, list) else [media]:
            assert (tmp_path / m).is_file()
    train_si = json.loads(paths["train_si"].read_text())
    assert train_si == [r for r in train if r["task"] in SI_TASKS] and len(train_si) == 4
    captions = json.loads(paths["captions"].read_text())
    assert len(captions) == 4 and all(c["conversations"][0]["value"] == "<image>" for c in captions)
    assert set(CHANCE) == set(TASKS)


def test_count_images_cover_area_in_proportion_to_the_count(tmp_path):
    """Shapes of one kind-independent area: the covered fraction says the count."""
    import numpy as np
    from PIL import Image

    paths = make_shapes_dataset(tmp_path, n_train=84, n_test=0, seed=1)
    per_shape = []
    for r in json.loads(paths["train"].read_text()):
        if r["task"] != "count":
            continue
        img = np.asarray(Image.open(tmp_path / r["image"]).convert("RGB")).astype(int)
        covered = (np.abs(img - 128).sum(-1) > 30).mean()
        per_shape.append(covered / (COUNT_WORDS.index(r["conversations"][1]["value"]) + 1))
    assert len(per_shape) == 12
    # pi * 0.13^2 = 0.053 of the image per shape, whatever its kind, size or aspect
    assert 0.045 < min(per_shape) and max(per_shape) < 0.06, per_shape


@pytest.mark.filterwarnings("ignore")
def test_demo_smoke(tmp_path):
    from lov_jax.demo import run_demo

    steps = {"stage1": 2, "stage2_si": 2, "stage2_ov": 3}
    status = run_demo(tmp_path, n_train=30, n_test=10, steps=steps, seed=1)
    report = json.loads((tmp_path / "report.json").read_text())
    assert status in (0, 1) and report["ok"] == (status == 0) and report["seed"] == 1
    # the exit policy: every task clearly above chance, every loss fell, the export matches
    above = [a["value"] > a["chance"] + 0.1 for a in report["accuracy"].values()]
    fell = [s["last"] < s["first"] for s in report["losses"].values()]
    exported = [p["passed"] for p in report["parity"].values()]
    assert report["above_chance"] == sum(above)
    assert report["ok"] == (all(above) and all(fell) and all(exported))
    assert set(report["accuracy"]) == set(TASKS)
    assert all(a["n"] == 2 for a in report["accuracy"].values())
    assert set(report["losses"]) == set(steps) and report["steps"] == steps
    for stage in report["losses"].values():
        assert 0 < stage["last"] < 20 and 0 < stage["first"] < 20
    # The export loads in transformers and equals our model on all three inputs.
    assert set(report["parity"]) == {"single image", "two images", "video"}
    assert all(p["passed"] and p["tokens_equal"] for p in report["parity"].values()), report
    assert (tmp_path / "hf_export" / "model.safetensors").exists() or (
        tmp_path / "hf_export" / "model.safetensors.index.json"
    ).exists()
    with pytest.raises(ValueError, match="seed 1, not 0"):  # no reuse of another seed's stages
        run_demo(tmp_path, n_train=30, n_test=10, steps=steps, seed=0)
