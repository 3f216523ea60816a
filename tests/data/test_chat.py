"""ChatML ids and loss masks on the real Qwen2 vocabulary, hand-written expectations."""

import numpy as np
import pytest

from data_pipelines import chat
from data_pipelines.sample import BadSample
from data_pipelines.tokenizer import build_qwen2_tokenizer

IM_START, IM_END, NL, IMG, VID, PAD = 151644, 151645, 198, 151646, 151647, 151643
VISUAL = (IMG, VID)

# <|im_start|>system\nYou are a helpful assistant.<|im_end|>\n
SYSTEM = [IM_START, 8948, NL, 2610, 525, 264, 10950, 17847, 13, IM_END, NL]
# <|im_start|>user\n<image>\nWhat is this?<|im_end|>\n
USER = [IM_START, 872, NL, IMG, NL, 3838, 374, 419, 30, IM_END, NL]
# <|im_start|>assistant\nA cat.<|im_end|>\n
ASSISTANT = [IM_START, 77091, NL, 32, 8251, 13, IM_END, NL]

CONV = [{"from": "human", "value": "<image>\nWhat is this?"}, {"from": "gpt", "value": "A cat."}]


@pytest.fixture(scope="module")
def tok():
    return build_qwen2_tokenizer()


def _run(tok, conv, **kw):
    turns = chat.normalize_turns(conv)
    ids, trained = chat.tokenize_conversation(turns, tok, chat.ChatOptions(**kw))
    targets, mask = chat.next_token_targets(ids, trained, VISUAL, PAD)
    return ids.tolist(), targets.tolist(), mask.astype(int).tolist()


def test_qwen_assistant_mask(tok):
    ids, targets, mask = _run(tok, CONV, loss_mask="assistant")
    assert ids == SYSTEM + USER + ASSISTANT
    assert targets == ids[1:] + [PAD]
    # trained: "A", " cat", ".", <|im_end|> predicted from the header "\n" onwards
    want = [0] * 30
    for t in (24, 25, 26, 27):
        want[t] = 1
    assert mask == want
    assert [targets[t] for t in range(30) if mask[t]] == [32, 8251, 13, IM_END]


def test_qwen_llava_next_mask(tok):
    ids, targets, mask = _run(tok, CONV, loss_mask="llava_next")
    assert ids == SYSTEM + USER + ASSISTANT
    # labels: every 198 / <|im_start|> / <|im_end|> + the whole assistant piece;
    # position t is trained when label t + 1 is.
    label_positions = [2, 9, 10, 11, 13, 15, 20, 21, *range(22, 30)]
    want = [0] * 30
    for j in label_positions:
        want[j - 1] = 1
    assert mask == want
    assert [targets[t] for t in range(30) if mask[t]] == [
        NL, IM_END, NL,  # system
        IM_START, NL, NL, IM_END, NL,  # user: the "\n" after <image> is trained
        IM_START, 77091, NL, 32, 8251, 13, IM_END, NL,  # assistant piece
    ]  # fmt: skip
    assert mask[14] == 1 and ids[14] == IMG  # the placeholder position predicts "\n"
    assert mask[13] == 0  # ... but nothing predicts the placeholder


def test_system_prompt_options(tok):
    ids, _, mask = _run(tok, CONV, system_prompt=None)
    assert ids == USER + ASSISTANT and sum(mask) == 4
    ids, _, _ = _run(tok, CONV, system_prompt="Be brief.")
    assert ids[:7] == [IM_START, 8948, NL, 3430, 9814, 13, IM_END]
    assert (
        tok.decode(ids[:7], skip_special_tokens=False) == "<|im_start|>system\nBe brief.<|im_end|>"
    )


def test_plain_template(tok):
    conv = [
        {"from": "human", "value": "Describe.\n<image>"},
        {"from": "gpt", "value": "A red square."},
    ]
    ids, targets, mask = _run(tok, conv, template="plain", loss_mask="llava_next")
    assert ids == [IMG, 32, 2518, 9334, 624]  # "<image>" "A" " red" " square" ".\n"
    assert targets == [32, 2518, 9334, 624, PAD]
    assert mask == [1, 1, 1, 1, 0]
    with pytest.raises(BadSample, match="one user"):
        _run(tok, conv + conv, template="plain")


def test_roles_content_keys_and_leading_turn(tok):
    conv = [
        {"role": "assistant", "content": "dropped"},
        {"role": "user", "content": "<image>\nWhat is this?"},
        {"role": "assistant", "content": "A cat."},
    ]
    assert _run(tok, conv) == _run(tok, CONV)
    with pytest.raises(BadSample) as e:
        chat.normalize_turns([{"from": "robot", "value": "x"}])
    assert e.value.reason == "malformed_record"
    with pytest.raises(BadSample) as e:
        chat.normalize_turns([{"from": "human", "value": ["x"]}])
    assert e.value.reason == "malformed_record"


def test_middle_system_turn_is_masked(tok):
    conv = CONV[:1] + [{"role": "system", "content": "x"}] + CONV[1:]
    _, targets, mask = _run(tok, conv, loss_mask="assistant")
    assert [t for t, m in zip(targets, mask, strict=True) if m] == [32, 8251, 13, IM_END]


def test_multi_turn_assistant(tok):
    conv = CONV + [{"from": "human", "value": "Describe it."}, {"from": "gpt", "value": "A dog."}]
    ids, targets, mask = _run(tok, conv)
    assert ids[30:] == [IM_START, 872, NL, 74785, 432, 13, IM_END, NL] + [
        IM_START, 77091, NL, 32, 5562, 13, IM_END, NL
    ]  # fmt: skip
    assert [t for t, m in zip(targets, mask, strict=True) if m] == [32, 8251, 13, IM_END] * 1 + [
        32, 5562, 13, IM_END
    ]  # fmt: skip


def test_image_move_to_front_quirk():
    assert chat.move_image_to_front("What is this? <image> ") == "<image>\nWhat is this?"
    assert chat.move_image_to_front("<image>\nkeep  ") == "<image>\nkeep  "  # at start: untouched
    two = "a <image> b <image>"
    assert chat.move_image_to_front(two) == two  # several: interleaved, left as written
    assert chat.move_image_to_front("no image") == "no image"


def test_content_starting_with_newline(tok):
    # "\n\n" merges the header newline with the content's: trained as content (assistant)
    conv = [CONV[0], {"from": "gpt", "value": "\nA cat."}]
    ids, targets, mask = _run(tok, conv)
    assert ids[22:25] == [IM_START, 77091, 271]
    assert [t for t, m in zip(targets, mask, strict=True) if m] == [271, 32, 8251, 13, IM_END]


def test_expand_trained():
    ids = np.array([1, IMG, 2, VID, 3])
    trained = np.array([True, True, True, False, True])
    out = chat.expand_trained(ids, trained, [3, 2], VISUAL)
    assert out.tolist() == [True, False, False, False, True, False, False, True]


def _orig_preprocess_qwen(conversations, hf_tok, system_message="You are a helpful assistant."):
    """LLaVA-NeXT `preprocess_qwen` (train.py), transcribed; returns (ids, labels != -100)."""
    roles = {"human": "user", "gpt": "assistant"}
    template = (
        "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + "
        "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    )

    def apply(conv):
        text = hf_tok.apply_chat_template(conv, chat_template=template, tokenize=False)
        return hf_tok(text, add_special_tokens=False).input_ids

    source = conversations
    if roles.get(source[0]["from"], source[0]["from"]) != roles["human"]:
        source = source[1:]
    input_id = apply([{"role": "system", "content": system_message}])
    target = [-100] * len(input_id)
    for conv in source:
        role = roles.get(conv["from"], conv["from"])
        encode_id = apply([{"role": role, "content": conv["value"]}])
        input_id += encode_id
        target += [-100] * len(encode_id) if role in ["user", "system"] else encode_id
    for idx, encode_id in enumerate(input_id):
        if encode_id in [198, IM_START, IM_END]:
            target[idx] = encode_id
    return input_id, [t != -100 for t in target]


def test_llava_next_matches_orig_preprocess_qwen(tok, tmp_path):
    transformers = pytest.importorskip("transformers")
    from data_pipelines.tokenizer import save_hf_tokenizer_files

    save_hf_tokenizer_files(tmp_path, tok)
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    convs = [
        CONV,
        [{"from": "gpt", "value": "leading, dropped"}] + CONV,
        [
            {"from": "human", "value": "<image>\n<image>\nDiff?\n\nBe  brief.\n"},
            {"from": "gpt", "value": "\nNone.\n1. a\n2. b"},
            {"from": "human", "value": "Und auf Deutsch? 日本語 ok"},
            {"from": "gpt", "value": "  Nein.  "},
        ],
    ]
    for conv in convs:
        ids, trained = chat.tokenize_conversation(
            chat.normalize_turns(conv), tok, chat.ChatOptions(loss_mask="llava_next")
        )
        want_ids, want_trained = _orig_preprocess_qwen(conv, hf_tok)
        assert ids.tolist() == want_ids
        assert trained.tolist() == want_trained


def test_assistant_mask_is_hf_generation_mask_plus_im_end(tok, tmp_path):
    """HF `return_assistant_tokens_mask` on llava-hf's template (content only) + <|im_end|>."""
    transformers = pytest.importorskip("transformers")
    from data_pipelines.tokenizer import save_hf_tokenizer_files

    save_hf_tokenizer_files(tmp_path, tok)
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    messages = [
        {"role": "system", "content": [{"type": "text", "text": "You are a helpful assistant."}]},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A cat."}]},
        {"role": "user", "content": [{"type": "text", "text": "Describe it."}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A dog, sleeping."}]},
    ]
    out = hf_tok.apply_chat_template(
        messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    conv = CONV + [
        {"from": "human", "value": "Describe it."},
        {"from": "gpt", "value": "A dog, sleeping."},
    ]
    ids, trained = chat.tokenize_conversation(chat.normalize_turns(conv), tok)
    assert ids.tolist() == list(out["input_ids"])
    want = np.asarray(out["assistant_masks"], bool)
    want[1:] |= want[:-1] & (ids[1:] == IM_END)  # the <|im_end|> closing each assistant turn
    assert trained.tolist() == want.tolist()


def test_word_count():
    assert chat.word_count(chat.normalize_turns(CONV)) == 6  # orig modality_lengths


# ---- the other LLaVA-NeXT templates, on tokenizers other than Qwen's --------------------

TWO_ROUNDS = [("user", "<image>\nWhat is this?"), ("assistant", "A cat."),
              ("user", "And now?"), ("assistant", "A dog, sleeping.")]  # fmt: skip


def _spec_tokenizer(specials):
    from test_chat_template import small_tokenizer

    return small_tokenizer(specials)


LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                   "<|end_header_id|>", "<|eot_id|>", "<image>", "<video>"]  # fmt: skip
VICUNA_SPECIALS = ["<unk>", "<s>", "</s>", "<image>", "<video>"]


def _trained_text(tok, turns, **kw):
    """The trained targets decoded per contiguous run (what the loss sees)."""
    ids, trained = chat.tokenize_conversation(turns, tok, chat.ChatOptions(**kw))
    targets, mask = chat.next_token_targets(ids, trained, [tok.token_to_id("<image>")], 0)
    runs, cur = [], []
    for t, m in zip(targets.tolist(), mask.tolist(), strict=True):
        if m:
            cur.append(t)
        elif cur:
            runs.append(tok.decode(cur, skip_special_tokens=False))
            cur = []
    return runs


@pytest.mark.parametrize(
    "template,specials,want",
    [
        ("vicuna_v1", VICUNA_SPECIALS, [" A cat.</s>", " A dog, sleeping.</s>"]),
        ("mistral_instruct", VICUNA_SPECIALS, [" A cat. </s>", " A dog, sleeping. </s>"]),
        ("llava_llama_3", LLAMA3_SPECIALS, ["A cat.<|eot_id|>", "A dog, sleeping.<|eot_id|>"]),
    ],
)
def test_assistant_masks_on_other_tokenizers(template, specials, want):
    tok = _spec_tokenizer(specials)
    # The token holding the space after "ASSISTANT:" / "[/INST]" is trained (orig's
    # `instruction_len - 2` trains the "▁A" token the same way).
    assert _trained_text(tok, TWO_ROUNDS, template=template, loss_mask="assistant") == want
    if template != "llava_llama_3":  # orig masks these rounds exactly like `assistant`
        assert _trained_text(tok, TWO_ROUNDS, template=template, loss_mask="llava_next") == want


def test_chatml_direct_mask(tok):
    ids, trained = chat.tokenize_conversation(
        TWO_ROUNDS, tok, chat.ChatOptions(template="chatml_direct", loss_mask="llava_next")
    )
    text = (
        "<|im_start|>system\nAnswer the questions.<|im_end|><|im_start|>user\n<image>\n"
        "What is this?<|im_end|><|im_start|>assistant\nA cat.<|im_end|><|im_start|>user\n"
        "And now?<|im_end|><|im_start|>assistant\nA dog, sleeping.<|im_end|>"
    )
    assert ids.tolist() == chat.encode(tok, text)
    labels = tok.decode(ids[trained].tolist(), skip_special_tokens=False)
    assert labels == "A cat.<|im_end|>A dog, sleeping.<|im_end|>"


def test_llava_llama_3_llava_next_matches_orig_preprocess_llama3(tmp_path):
    """LLaVA-NeXT `preprocess_llama3` (train.py) transcribed on HF's tokenizer."""
    transformers = pytest.importorskip("transformers")
    from test_chat_template import LLAMA3_TEMPLATE, save_tokenizer

    tok = _spec_tokenizer(LLAMA3_SPECIALS)
    save_tokenizer(tmp_path, tok, LLAMA3_TEMPLATE, bos_token="<|begin_of_text|>",
                   eos_token="<|eot_id|>")  # fmt: skip
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    system = chat.get_template("llava_llama_3").system
    unmask = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
              "\n\n"]  # fmt: skip
    unmask_idx = [hf.convert_tokens_to_ids(t) for t in unmask]  # "\n\n": not a vocab entry
    assert unmask_idx[-1] is None or unmask_idx[-1] == hf.unk_token_id
    input_id = list(hf.apply_chat_template([{"role": "system", "content": system}],
                                           return_dict=False))  # fmt: skip
    target = [False] * len(input_id)
    for role, content in TWO_ROUNDS:
        encode_id = list(hf.apply_chat_template([{"role": role, "content": content}],
                                                return_dict=False))[1:]  # fmt: skip
        input_id += encode_id
        target += [role == "assistant"] * len(encode_id)
    target = [t or i in unmask_idx for t, i in zip(target, input_id, strict=True)]
    ids, trained = chat.tokenize_conversation(
        TWO_ROUNDS, tok, chat.ChatOptions(template="llava_llama_3", loss_mask="llava_next")
    )
    assert ids.tolist() == input_id
    assert trained.tolist() == target


def test_template_names_aliases_and_system_defaults():
    assert chat.ChatOptions(template="qwen").template == "qwen_1_5"
    assert chat.ChatOptions(template="v1").system_prompt == chat.get_template("vicuna_v1").system
    assert chat.ChatOptions(template="mistral_instruct").system_prompt is None
    assert chat.ChatOptions(system_prompt="").system_prompt is None
    with pytest.raises(ValueError, match="not in"):
        chat.ChatOptions(template="llama_9")
    with pytest.raises(ValueError, match="user/assistant turns in turn"):
        chat.render_generation_prompt([("user", "a"), ("user", "b")], "mistral_instruct")
    with pytest.raises(BadSample, match="user/assistant turns in turn"):
        chat.render_pieces([("user", "a"), ("user", "b")], "vicuna_v1", None, generation=False)
