"""Token ids and prompts from the checkpoint: non-Qwen vocabularies, interleaved prompts.

Several tiny llava-hf OneVision checkpoints whose tokenizers are unlike Qwen-2's (other
vocab sizes, special ids anywhere in the table, one or two eos ids, another chat
template) are built with `save_pretrained`; generation must equal HF `generate`'s
greedy tokens and stop at the checkpoint's own eos, `check-parity` must pass, and
prompts with typed `<image>` / `<video>` must give HF processor's ids, pixels and logits.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import LlavaOnevisionForConditionalGeneration

from data_pipelines.video import write_video
from lov_jax.inference import Generator, Prompter, PromptError, generate
from lov_jax.inference.engine import GenerationConfig
from lov_jax.parity import check_parity
from lov_jax.pretrained import load_pretrained
from lov_jax.testing.hf_checkpoints import make_tiny_hf
from lov_jax.testing.tokenizers import small_bpe
from lov_jax.token_ids import TokenIdError, TokenIds, read_token_ids

ROOT = Path(__file__).resolve().parents[2]

# (name, tokenizer spec): vocab sizes, id placements and eos counts unlike Qwen-2's.
SPECS = {
    "vicuna_700": lambda: small_bpe(
        700, specials={"<unk>": 0, "<s>": 1, "</s>": 2, "<image>": 640, "<video>": 13}
    ),
    "chatml_997": lambda: small_bpe(997, style="chatml", specials={"<|im_end|>": 3}),
}


@pytest.fixture(scope="module", params=sorted(SPECS))
def ckpt(request, tmp_path_factory):
    spec = SPECS[request.param]()
    d = make_tiny_hf(tmp_path_factory.mktemp(request.param), tokenizer=spec, seed=5)
    return d, spec


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    d = tmp_path_factory.mktemp("media")
    rng = np.random.default_rng(1)
    paths = []
    for k, (h, w) in enumerate([(50, 70), (90, 40), (33, 33)]):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(d / f"{k}.png")
        paths.append(str(d / f"{k}.png"))
    write_video(d / "v.mp4", rng.integers(0, 256, (4, 48, 64, 3), dtype=np.uint8))
    return paths, str(d / "v.mp4")


def _hf_greedy(hf_dir: Path, prompter, request, max_new: int) -> list[int]:
    """HF processor + `generate` on the same request (stop / pad ids from the
    checkpoint's own files)."""
    from data_pipelines.hf_processor import load_hf_processor
    from lov_jax.inference.prompting import load_image, to_messages

    processor = load_hf_processor(hf_dir)
    messages, images, _ = to_messages(request)
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(text=text, images=[load_image(i) for i in images], return_tensors="pt")
    model = LlavaOnevisionForConditionalGeneration.from_pretrained(hf_dir).eval()
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new, do_sample=False)
    return out[0, inputs["input_ids"].shape[1] :].tolist()


def test_ids_come_from_the_checkpoint(ckpt):
    hf_dir, spec = ckpt
    cfg, _ = load_pretrained(hf_dir)
    assert cfg.ids == spec.token_ids
    assert cfg.text.vocab_size == spec.vocab_size
    assert cfg.ids.image != 151646 and cfg.ids.pad not in (151643, 0) or spec.pad == "<unk>"


def test_greedy_equals_hf_and_stops_at_own_eos(ckpt, media, tmp_path):
    hf_dir, spec = ckpt
    cfg, params = load_pretrained(hf_dir)
    prompter = Prompter.from_checkpoint(hf_dir)
    request = ("Describe <image> briefly.", [media[0][0]], [])
    inputs = prompter.encode(cfg, request)
    gen = Generator(params, cfg)
    free = gen.generate([inputs], GenerationConfig(max_new_tokens=12, stop_ids=()))
    assert free.tokens[0] == _hf_greedy_no_eos(hf_dir, prompter, request, 12)
    # Make the 4th greedy token one of the checkpoint's eos ids, in its own files: both
    # sides must stop right there (HF reads generation_config.json, and so do we).
    stop = free.tokens[0][3]
    first = free.tokens[0].index(stop)
    gen_file = hf_dir / "generation_config.json"
    saved = gen_file.read_text()
    try:
        g = json.loads(saved)
        g["eos_token_id"] = [stop, *[i for i in spec.token_ids.eos if i != stop]]
        gen_file.write_text(json.dumps(g))
        cfg2, _ = load_pretrained(hf_dir)
        assert cfg2.ids.eos[0] == stop
        texts, out = generate(params, cfg2, request, prompter=prompter, max_new_tokens=12,
                              return_output=True)  # fmt: skip
        assert out.stopped == [True] and out.tokens[0] == free.tokens[0][: first + 1]
        assert _hf_greedy(hf_dir, prompter, request, 12) == out.tokens[0]
    finally:
        gen_file.write_text(saved)


def _hf_greedy_no_eos(hf_dir, prompter, request, max_new):
    gen_file = hf_dir / "generation_config.json"
    saved = gen_file.read_text()
    try:
        g = json.loads(saved)
        g.pop("eos_token_id", None)
        gen_file.write_text(json.dumps(g))
        return _hf_greedy(hf_dir, prompter, request, max_new)
    finally:
        gen_file.write_text(saved)


def test_check_parity_passes_on_other_vocabularies(ckpt, media):
    hf_dir, spec = ckpt
    paths, video = media
    if "video" not in spec.chat_template:  # Vicuna's template renders no video parts
        with pytest.raises(PromptError, match="0 video placeholder ids.*1 video"):
            check_parity(hf_dir, "Which one?", tuple(paths[:2]), video_path=video, num_frames=4)
    for question, images, vid in [
        ("What is shown?", paths[:1], None),
        ("Compare <image> with <image>.", paths[:2], None),
        ("Watch <video> and then look at <image>: same colours?", paths[2:3], video),
        *([("Which one?", paths[:2], video)] if "video" in spec.chat_template else []),
    ]:
        report = check_parity(hf_dir, question, tuple(images), video_path=vid, num_frames=4)
        assert report.tokens_equal, question
        assert report.pixels_max_abs_diff < 1e-5, question
        assert report.passed, (question, report.lines())


def test_interleaved_prompt_places_items_where_typed(ckpt, media):
    hf_dir, spec = ckpt
    cfg, _ = load_pretrained(hf_dir)
    prompter = Prompter.from_checkpoint(hf_dir)
    paths, video = media
    typed = prompter.encode(cfg, ("A <image> then <video> then <image>.", paths[:2], [video]))
    assert [it.kind for it in typed.items] == ["pad", "video", "pad"]
    runs = [int(t) for t in typed.tokens if t in cfg.ids.visual]
    first_video = runs.index(cfg.ids.video)
    assert set(runs[:first_video]) == {cfg.ids.image}  # the first image's run comes first
    if "video" in spec.chat_template:  # none typed: the template puts images, then videos
        plain = prompter.encode(cfg, ("A then then.", paths[:2], [video]))
        assert [it.kind for it in plain.items] == ["pad", "pad", "video"]
        assert plain.tokens[: len(typed.tokens)].tolist() != typed.tokens.tolist()
    with pytest.raises(PromptError, match="2 <image> and 0 <video>.*1 image"):
        prompter.encode(cfg, ("Compare <image> with <image>.", paths[:1], []))


def test_chat_messages_several_turns_images_in_any_turn(ckpt, media):
    hf_dir, _ = ckpt
    cfg, params = load_pretrained(hf_dir)
    prompter = Prompter.from_checkpoint(hf_dir)
    paths, _ = media
    messages = [
        {"role": "user", "content": [{"type": "image", "image": paths[0]},
                                     {"type": "text", "text": "What is it?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A picture."}]},
        {"role": "user", "content": [{"type": "text", "text": "And this one?"},
                                     {"type": "image", "path": paths[1]}]},
    ]  # fmt: skip
    inputs = prompter.encode(cfg, messages)
    assert len(inputs.items) == 2 and inputs.crops.shape[0] == 2
    rendered = prompter.render(
        [{**m, "content": [{"type": c["type"]} if c["type"] != "text" else c
                           for c in m["content"]]} for m in messages]
    )  # fmt: skip
    assert rendered.count("<image>") == 2 and "A picture." in rendered
    assert isinstance(generate(params, cfg, messages, prompter=prompter, max_new_tokens=3), str)


def test_read_token_ids_fallback_order_and_errors(tmp_path):
    spec = small_bpe(400, specials={"</s>": 7, "<image>": 20})
    tok = spec.tokenizer
    d = tmp_path / "ckpt"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"image_token_index": 20, "text_config": {}}))
    (d / "tokenizer_config.json").write_text(
        json.dumps({"eos_token": "</s>", "pad_token": "<unk>", "bos_token": {"content": "<s>"}})
    )
    ids = read_token_ids(d, tokenizer=tok, vocab_size=400)
    assert ids.eos == (7,) and ids.pad == tok.token_to_id("<unk>")
    assert ids.bos == tok.token_to_id("<s>") and ids.video == tok.token_to_id("<video>")
    # generation_config.json overrides the model config; a list of stop ids is kept
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": [7, 1]}))
    assert read_token_ids(d, tokenizer=tok, vocab_size=400).eos == (7, 1)
    # no pad anywhere -> the first eos id (HF generate's fallback)
    (d / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    assert read_token_ids(d, tokenizer=tok, vocab_size=400).pad == 7
    # an id outside the embedding table names the file and field
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": 400}))
    with pytest.raises(TokenIdError, match=r"generation_config.json: eos_token_id.*vocab_size 400"):
        read_token_ids(d, tokenizer=tok, vocab_size=400)
    (d / "generation_config.json").unlink()
    # the tokenizer must map <image> to the config's placeholder id
    (d / "config.json").write_text(json.dumps({"image_token_index": 21}))
    with pytest.raises(TokenIdError, match="'<image>' must be one token with id 21.*maps it to 20"):
        read_token_ids(d, tokenizer=tok, vocab_size=400)
    # no eos at all: generation could not stop
    (d / "config.json").write_text(json.dumps({"image_token_index": 20}))
    (d / "tokenizer_config.json").unlink()
    with pytest.raises(TokenIdError, match="no eos id"):
        read_token_ids(d, tokenizer=tok, vocab_size=400)


def test_out_of_vocab_placeholder_is_an_error_before_any_compute(tmp_path):
    d = make_tiny_hf(tmp_path / "hf", tokenizer=small_bpe(400))
    config = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**config, "image_token_index": 450}))
    with pytest.raises(TokenIdError, match=r"config.json: image_token_index: image = 450.*400"):
        load_pretrained(d)


def test_token_ids_round_trip_through_orbax_and_export(ckpt, tmp_path):
    from lov_jax.convert.export import orbax_to_hf
    from lov_jax.convert.import_hf import hf_to_orbax

    hf_dir, spec = ckpt
    hf_to_orbax(hf_dir, tmp_path / "orbax", progress=False)
    cfg, _ = load_pretrained(tmp_path / "orbax")
    assert cfg.ids == spec.token_ids
    orbax_to_hf(tmp_path / "orbax", tmp_path / "hf", progress=False)
    back = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    assert back["eos_token_id"] in (list(spec.token_ids.eos), spec.token_ids.eos[0])
    assert load_pretrained(tmp_path / "hf")[0].ids == spec.token_ids


def test_tokenids_json_rejects_unknown_keys():
    ids = TokenIds(pad=0, eos=(2,), image=5)
    assert TokenIds.from_json(ids.to_json()) == ids
    with pytest.raises(TokenIdError, match="unknown keys"):
        TokenIds.from_json({**ids.to_json(), "eoss": [1]})


def test_no_special_id_literals_outside_tests():
    """Qwen-2's special ids (151643..151647) appear nowhere in the package code."""
    out = subprocess.run(
        ["grep", "-rnE", r"\b15164[3-7]\b", "lov_jax", "data_pipelines", "configs",
         "--include=*.py"],
        cwd=ROOT, capture_output=True, text=True,
    )  # fmt: skip
    assert out.stdout == "", out.stdout
    assert re.search(r"\b15164[3-7]\b", "x = 151645")  # the pattern itself works


def test_named_conv_template_gives_the_jinja_ids(ckpt, media, tmp_path):
    """`--conv-template qwen_1_5` without its system prompt is llava-hf's ChatML jinja;
    a checkpoint with neither template is an error naming both options."""
    hf_dir, spec = ckpt
    cfg, _ = load_pretrained(hf_dir)
    request = ("Compare <image> with <image>.", media[0][:2], [])
    if "im_start" in spec.chat_template:
        jinja = Prompter.from_checkpoint(hf_dir).encode(cfg, request)
        named = Prompter.from_checkpoint(hf_dir, conv_template="qwen_1_5", system="")
        np.testing.assert_array_equal(named.encode(cfg, request).tokens, jinja.tokens)
    bare = Prompter.from_checkpoint(hf_dir)
    bare = Prompter(bare.tokenizer, None, None, bare.special_tokens)
    with pytest.raises(ValueError, match="chat_template.jinja.*--conv-template"):
        bare.encode(cfg, request)
