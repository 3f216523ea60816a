"""Every key of a train config is read or rejected; optimizer group names are checked
(issue 24, "Inputs").

Two walks over every leaf of the train config (lov_jax/testing/config_reads.py):
- static: each `group.key` must be read in lov_jax/ or data_pipelines/ code as
  `group.key` / `group.get("key")` / `group["key"]` (or through a local alias), comments
  and docstrings excluded, so a key whose name only appears elsewhere fails;
- dynamic: the train command's own data / model / mesh readers (model_from_config,
  make_data, estimate_steps, mesh_from_config) run on a config that records each leaf
  read, and must read every `data.*`, `model.*` and `mesh.*` field (the mesh block is
  read whole through `items()`, and its unknown keys are errors).
A full training run would read the rest too but costs minutes of CPU per run here.

Before (main at d821121): the only check grepped each leaf's last name anywhere in the
package (`seed` or `lr` match anything, comments included); a typo in
`optim.newline_group` silently froze image_newline.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest

from configs import common, dpo, lora, stage1, stage1_5, stage2_ov, stage2_si
from lov_jax.testing import config_reads
from lov_jax.token_ids import TokenIds
from lov_jax.train import optimizer

ROOT = Path(__file__).resolve().parents[2]
IDS = TokenIds(pad=0, eos=(2,), image=5, video=6)  # inside every tiny vocabulary
CODE = sorted(
    f
    for d in ("lov_jax", "data_pipelines")
    for f in (ROOT / d).rglob("*.py")
    if "testing" not in f.parts  # the tracker itself names no fields
)


def _static_unread(fields: list[str]) -> list[str]:
    reads = config_reads.static_reads(CODE)
    out = []
    for path in fields:
        group, _, key = path.rpartition(".")
        if (group or "config", key) not in reads:
            out.append(path)
    return out


def test_every_train_config_key_is_read_somewhere():
    fields = config_reads.leaf_paths(common.base_config("tiny"))
    assert len(fields) > 40
    fields = [f for f in fields if not f.startswith("mesh.")]  # read whole: the next test
    assert _static_unread(fields) == []
    # the check sees a field nothing reads (issue 24's `data.image_mode`), or one whose
    # name is only read under another group
    assert _static_unread(["data.image_mode", "optim.seq_len", "data.seq_len"]) == [
        "data.image_mode", "optim.seq_len"
    ]  # fmt: skip


def test_the_train_command_reads_every_data_model_and_mesh_key(tmp_path):
    from lov_jax import sharding
    from lov_jax.train import run

    turns = [{"from": "human", "value": "Hi?"}, {"from": "gpt", "value": "Hello there."}]
    (tmp_path / "d.json").write_text(
        json.dumps([{"id": f"t{i}", "conversations": turns} for i in range(3)])
    )
    c = stage2_si.get_config("tiny")
    c.data.train_path = str(tmp_path / "d.json")
    c.data.seq_len, c.data.max_crops = 128, 1
    c.mesh.num_devices = 1
    c = config_reads.tracked(c)
    cfg, _ = run.model_from_config(c)
    tokenizer = run.load_tokenizer_for(c)
    from data_pipelines.tokenizer import qwen2_token_ids

    cfg = cfg.replace(token_ids=qwen2_token_ids(tokenizer))
    recs, it = run.make_data(c, cfg, tokenizer)
    assert run.estimate_steps(c, cfg, tokenizer, len(recs)) == 1
    assert int(next(it)["segment_ids"].max()) >= 3  # the 3 records (and repeats) in a row
    sharding.mesh_from_config(c.mesh)
    read = config_reads.reads(c)
    fields = config_reads.leaf_paths(c)
    groups = [p for p in fields if p.split(".")[0] in ("data", "model", "mesh")]
    assert sorted(set(groups) - read) == []
    assert {"init_from", "train.epochs", "optim.grad_accum"} <= read
    c.mesh.to_dict()  # saving the config is not a read of its fields
    with pytest.raises(ValueError, match=r"unknown config.mesh fields \['fdsp'\]"):
        sharding.mesh_from_config({**c.mesh.to_dict(), "fdsp": 2})


def test_stage_files_add_no_fields():
    """A stage (and DPO / LoRA) changes values of the common fields, plus its own blocks."""
    base = set(config_reads.leaf_paths(common.base_config("tiny")))
    for stage in (stage1, stage1_5, stage2_si, stage2_ov):
        assert set(config_reads.leaf_paths(stage.get_config("tiny"))) == base, stage.__name__
    extra = {p.split(".")[0] for p in set(config_reads.leaf_paths(dpo.get_config("tiny"))) - base}
    assert {"dpo", "loop"} <= extra <= {"dpo", "loop", "lora"}
    extra = {p.split(".")[0] for p in set(config_reads.leaf_paths(lora.get_config())) - base}
    assert extra == {"lora"}


def test_dpo_lora_and_loop_blocks_are_read_whole_or_rejected():
    """`dpo` and `lora` become frozen dataclasses whose constructors reject unknown keys
    (every block key is a dataclass field); each `loop` key is read in post/loop.py."""
    from lov_jax.lora import adapters
    from lov_jax.post import dpo as dpo_lib

    c = dpo.get_config("tiny")
    assert set(c.dpo.keys()) == {f.name for f in dataclasses.fields(dpo_lib.DPOOptions)}
    c.dpo.betta = 0.2
    with pytest.raises(ValueError, match=r"unknown dpo config keys \['betta'\]"):
        dpo_lib.DPOOptions.from_config(c.dpo)
    block = lora.get_config().lora
    assert set(block.keys()) == set(adapters.FIELDS)
    with pytest.raises(ValueError, match=r"lora: unknown keys \['rank'\]"):
        adapters.from_config({**block.to_dict(), "rank": 8})
    code = (ROOT / "lov_jax/post/loop.py").read_text()
    assert [k for k in c.loop.keys() if not re.search(rf"\blc\.{k}\b", code)] == []


# ---- optimizer group names -----------------------------------------------------------------


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("trainable", ("projector", "lmm"), r"optim.trainable: unknown optimizer group 'lmm' "
         r"\(did you mean 'llm'\?\); the groups are vision, projector, llm"),
        ("trainable", ("visoin",), r"unknown optimizer group 'visoin' \(did you mean 'vision'"),
        ("trainable", "llm", r"optim.trainable='llm': a tuple of group names"),
        ("newline_group", "projecter", r"optim.newline_group: unknown optimizer group "
         r"'projecter' \(did you mean 'projector'\?\)"),
    ],
)  # fmt: skip
def test_a_typo_in_a_group_name_is_an_error(field, value, match):
    c = stage2_si.get_config("tiny")
    with c.optim.ignore_type():  # a string where the tuple belongs
        c.optim[field] = value
    with pytest.raises(ValueError, match=match):
        optimizer.check_groups(c.optim)
    params = {"image_newline": 0, "language_model": {"w": 0}}
    with pytest.raises(ValueError, match=match):
        optimizer.param_labels(params, c.optim)


def test_train_refuses_a_group_typo_before_loading(tmp_path):
    """`lov-jax train`'s path (load_config, overrides, train_from_config) stops at once."""
    from lov_jax.train.config_loading import apply_overrides, load_config
    from lov_jax.train.run import train_from_config

    c = load_config(f"{ROOT}/configs/stage1.py:tiny")
    c = apply_overrides(c, ["--config.optim.newline_group=lm"])
    with pytest.raises(ValueError, match=r"newline_group: unknown optimizer group 'lm'"):
        train_from_config(c, tmp_path / "w")
    assert not (tmp_path / "w" / "assets").exists()  # stopped before loading the model


# ---- config.json field types -----------------------------------------------------------------


@pytest.mark.parametrize(
    "preset, section, field, value, kind",
    [
        ("tiny", "text_config", "hidden_size", "48", "int, got str"),
        ("tiny", "text_config", "rope_theta", [1e6], "number, got list"),
        ("tiny", "text_config", "tie_word_embeddings", "yes", "bool, got str"),
        ("tiny", "vision_config", "layer_norm_eps", "1e-6", "number, got str"),
        ("tiny", "vision_config", "num_hidden_layers", None, "int, got null"),
        ("tiny_llava_next", "text_config", "sliding_window", 6.5, "int, got float"),
        ("tiny_llava_next", "vision_config", "image_size", True, "int, got bool"),
        ("tiny_llava15", None, "vision_feature_select_strategy", 1, "string, got int"),
        ("tiny_llava15", None, "text_config", "llama", "object, got str"),
    ],
)
def test_a_wrong_type_in_config_json_names_the_field_and_file(
    tmp_path, preset, section, field, value, kind
):
    from lov_jax import architectures
    from lov_jax import config as model_config

    hf = model_config.preset(preset, token_ids=IDS).to_hf_config()
    architectures.from_hf_config(hf, checkpoint_dir=tmp_path)  # the untouched file reads
    (hf if section is None else hf[section])[field] = value
    name = field if section is None else f"{section}.{field}"
    want = rf"^{tmp_path}/config\.json: {re.escape(name)} = .*: expected a JSON {kind}$"
    with pytest.raises(ValueError, match=want):
        architectures.from_hf_config(hf, checkpoint_dir=tmp_path)


def test_null_text_fields_still_mean_the_default(tmp_path):
    from lov_jax import architectures
    from lov_jax import config as model_config

    hf = model_config.tiny(token_ids=IDS).to_hf_config()
    hf["text_config"]["head_dim"] = None  # transformers writes nulls for unset fields
    cfg = architectures.from_hf_config(hf, checkpoint_dir=tmp_path)
    assert cfg.text.head_dim == 48 // 6
