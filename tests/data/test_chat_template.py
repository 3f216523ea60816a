"""Jinja chat templates rendered as HF does; where they live; named templates give the same ids."""

from __future__ import annotations

import json

import jinja2
import numpy as np
import pytest
import tokenizers
from tokenizers import AddedToken, decoders, models, pre_tokenizers, trainers

from data_pipelines import chat
from data_pipelines.chat_template import (
    ChatTemplateError,
    load_chat_template,
    render_chat_template,
    render_prompt,
    template_special_tokens,
)
from data_pipelines.tokenizer import CHAT_TEMPLATE, build_qwen2_tokenizer, save_hf_tokenizer_files

transformers = pytest.importorskip("transformers")

# meta-llama/Meta-Llama-3-8B-Instruct tokenizer_config.json `chat_template`.
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}"
)
# mistralai/Mistral-7B-Instruct-v0.1 tokenizer_config.json `chat_template`.
MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token + ' ' }}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}"
    "{% endif %}{% endfor %}"
)
# meta-llama/Llama-2-7b-chat-hf `chat_template` (LLaVA-NeXT's mistral_instruct for one round).
LLAMA2_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}"
    "{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}"
    "{% endif %}{% endfor %}"
)
# FastChat's vicuna_v1.1 format as a jinja (system, "USER: ", "ASSISTANT: ", eos after answers).
VICUNA_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}"
    "{{ messages[0]['content'] + ' ' }}{% set loop_messages = messages[1:] %}{% else %}"
    "{% set loop_messages = messages %}{% endif %}{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}{% if message['role'] == 'user' %}{{ 'USER: ' + message['content'] + ' ' }}"
    "{% else %}{{ 'ASSISTANT: ' + message['content'] + eos_token }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

_CORPUS = [
    "USER: What is shown in this image? ASSISTANT: A red circle and two blue squares.",
    "[INST] Describe the picture. [/INST] A cat sleeps on a mat. Yes, no, more?",
    "You are a helpful language and vision assistant. Answer the questions.",
    "A chat between a curious user and an artificial intelligence assistant.",
    "system user assistant 0123456789 .,;:!?'\n\n\t",
]


def small_tokenizer(specials: list[str], vocab: int = 400) -> tokenizers.Tokenizer:
    """A byte-level BPE (not Qwen's) with `specials` as special tokens after its ranks."""
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    tok.train_from_iterator(_CORPUS * 3, trainer)
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    return tok


def save_tokenizer(out, tok, template: str | None, **named) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "clean_up_tokenization_spaces": False,
        **named,
        "extra_special_tokens": {"image_token": "<image>", "video_token": "<video>"},
    }
    if template is not None:
        cfg["chat_template"] = template
    (out / "tokenizer_config.json").write_text(json.dumps(cfg))


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    out = tmp_path_factory.mktemp("qwen")
    tok = build_qwen2_tokenizer()
    save_hf_tokenizer_files(out, tok)
    return tok, transformers.AutoTokenizer.from_pretrained(str(out)), out


@pytest.fixture(scope="module")
def processor(tmp_path_factory):
    from data_pipelines.hf_processor import load_hf_processor, save_hf_processor_files
    from lov_jax import config

    out = tmp_path_factory.mktemp("processor")
    save_hf_processor_files(out, config.tiny())
    return load_hf_processor(out)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """Llama-3 specials (bos <|begin_of_text|>, eot <|eot_id|>) on a small vocabulary."""
    out = tmp_path_factory.mktemp("llama3")
    tok = small_tokenizer(["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                           "<|end_header_id|>", "<|eot_id|>", "<image>", "<video>"])  # fmt: skip
    save_tokenizer(out, tok, LLAMA3_TEMPLATE, bos_token="<|begin_of_text|>",
                   eos_token="<|eot_id|>", pad_token="<|end_of_text|>")  # fmt: skip
    return tok, transformers.AutoTokenizer.from_pretrained(str(out)), out


@pytest.fixture(scope="module")
def vicuna(tmp_path_factory):
    """Llama-2 / Vicuna / Mistral specials (<unk>, <s>, </s>) on a small vocabulary."""
    out = tmp_path_factory.mktemp("vicuna")
    tok = small_tokenizer(["<unk>", "<s>", "</s>", "<image>", "<video>"], vocab=300)
    save_tokenizer(out, tok, VICUNA_TEMPLATE, bos_token="<s>", eos_token="</s>",
                   unk_token="<unk>", pad_token="<unk>")  # fmt: skip
    return tok, transformers.AutoTokenizer.from_pretrained(str(out)), out


def _text(s):
    return {"type": "text", "text": s}


IMAGE, VIDEO = {"type": "image"}, {"type": "video"}
# llava-hf style messages: system prompt, several turns, several images, a video.
CONVERSATIONS = [
    [{"role": "user", "content": [IMAGE, _text("What is this?")]}],
    [{"role": "system", "content": [_text("You are a helpful assistant.")]},
     {"role": "user", "content": [IMAGE, IMAGE, _text("Compare them.")]},
     {"role": "assistant", "content": [_text("The first is red.")]},
     {"role": "user", "content": [_text("And the ")], "name": None},  # None keys are dropped
     {"role": "assistant", "content": [_text(" second?\n")]},
     {"role": "user", "content": [VIDEO, _text("What moves? 日本語")]}],
    [{"role": "user", "content": [_text("text only")]}],
]  # fmt: skip


@pytest.mark.parametrize("k", range(len(CONVERSATIONS)))
@pytest.mark.parametrize("gen", [True, False])
def test_llava_hf_template_matches_hf_tokenizer_and_processor(qwen, processor, k, gen):
    tok, hf_tok, out = qwen
    messages = CONVERSATIONS[k]
    ours = render_chat_template(CHAT_TEMPLATE, messages, add_generation_prompt=gen,
                                **template_special_tokens(out))  # fmt: skip
    assert ours == hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
    ids = hf_tok.apply_chat_template(messages, add_generation_prompt=gen, return_dict=False)
    assert chat.encode(tok, ours) == list(ids)
    assert ours == processor.apply_chat_template(messages, add_generation_prompt=gen)


@pytest.mark.parametrize("fixture,template", [("llama", LLAMA3_TEMPLATE),
                                              ("vicuna", MISTRAL_TEMPLATE),
                                              ("vicuna", LLAMA2_TEMPLATE),
                                              ("vicuna", VICUNA_TEMPLATE)])  # fmt: skip
def test_bos_eos_templates_match_hf(request, fixture, template):
    tok, hf_tok, out = request.getfixturevalue(fixture)
    special = template_special_tokens(out)
    assert special == hf_tok.special_tokens_map | {"image_token": "<image>",
                                                   "video_token": "<video>"}  # fmt: skip
    conv = [{"role": "user", "content": "<image>\nWhat is shown?  "},
            {"role": "assistant", "content": " A cat. "},
            {"role": "user", "content": "More?"}]  # fmt: skip
    if template in (LLAMA2_TEMPLATE, VICUNA_TEMPLATE):
        conv = [{"role": "system", "content": "Answer the questions."}, *conv]
    ours = render_chat_template(template, conv, **special)
    want = hf_tok.apply_chat_template(conv, chat_template=template, tokenize=False,
                                      add_generation_prompt=True)  # fmt: skip
    assert ours == want and ours.startswith(special["bos_token"])
    ids = hf_tok.apply_chat_template(conv, chat_template=template, add_generation_prompt=True,
                                     return_dict=False)  # fmt: skip
    assert chat.encode(tok, ours) == list(ids)


def test_legacy_special_tokens_map(tmp_path, vicuna):
    tok = vicuna[0]
    save_tokenizer(tmp_path, tok, None, bos_token="<s>", eos_token="<unk>")
    (tmp_path / "special_tokens_map.json").write_text(
        json.dumps({"eos_token": {"content": "</s>", "lstrip": False, "normalized": False,
                                  "rstrip": False, "single_word": False}})
    )  # fmt: skip
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    ours = template_special_tokens(tmp_path)
    assert ours["eos_token"] == "</s>" and ours["bos_token"] == "<s>"
    assert {k: v for k, v in ours.items() if k in hf_tok.special_tokens_map} == (
        hf_tok.special_tokens_map
    )


def test_raise_exception_and_sandbox(vicuna):
    _, hf_tok, out = vicuna
    bad = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    with pytest.raises(jinja2.exceptions.TemplateError, match="must alternate"):
        render_chat_template(MISTRAL_TEMPLATE, bad, **template_special_tokens(out))
    with pytest.raises(jinja2.exceptions.TemplateError, match="must alternate"):
        hf_tok.apply_chat_template(bad, chat_template=MISTRAL_TEMPLATE, tokenize=False)
    msg = [{"role": "user", "content": "x"}]
    extras = ("{{ messages | tojson }}|{{ dict(a='<b>') | tojson }}|{% set ns = namespace(n=1) %}"
              "{{ ns.n }}|{% for m in messages %}{% if loop.first %}{% break %}{% endif %}"
              "{% endfor %}{{ strftime_now('%Y')[:2] }}")  # fmt: skip
    assert render_chat_template(extras, msg) == hf_tok.apply_chat_template(
        msg, chat_template=extras, tokenize=False
    )
    with pytest.raises(jinja2.exceptions.SecurityError):
        render_chat_template("{{ ''.__class__.__mro__ }}", msg)
    with pytest.raises(jinja2.exceptions.SecurityError):
        render_chat_template("{% set ns = namespace(_x=1) %}", msg)


def test_template_sees_plain_data_only(qwen):
    """Objects in messages reach the template as "<TypeName>" (HF `_plain_template_data`)."""
    from PIL import Image

    hf_tok = qwen[1]
    template = ("{% for c in messages[0]['content'] %}{{ c['image'] }}|{{ c['n'] + 1 }}|"
                "{{ c['t'] }}{% endfor %}{{ extra }}")  # fmt: skip
    image = {"type": "image", "image": Image.new("RGB", (2, 2)), "n": np.int64(3), "t": (1, 2)}
    msgs = [{"role": "user", "content": [image]}]
    ours = render_chat_template(template, msgs, extra=np.float32(0.5))
    assert ours == "<Image>|4|(1, 2)0.5"
    assert ours == hf_tok.apply_chat_template(
        msgs, chat_template=template, tokenize=False, extra=np.float32(0.5)
    )


# ---- where the template lives ------------------------------------------------------------


def _hf_template(path):
    """HF's template for a checkpoint: the processor's, else the tokenizer's."""
    from transformers.processing_utils import ProcessorMixin

    proc = ProcessorMixin.get_processor_dict(str(path))[0].get("chat_template")
    if isinstance(proc, dict):
        proc = proc.get("default")
    tok = transformers.AutoTokenizer.from_pretrained(str(path)).chat_template
    if isinstance(tok, dict):
        tok = tok.get("default")
    return proc if proc is not None else tok


def test_load_order_is_hf_order(tmp_path, vicuna):
    tok = vicuna[0]
    save_tokenizer(tmp_path, tok, None, bos_token="<s>", eos_token="</s>")
    assert load_chat_template(tmp_path) is None
    layers = [
        ("tokenizer_config.json", "A"),
        (
            "tokenizer_config.json",
            [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "B"}],
        ),  # fmt: skip
        ("chat_template.jinja", "C"),
        ("chat_template.json", "D"),
        ("processor_config.json", "E"),
    ]
    for name, value in layers:
        path = tmp_path / name
        if name == "chat_template.jinja":
            path.write_text(value)
        else:
            data = json.loads(path.read_text()) if path.exists() else {}
            path.write_text(json.dumps({**data, "chat_template": value}))
        ours = load_chat_template(tmp_path)
        assert ours == _hf_template(tmp_path), name
        assert ours == (value if isinstance(value, str) else "B")


@pytest.mark.parametrize("name,content,match", [
    ("tokenizer_config.json", "{not json", "tokenizer_config.json: not readable JSON"),
    ("tokenizer_config.json", '{"chat_template": 3}', r"tokenizer_config.json: `chat_template`"),
    ("tokenizer_config.json", '{"chat_template": [{"name": "x", "template": "y"}]}',
     "none named 'default'"),
    ("tokenizer_config.json", '{"chat_template": [{"name": "default"}]}', r"`chat_template`\[0\]"),
    ("chat_template.json", '{"template": "x"}', "chat_template.json: no `chat_template` field"),
    ("chat_template.json", "[1]", "chat_template.json: a JSON object expected"),
])  # fmt: skip
def test_malformed_template_files_name_file_and_field(tmp_path, name, content, match):
    (tmp_path / name).write_text(content)
    with pytest.raises(ChatTemplateError, match=match):
        load_chat_template(tmp_path)


# ---- the inference prompt -----------------------------------------------------------------


def test_render_prompt_jinja_named_and_neither(qwen):
    _, hf_tok, out = qwen
    msgs = [{"role": "user", "content": [IMAGE, _text("What is this?")]}]
    with_sys = [{"role": "system", "content": [_text("Be brief.")]}, *msgs]
    want = hf_tok.apply_chat_template(with_sys, tokenize=False, add_generation_prompt=True)
    assert render_prompt(msgs, chat_template=CHAT_TEMPLATE, conv_template="vicuna_v1",
                         system="Be brief.") == want  # fmt: skip
    assert render_prompt(with_sys, chat_template=None, conv_template="qwen_1_5") == want
    default = render_prompt(msgs, chat_template=None, conv_template="qwen_1_5")
    assert default.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>")
    with pytest.raises(ValueError, match="given twice"):
        render_prompt(with_sys, chat_template=CHAT_TEMPLATE, conv_template=None, system="x")
    with pytest.raises(ValueError) as e:
        render_prompt(msgs, chat_template=None, conv_template=None)
    for part in ("chat_template.jinja", "tokenizer_config.json", "--conv-template", "qwen_1_5",
                 "llava_llama_3"):  # fmt: skip
        assert part in str(e.value)
    with pytest.raises(ValueError, match="not in"):
        render_prompt(msgs, chat_template=None, conv_template="nope")


# ---- named templates and the jinja of the same format give the same ids --------------------


def _as_turns(messages):
    return chat.message_turns(messages)


def _named_ids(tok, messages, template, system):
    ids, _ = chat.tokenize_conversation(
        _as_turns(messages), tok, chat.ChatOptions(template=template, system_prompt=system)
    )
    return ids.tolist()


TRAIN = [{"role": "user", "content": [IMAGE, _text("What is this?")]},
         {"role": "assistant", "content": [_text("A cat.")]},
         {"role": "user", "content": [_text("And now?")]},
         {"role": "assistant", "content": [_text("A dog, sleeping.")]}]  # fmt: skip


def test_qwen_1_5_is_llava_hf_onevision_template(qwen):
    tok, hf_tok, _ = qwen
    hf_ids = hf_tok.apply_chat_template(TRAIN, return_dict=False)
    assert _named_ids(tok, TRAIN, "qwen_1_5", None) == list(hf_ids)
    sys = [{"role": "system", "content": [_text("You are a helpful assistant.")]}, *TRAIN]
    assert _named_ids(tok, TRAIN, "qwen_1_5", chat.TEMPLATE_SYSTEM) == list(
        hf_tok.apply_chat_template(sys, return_dict=False)
    )
    assert _named_ids(tok, TRAIN, "qwen", None) == list(hf_ids)  # the old name, same ids
    prompt = TRAIN[:3]
    assert render_prompt(prompt, chat_template=None, conv_template="qwen_1_5", system="") == (
        hf_tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    )


def _plain(messages):
    """String-content messages (what the text-only templates read)."""
    return [{"role": r, "content": t} for r, t in _as_turns(messages)]


def test_llava_llama_3_is_llama_3_instruct_template(llama):
    tok, hf_tok, _ = llama
    system = chat.get_template("llava_llama_3").system
    conv = [{"role": "system", "content": system}, *_plain(TRAIN)]
    conv[-1]["content"] = "  A dog, sleeping.\n"  # the template trims; so does ours
    assert _named_ids(tok, conv[1:], "llava_llama_3", chat.TEMPLATE_SYSTEM) == list(
        hf_tok.apply_chat_template(conv, return_dict=False)
    )
    assert render_prompt(conv[:4], chat_template=None, conv_template="llava_llama_3") == (
        hf_tok.apply_chat_template(conv[:4], tokenize=False, add_generation_prompt=True)
    )


def test_vicuna_v1_is_vicuna_template(vicuna):
    tok, hf_tok, _ = vicuna
    system = chat.get_template("vicuna_v1").system
    conv = [{"role": "system", "content": system}, *_plain(TRAIN)]
    assert _named_ids(tok, conv[1:], "vicuna_v1", chat.TEMPLATE_SYSTEM) == list(
        hf_tok.apply_chat_template(conv, return_dict=False)
    )
    assert render_prompt(conv[:4], chat_template=None, conv_template="vicuna_v1") == (
        hf_tok.apply_chat_template(conv[:4], tokenize=False, add_generation_prompt=True)
    )


def test_mistral_instruct_is_llama_2_and_mistral_templates(vicuna):
    """One round (LLaVA-NeXT's mistral_instruct puts no <s> between rounds, Llama-2 does)."""
    tok, hf_tok, _ = vicuna
    conv = [{"role": "system", "content": "Answer briefly."}, *_plain(TRAIN[:2])]
    assert _named_ids(tok, conv[1:], "mistral_instruct", "Answer briefly.") == list(
        hf_tok.apply_chat_template(conv, chat_template=LLAMA2_TEMPLATE, return_dict=False)
    )
    first = _plain(TRAIN[:1])
    want = hf_tok.apply_chat_template(first, chat_template=MISTRAL_TEMPLATE, tokenize=False)
    assert render_prompt(first, chat_template=None, conv_template="mistral_instruct") == want
    assert want == "<s>[INST] <image>\nWhat is this? [/INST]"


def test_named_template_needs_its_tokens(vicuna):
    tok = vicuna[0]
    with pytest.raises(ValueError, match="template qwen_1_5: '<|im_start|>' is not one token"):
        _named_ids(tok, TRAIN, "qwen_1_5", None)
    ids = _named_ids(tok, TRAIN, "vicuna_v1", None)
    assert ids[0] == tok.token_to_id("<s>") and tok.token_to_id("</s>") in ids
    assert np.count_nonzero(np.asarray(ids) == tok.token_to_id("<image>")) == 1
