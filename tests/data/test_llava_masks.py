"""Training ids and label masks equal LLaVA's own preprocessing, template by template.

The reference is tests/data/llava_preprocess.py: haotian-liu/LLaVA's preprocess_v1 /
preprocess_llama_2 / preprocess_plain and LLaVA-NeXT's preprocess_llama3, ported line by
line (the commits are in its docstring). Both sides get the same tokenizer: LLaVA through
transformers (`tokenizer(text)` adds the post-processor's bos, as a Llama tokenizer does),
ours as the `tokenizers.Tokenizer` the data pipeline holds. Tokenizers: byte-level BPEs
(lov_jax/testing/tokenizers.small_bpe) with the template's specials at unusual ids, a
SentencePiece-style (Metaspace) vocabulary as Vicuna / Mistral have, and a Llama-3-style
one with its header tokens; never Qwen's.

What we reproduce and where we deviate (data_pipelines/chat.py says the same):

* Exactly LLaVA's ids and labels whenever LLaVA's own length bookkeeping holds (it says
  so by not printing "tokenization mismatch"). Its `instruction_len - 2` drops the bos
  and the token holding the space after "ASSISTANT:" / "[/INST]", so that space is the
  answer's: the token holding it is trained even when it is a token of its own.
* Where that bookkeeping breaks (a SentencePiece vocabulary whose text after `</s>` does
  not tokenise like the round on its own, e.g. the `not tokenizer.legacy` -1 guess that
  does not fit the vocabulary), LLaVA masks the whole conversation; we keep the intended
  mask (every answer and its `</s>`), a documented fix: a dropped sample trains nothing.
* vicuna_v1 / mistral_instruct start with the tokenizer's bos; plain starts with it only
  when the tokenizer adds one (LLaVA-1.5's Vicuna does, Qwen's does not), as LLaVA.
"""

from __future__ import annotations

import string

import llava_preprocess as ref
import pytest
import tokenizers
from tokenizers import AddedToken, decoders, models, pre_tokenizers, processors, trainers

from data_pipelines import chat
from lov_jax.testing.tokenizers import small_bpe

transformers = pytest.importorskip("transformers")

# Multi-turn LLaVA records: the image in the first human turn, answers of several shapes.
CONVERSATIONS = {
    "three_rounds": [
        ("human", "<image>\nWhat is shown here?"), ("gpt", "A red circle."),
        ("human", "And the colour of the square?"), ("gpt", "Blue, left of the circle."),
        ("human", "Count them."), ("gpt", "2"),
    ],
    "odd_answers": [
        ("human", "<image>\nDescribe it."), ("gpt", "\nyes.\n\nNo."),
        ("human", "Again?"), ("gpt", " (a) two  "),
    ],
    "text_only": [
        ("human", "What is 2 + 3?"), ("gpt", "5"), ("human", "And times 4?"), ("gpt", "20."),
    ],
}  # fmt: skip
LLAMA_SPECIALS = {"<unk>": 0, "<s>": 1, "</s>": 2}  # Llama / Vicuna / Mistral's ids


def _records(name):
    return [{"from": r, "value": v} for r, v in CONVERSATIONS[name]]


def _hf(tok: tokenizers.Tokenizer, **named) -> transformers.PreTrainedTokenizerFast:
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, **named)


def _with_bos(tok: tokenizers.Tokenizer, bos: str) -> tokenizers.Tokenizer:
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", special_tokens=[(bos, tok.token_to_id(bos))]
    )
    return tok


def _vicuna_bpe(vocab: int, image_id: int) -> tokenizers.Tokenizer:
    spec = small_bpe(vocab, specials={**LLAMA_SPECIALS, "<image>": image_id}, style="vicuna")
    return _with_bos(spec.tokenizer, "<s>")


def _sentencepiece(prepend_scheme: str) -> tokenizers.Tokenizer:
    """A Llama-style vocabulary: Metaspace "▁" words, <unk>/<s>/</s> at 0/1/2, `<s>` added
    by the post-processor. prepend_scheme "always" is the legacy tokenizer (every stretch
    between special tokens gets a "▁"); "first" the non-legacy one."""
    from lov_jax.testing.tokenizers import _CORPUS

    tok = tokenizers.Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=prepend_scheme)
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme=prepend_scheme)
    # every printable character in the alphabet: no <unk> (LLaVA pads with <unk>, and
    # its length check would not count one)
    trainer = trainers.BpeTrainer(vocab_size=420, special_tokens=list(LLAMA_SPECIALS),
                                  initial_alphabet=list(string.printable),
                                  show_progress=False)  # fmt: skip
    tok.train_from_iterator(_CORPUS * 4, trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t in ("<image>", "<video>")])  # fmt: skip
    return _with_bos(tok, "<s>")


def _llama3_bpe() -> tokenizers.Tokenizer:
    """Byte-level BPE with Llama-3's specials, `<|begin_of_text|>` added by the
    post-processor as Meta-Llama-3's tokenizer.json does."""
    from test_chat_template import small_tokenizer

    tok = small_tokenizer(["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                           "<|end_header_id|>", "<|eot_id|>", "<image>", "<video>"],
                          vocab=350)  # fmt: skip
    return _with_bos(tok, "<|begin_of_text|>")


def _vicuna_hf(tok):
    return _hf(tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<unk>")


def _ours(tok, records, template, loss_mask="llava_next"):
    turns = chat.normalize_turns(records)
    options = chat.ChatOptions(template=template, loss_mask=loss_mask)
    ids, trained = chat.tokenize_conversation(turns, tok, options)
    # LLaVA's input_ids carry IMAGE_TOKEN_INDEX where we carry the tokenizer's <image>
    image = tok.token_to_id("<image>")
    return [ref.IMAGE_TOKEN_INDEX if i == image else i for i in ids.tolist()], trained.tolist()


def _labels(target) -> list[bool]:
    return [t != ref.IGNORE_INDEX for t in target]


def _trained_text(tok, ids, trained) -> str:
    return tok.decode([i for i, t in zip(ids, trained, strict=True) if t],
                      skip_special_tokens=False)  # fmt: skip


ORIG = {"vicuna_v1": (ref.preprocess_v1, ref.conv_vicuna_v1),
        "mistral_instruct": (ref.preprocess_llama_2, ref.conv_mistral_instruct)}  # fmt: skip


def _orig(template, records, hf, **kw):
    fn, conv = ORIG[template]
    has_image = any("<image>" in r["value"] for r in records)
    return fn(records, hf, has_image, conv=conv(), **kw)


TOKENIZERS = {
    "bpe_700": lambda: _vicuna_bpe(700, image_id=650),
    "bpe_611": lambda: _vicuna_bpe(611, image_id=3),
    "sentencepiece_legacy": lambda: _sentencepiece("always"),
}


@pytest.fixture(scope="module", params=sorted(TOKENIZERS))
def llama_tok(request):
    tok = TOKENIZERS[request.param]()
    return tok, _vicuna_hf(tok)


@pytest.mark.parametrize("conversation", sorted(CONVERSATIONS))
@pytest.mark.parametrize("template", sorted(ORIG))
@pytest.mark.parametrize("loss_mask", chat.MASK_MODES)
def test_vicuna_and_mistral_equal_llava(llama_tok, template, conversation, loss_mask):
    """preprocess_v1 (vicuna_v1, its `- 2` offsets, `</s>` closing every answer) and
    preprocess_llama_2 (mistral_instruct: `<s>[INST] q [/INST] a </s>[INST] ...`, no `<s>`
    between rounds) on multi-round conversations: same ids, same labels, in both of our
    mask modes (for these templates they are one mask)."""
    tok, hf = llama_tok
    records = _records(conversation)
    ids, target, mismatch = _orig(template, records, hf)
    assert not mismatch
    got_ids, got_trained = _ours(tok, records, template, loss_mask)
    assert got_ids == ids
    assert got_trained == _labels(target)
    if tok.decoder.__class__ is decoders.ByteLevel:  # a lossless decode: read the labels
        answers = [v for r, v in CONVERSATIONS[conversation] if r == "gpt"]
        end = "</s>" if template == "vicuna_v1" else " </s>"
        want = "".join(f" {a}{end}" for a in answers)
        assert _trained_text(tok, got_ids, got_trained) == want


# mistralai/Mistral-7B-Instruct-v0.2 tokenizer_config.json `chat_template` as released (the
# one llama.cpp's tests/test-chat-template.cpp quotes for that model).
MISTRAL_V02_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}"
    "{% endif %}{% endfor %}"
)


def test_mistral_instruct_multi_round_is_conv_mistral_instruct():
    """The rendering, round after round, is conv_mistral_instruct.get_prompt (what
    llava-v1.6-mistral trained on); the generation prompt is get_prompt with the last
    assistant message None. HF's Mistral-7B-Instruct-v0.2 chat template (the jinja an
    original llava-v1.6-mistral checkpoint ships) renders the same first-round prompt,
    and later rounds differ only in the spaces around `</s>` (LLaVA: " a </s>[INST]",
    HF: "a</s>[INST]"): HF's template renders LLaVA's text exactly when each answer is
    written " a "."""
    records = _records("three_rounds")
    conv = ref.conv_mistral_instruct()
    for r in records:
        conv.append_message(conv.roles[r["from"] == "gpt"], r["value"])
    turns = chat.normalize_turns(records)
    pieces = chat.render_pieces(turns, "mistral_instruct", None, generation=False)
    assert "".join(text for text, _ in pieces) == "<s>" + conv.get_prompt()
    conv.messages[-1][1] = None
    prompt = chat.render_generation_prompt(turns[:-1], "mistral_instruct")
    assert prompt == "<s>" + conv.get_prompt()
    assert prompt.count("<s>") == 1 and prompt.endswith("[INST] Count them. [/INST]")

    from data_pipelines.chat_template import render_chat_template

    # HF's template on the same rounds: LLaVA's text once each answer is written " a ".
    msgs = [{"role": "user" if r == "human" else "assistant",
             "content": v if r == "human" else f" {v} "}
            for r, v in CONVERSATIONS["three_rounds"][:-1]]  # fmt: skip
    hf = render_chat_template(MISTRAL_V02_TEMPLATE, msgs, bos_token="<s>", eos_token="</s>")
    assert hf == prompt
    first = render_chat_template(MISTRAL_V02_TEMPLATE, msgs[:1], bos_token="<s>")
    assert first == chat.render_generation_prompt(turns[:1], "mistral_instruct")


def test_vicuna_v1_where_llava_bookkeeping_breaks():
    """Documented fix: with a SentencePiece vocabulary whose rounds do not tokenise alone
    as they do after `</s>` (non-legacy prefix scheme, or the `not tokenizer.legacy` -1
    guess on a vocabulary it does not fit), LLaVA prints "tokenization mismatch" and
    masks the whole conversation; we keep its ids and train every answer + `</s>`."""
    records = _records("three_rounds")
    for scheme, legacy in (("first", False), ("first", True), ("always", False)):
        tok = _sentencepiece(scheme)
        ids, target, mismatch = _orig("vicuna_v1", records, _vicuna_hf(tok), legacy=legacy)
        assert mismatch and not any(_labels(target))
        got_ids, got_trained = _ours(tok, records, "vicuna_v1")
        assert got_ids == ids  # chunked at <image> as tokenizer_image_token, bos as ids
        # (the Metaspace decode drops the leading "▁" of the first trained token)
        assert _trained_text(tok, got_ids, got_trained) == (
            "A red circle.</s> Blue, left of the circle.</s> 2</s>"
        )


@pytest.mark.parametrize("with_bos", [True, False])
def test_plain_trains_the_caption_only(with_bos):
    """preprocess_plain: the user turn becomes `<image>`, the caption + "\\n" is trained,
    the bos (when the tokenizer adds one: Vicuna yes, Qwen-style no) and the image not."""
    if with_bos:
        tok = _vicuna_bpe(640, image_id=600)
        hf = _vicuna_hf(tok)
    else:
        tok = small_bpe(520, specials={"<image>": 17}, style="chatml").tokenizer
        hf = _hf(tok, eos_token="<|im_end|>", pad_token="<|pad|>")
    records = [{"from": "human", "value": "Describe the picture.\n<image>"},
               {"from": "gpt", "value": "A red circle sits left of a blue square."}]  # fmt: skip
    ids, target = ref.preprocess_plain(records, hf)
    got_ids, got_trained = _ours(tok, records, "plain")
    assert got_ids == ids and got_trained == _labels(target)
    assert ids[: 1 + with_bos] == [tok.token_to_id("<s>")] * with_bos + [ref.IMAGE_TOKEN_INDEX]
    assert _trained_text(tok, got_ids, got_trained) == records[1]["value"] + "\n"


LLAMA3_TEMPLATE_NOTE = "Meta-Llama-3-8B-Instruct's chat template (test_chat_template.py)"


@pytest.fixture(scope="module")
def llama3():
    from test_chat_template import LLAMA3_TEMPLATE

    tok = _llama3_bpe()
    hf = _hf(tok, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
             pad_token="<|end_of_text|>")  # fmt: skip
    hf.chat_template = LLAMA3_TEMPLATE  # LLAMA3_TEMPLATE_NOTE
    return tok, hf


@pytest.mark.parametrize("conversation", sorted(CONVERSATIONS))
def test_llava_llama_3_equals_preprocess_llama3(llama3, conversation):
    """preprocess_llama3 (LLaVA-NeXT): the system + each message through Llama-3's own
    template, headers included in the assistant labels, then every
    <|begin_of_text|>/<|start_header_id|>/<|end_header_id|>/<|eot_id|> unmasked anywhere.
    Our `llava_next` mode gives the same ids and labels; `assistant` trains the answers
    and their <|eot_id|> only (content trimmed, as the template trims)."""
    tok, hf = llama3
    records = _records(conversation)
    has_image = any("<image>" in r["value"] for r in records)
    ids, target = ref.preprocess_llama3(records, hf, has_image)
    got_ids, got_trained = _ours(tok, records, "llava_llama_3")
    assert got_ids == ids and got_trained == _labels(target)
    # headers appear in the system turn and every round: the unmasking reaches them all
    header = tok.token_to_id("<|start_header_id|>")
    assert (
        sum(t for i, t in zip(got_ids, got_trained, strict=True) if i == header) == len(records) + 1
    )
    got_ids, got_trained = _ours(tok, records, "llava_llama_3", loss_mask="assistant")
    answers = [v.strip() for r, v in CONVERSATIONS[conversation] if r == "gpt"]
    assert _trained_text(tok, got_ids, got_trained) == "".join(f"{a}<|eot_id|>" for a in answers)


def test_template_default_system_prompt_from_a_config_string():
    """`data.system_prompt = "template_default"` (configs/common.py) is the template's
    own system prompt; "" is none; any other string is that prompt."""
    for name in ("vicuna_v1", "llava_llama_3", "qwen_1_5", "plain", "mistral_instruct"):
        got = chat.ChatOptions(template=name, system_prompt=chat.TEMPLATE_DEFAULT).system_prompt
        assert got == (chat.get_template(name).system or None)
    assert chat.ChatOptions(template="vicuna_v1", system_prompt="").system_prompt is None
    assert chat.ChatOptions(template="vicuna_v1", system_prompt="Be terse.").system_prompt == (
        "Be terse."
    )
    # the vicuna_v1 default is conv_vicuna_v1's system (LLaVA-1.5 `--version v1`)
    assert chat.get_template("vicuna_v1").system == ref.conv_vicuna_v1().system
    assert chat.get_template("llava_llama_3").system == ref.LLAMA3_SYSTEM
