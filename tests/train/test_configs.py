"""Stage configs: each stage sets what its recipe changes, every field has a reader,
unknown override keys are errors, and the demo's recipe is configs/demo.py."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from configs import (
    common,
    demo,
    llava15_finetune,
    llava15_pretrain,
    llava_next_finetune,
    stage1,
    stage1_5,
    stage2_ov,
    stage2_si,
)
from lov_jax.train.config_loading import UnknownConfigField, apply_overrides, load_config

ROOT = Path(__file__).resolve().parents[2]
STAGES = {"stage1": stage1, "stage1_5": stage1_5, "stage2_si": stage2_si, "stage2_ov": stage2_ov}


def _flat(c, prefix=""):
    out = {}
    for k, v in c.items():
        if hasattr(v, "items"):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _changes(c, base) -> dict:
    a, b = _flat(c), _flat(base)
    assert a.keys() == b.keys()  # a stage changes values, never adds fields
    return {k: v for k, v in a.items() if v != b[k]}


def test_each_stage_sets_what_its_recipe_changes():
    """docs/reference.md 8: stage 1 trains the projector at 1e-3 on plain-prompt captions in
    8192-token rows; 1.5, 2-SI and 2-OV train everything at common.py's rates and differ
    in their data."""
    base = common.base_config("tiny")
    got = {name: _changes(m.get_config("tiny"), base) for name, m in STAGES.items()}
    assert got == {
        "stage1": {
            "data.train_path": "blip_laion_cc_sbu_558k.json", "data.template": "plain",
            "data.seq_len": 8192, "data.max_crops": 16, "optim.lr": 1e-3,
            "optim.trainable": ("projector",),
        },
        "stage1_5": {"data.train_path": "mid_stage.yaml"},
        "stage2_si": {"data.train_path": "single_image.yaml"},
        "stage2_ov": {"data.train_path": "onevision.yaml"},
    }  # fmt: skip
    assert (base.optim.lr, base.optim.vision_lr, base.optim.trainable) == (
        1e-5, 2e-6, ("vision", "projector", "llm"),
    )  # fmt: skip
    assert (base.data.seq_len, base.data.template, base.data.frames_upbound) == (
        32768,
        "qwen_1_5",
        32,
    )


@pytest.mark.parametrize("preset", common.PRESETS)
def test_presets_load_through_the_cli_path(preset):
    for name in STAGES:
        c = load_config(f"{ROOT}/configs/{name}.py:{preset}")
        assert c.model.preset == preset
        assert c.model.dtype == ("float32" if preset in ("tiny", "demo") else "bfloat16")
    with pytest.raises(ValueError, match="unknown model preset"):
        load_config(f"{ROOT}/configs/stage1.py:ov_9b")


def _sources() -> str:
    """The code that reads configs (the config files and the demo recipe excluded)."""
    files = [*(ROOT / "lov_jax").rglob("*.py"), *(ROOT / "data_pipelines").rglob("*.py")]
    return "\n".join(f.read_text() for f in files)


def test_every_config_field_has_a_reader():
    code = _sources()
    unread = [
        path
        for path in _flat(common.base_config("tiny"))
        # attribute access (config.data.seq_len, optim.lr) or a key ({"dcn_data": 1, ...})
        if not re.search(rf"\.{path.split('.')[-1]}\b|[\"']{path.split('.')[-1]}[\"']", code)
    ]
    assert unread == []


@pytest.mark.parametrize(
    "override, match",
    [
        ("--config.train.lerning_rate=1", r"unknown config field 'train.lerning_rate'; train has"),
        ("--config.optim.vision_lrr=1e-6", r"did you mean 'optim.vision_lr'"),
        ("--config.dta.seq_len=8", r"did you mean 'data.seq_len'.*the config has: data"),
        ("--config.optim.lr.x=1", r"optim.lr is a value, not a group"),
        ("--config.stage=stage1", r"unknown config field 'stage'"),  # removed: nothing read it
    ],
)
def test_unknown_override_keys_are_errors(override, match):
    c = stage2_si.get_config("tiny")
    before = _flat(c)
    with pytest.raises(UnknownConfigField, match=match):
        apply_overrides(c, [override])
    assert _flat(c) == before


def test_overrides_parse_like_the_field():
    c = apply_overrides(
        stage1.get_config("tiny"),
        [
            "--config.optim.lr=2",
            "--config.optim.trainable=vision,llm",
            "--config.data.template=qwen_1_5",
        ],
    )
    assert (c.optim.lr, c.optim.trainable, c.data.template) == (2.0, ("vision", "llm"), "qwen_1_5")
    c = apply_overrides(c, ["--config.optim.trainable=llm", "--config.train.num_steps=3"])
    assert (c.optim.trainable, c.train.num_steps) == (("llm",), 3)
    with pytest.raises(ValueError, match="data.seq_len"):
        apply_overrides(c, ["--config.data.seq_len=long"])


def test_train_cli_refuses_a_typo_before_training(tmp_path):
    from lov_jax.cli import main

    with pytest.raises(UnknownConfigField, match="train.lerning_rate"):  # --debug: raised
        main(["--debug", "train", "--config", f"{ROOT}/configs/stage1.py:tiny", "--workdir",
              str(tmp_path / "w"), "--config.train.lerning_rate=1"])  # fmt: skip
    assert not (tmp_path / "w").exists()


def test_demo_recipe_changes_only_the_demo_fields():
    """configs/demo.py: the stage's own recipe plus the demo's data, sizes, steps and (stage
    2) rates; steps and seeds as the demo has always run them."""
    assert demo.STEPS == {"stage1": 40, "stage2_si": 200, "stage2_ov": 300}
    assert list(demo.STAGES) == ["stage1", "stage2_si", "stage2_ov"]
    out, data = Path("/o"), Path("/o/data")
    every = {"data.seed", "train.seed", "data.image_folder", "data.video_folder",
             "data.train_path", "data.system_prompt", "mesh.num_devices", "train.num_steps",
             "train.loss_chunk", "train.ckpt_every", "train.ckpt_keep", "data.seq_len",
             "data.max_crops", "data.rows_per_host", "train.loss_tokens_per_row"}  # fmt: skip
    stage2 = {"init_from", "data.frames_upbound", "data.loss_mask", "optim.lr",
              "optim.vision_lr", "optim.warmup_ratio"}  # fmt: skip
    for stage, (recipe, init, train_file) in demo.STAGES.items():
        c = demo.stage_config(stage, out, data, demo.STEPS[stage], seed=1)
        changed = _changes(c, recipe.get_config("demo"))
        assert set(changed) == (every if init is None else every | stage2), stage
        assert c.data.train_path == str(data / train_file)
        assert (c.train.num_steps, c.train.ckpt_every) == (demo.STEPS[stage],) * 2
        assert (c.data.seed, c.train.seed) == (1, 1)
        if init is not None:
            assert c.init_from == str(out / init)
            assert (c.optim.lr, c.optim.vision_lr, c.data.seq_len) == (3e-3, 1e-3, 512)
    assert demo.stage_config("stage1", out, data, 40).data.seed == 0
    c = load_config(f"{ROOT}/configs/demo.py:stage2_si")
    assert c.train.num_steps == 200 and c.init_from.endswith("demo_out/stage1")


def test_family_recipes_set_what_their_recipes_change():
    """LLaVA-1.5 pretrain.sh / finetune.sh and the LLaVA-NeXT finetune (docs/reference_family.md
    A.11): projector only at 1e-3 on plain captions; projector + LLM at 2e-5 on vicuna_v1 with
    padded images; NeXT everything, the tower at common.py's 2e-6, the LLM's template."""
    recipes = {"llava15_pretrain": (llava15_pretrain, "llava15_7b", "llava"),
               "llava15_finetune": (llava15_finetune, "llava15_13b", "llava"),
               "llava_next_finetune": (llava_next_finetune, "llava_next_mistral_7b",
                                       "llava_next")}  # fmt: skip
    got = {}
    for name, (recipe, preset, architecture) in recipes.items():
        assert preset in common.family_presets(architecture)
        base = common.base_config(preset, common.family_presets(architecture))
        got[name] = _changes(recipe.get_config(preset), base)
        c = load_config(f"{ROOT}/configs/{name}.py:{preset}")
        assert c.model.preset == preset and c.model.dtype == "bfloat16"
    assert got == {
        "llava15_pretrain": {
            "data.train_path": "blip_laion_cc_sbu_558k.json", "data.template": "plain",
            "data.seq_len": 8192, "data.max_crops": 14, "optim.lr": 1e-3,
            "optim.trainable": ("projector",),
        },
        "llava15_finetune": {
            "model.vision_aspect_ratio": "pad", "data.train_path": "llava_v1_5_mix665k.json",
            "data.template": "vicuna_v1", "data.seq_len": 8192, "data.max_crops": 12,
            "optim.lr": 2e-5, "optim.trainable": ("projector", "llm"),
        },
        "llava_next_finetune": {
            "data.train_path": "llava_1_6.json", "data.template": "mistral_instruct",
            "data.seq_len": 8192, "data.max_crops": 16, "optim.lr": 2e-5,
        },
    }  # fmt: skip
    base = common.base_config("llava15_7b", common.family_presets("llava"))
    assert (base.optim.vision_lr, base.optim.trainable, base.optim.warmup_ratio) == (
        2e-6, ("vision", "projector", "llm"), 0.03,
    )  # fmt: skip
    assert base.data.system_prompt == "template_default"  # vicuna_v1: conv_vicuna_v1's system


def test_family_recipes_refuse_other_families_and_unknown_llms():
    with pytest.raises(ValueError, match="unknown model preset 'ov_7b'"):
        llava15_finetune.get_config("ov_7b")
    with pytest.raises(ValueError, match="unknown model preset 'llava15_7b'"):
        llava_next_finetune.get_config("llava15_7b")
    templates = {
        p: llava_next_finetune.template_for(p)
        for p in (
            "llava_next_mistral_7b",
            "llava_next_vicuna_7b",
            "llava_next_llama3_8b",
            "llava_next_72b",
        )
    }
    assert templates == {"llava_next_mistral_7b": "mistral_instruct",
                         "llava_next_vicuna_7b": "vicuna_v1",
                         "llava_next_llama3_8b": "llava_llama_3",
                         "llava_next_72b": "qwen_1_5"}  # fmt: skip
    assert llava_next_finetune.template_for("tiny_llava_next") == "mistral_instruct"
    with pytest.raises(ValueError, match="--config.data.template=NAME"):
        llava_next_finetune.template_for("tiny_llava15")  # a Llama of no named flavour


def test_system_prompt_and_aspect_ratio_reach_the_pipeline():
    """data.system_prompt "template_default" is the template's own system prompt in the
    training ChatOptions; model.vision_aspect_ratio overrides the model's ("" keeps it)."""
    from data_pipelines import chat
    from lov_jax.train.run import make_process_fn, model_from_config

    c = stage1.get_config("tiny")
    c.data.template = "vicuna_v1"
    options = make_process_fn(c, None, None).keywords["options"].chat
    assert options.system_prompt == chat.get_template("vicuna_v1").system
    c.data.system_prompt = ""
    assert make_process_fn(c, None, None).keywords["options"].chat.system_prompt is None
    cfg, _ = model_from_config(c)
    assert cfg.vision_aspect_ratio == "anyres_max_9"  # the preset's
    c.model.vision_aspect_ratio = "anyres_max_4"
    assert model_from_config(c)[0].vision_aspect_ratio == "anyres_max_4"
