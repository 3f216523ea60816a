"""LLaVA's training-time prompt rendering and label masking, ported line by line.

The reference the loss masks of data_pipelines/chat.py are tested against
(tests/data/test_llava_masks.py). Read at:

  haotian-liu/LLaVA c121f0432da27facab705978f83c4ada465e46fd
    llava/train/train.py      preprocess_plain, preprocess_v1, preprocess_llama_2
    llava/mm_utils.py         tokenizer_image_token
    llava/conversation.py     Conversation.get_prompt (TWO, LLAMA_2, PLAIN), conv_vicuna_v1,
                              conv_mistral_instruct, conv_llava_plain
  LLaVA-VL/LLaVA-NeXT df179663ae8b83207df100a1f7af24caec633ff9
    llava/train/train.py      preprocess_llama3 (its preprocess_plain / _v1 / _llama_2 are
                              the same code as haotian-liu's, reformatted)

Changes from the original, none of which touches a mask: torch tensors are lists;
`conversation_lib.default_conversation` is an argument (`Conv`); `tokenizer.legacy`
(only slow Llama tokenizers have it) is the argument `legacy`; the "tokenization
mismatch" warning is a returned flag; `IS_TOKENIZER_GREATER_THAN_0_14` is True (the
tokenizers here are >= 0.14). `tokenizer` is a transformers tokenizer: `tokenizer(text)`
adds what its post-processor adds (a Llama-style `<s>`), as in LLaVA.
"""

from __future__ import annotations

import copy
import dataclasses

IGNORE_INDEX = -100
IMAGE_TOKEN_INDEX = -200
DEFAULT_IMAGE_TOKEN = "<image>"


@dataclasses.dataclass
class Conv:
    """conversation.py `Conversation`, the fields get_prompt reads."""

    system: str
    roles: tuple[str, str]
    sep_style: str  # "two" | "llama_2" | "plain"
    sep: str
    sep2: str | None = None
    messages: list = dataclasses.field(default_factory=list)

    def get_prompt(self) -> str:
        messages = self.messages
        if self.sep_style == "two":
            seps = [self.sep, self.sep2]
            ret = self.system + seps[0]
            for i, (role, message) in enumerate(messages):
                if message:
                    ret += role + ": " + message + seps[i % 2]
                else:
                    ret += role + ":"
        elif self.sep_style == "llama_2":

            def wrap_sys(msg):
                return f"<<SYS>>\n{msg}\n<</SYS>>\n\n" if len(msg) > 0 else msg

            def wrap_inst(msg):
                return f"[INST] {msg} [/INST]"

            ret = ""
            for i, (role, message) in enumerate(messages):
                if i == 0:
                    assert message, "first message should not be none"
                    assert role == self.roles[0], "first message should come from user"
                if message:
                    if i == 0:
                        message = wrap_sys(self.system) + message
                    if i % 2 == 0:
                        message = wrap_inst(message)
                        ret += self.sep + message
                    else:
                        ret += " " + message + " " + self.sep2
                else:
                    ret += ""
            ret = ret.lstrip(self.sep)
        elif self.sep_style == "plain":
            seps = [self.sep, self.sep2]
            ret = self.system
            for i, (_, message) in enumerate(messages):
                if message:
                    ret += message + seps[i % 2]
                else:
                    ret += ""
        else:
            raise ValueError(f"Invalid style: {self.sep_style}")
        return ret

    def append_message(self, role, message):
        self.messages.append([role, message])


def conv_vicuna_v1() -> Conv:
    return Conv(
        system="A chat between a curious user and an artificial intelligence assistant. "
        "The assistant gives helpful, detailed, and polite answers to the user's questions.",
        roles=("USER", "ASSISTANT"), sep_style="two", sep=" ", sep2="</s>",
    )  # fmt: skip


def conv_mistral_instruct() -> Conv:
    return Conv(system="", roles=("USER", "ASSISTANT"), sep_style="llama_2", sep="",
                sep2="</s>")  # fmt: skip


def conv_llava_plain() -> Conv:
    return Conv(system="", roles=("", ""), sep_style="plain", sep="\n")


def tokenizer_image_token(prompt, tokenizer, image_token_index=IMAGE_TOKEN_INDEX):
    prompt_chunks = [tokenizer(chunk).input_ids for chunk in prompt.split("<image>")]

    def insert_separator(X, sep):  # noqa: N803 - the original's names
        return [ele for sublist in zip(X, [sep] * len(X), strict=True) for ele in sublist][:-1]

    input_ids = []
    offset = 0
    if (len(prompt_chunks) > 0 and len(prompt_chunks[0]) > 0
            and prompt_chunks[0][0] == tokenizer.bos_token_id):  # fmt: skip
        offset = 1
        input_ids.append(prompt_chunks[0][0])
    for x in insert_separator(prompt_chunks, [image_token_index] * (offset + 1)):
        input_ids.extend(x[offset:])
    return input_ids


def _prompt(source, conv: Conv) -> str:
    conv = copy.deepcopy(conv)
    roles = {"human": conv.roles[0], "gpt": conv.roles[1]}
    if roles[source[0]["from"]] != conv.roles[0]:
        source = source[1:]  # Skip the first one if it is not from human
    conv.messages = []
    for j, sentence in enumerate(source):
        role = roles[sentence["from"]]
        assert role == conv.roles[j % 2]
        conv.append_message(role, sentence["value"])
    return conv.get_prompt()


def _tokenize(text, tokenizer, has_image):
    return tokenizer_image_token(text, tokenizer) if has_image else tokenizer(text).input_ids


def preprocess_v1(source, tokenizer, has_image, *, conv: Conv, legacy: bool = True):
    """-> (input_ids, labels, mismatch). One conversation (orig: a batch of them)."""
    conversation = _prompt(source, conv)
    input_ids = _tokenize(conversation, tokenizer, has_image)
    target = list(input_ids)
    sep = conv.sep + conv.roles[1] + ": "
    total_len = sum(1 for t in target if t != tokenizer.pad_token_id)
    rounds = conversation.split(conv.sep2)
    cur_len = 1
    target[:cur_len] = [IGNORE_INDEX] * cur_len
    for i, rou in enumerate(rounds):
        if rou == "":
            break
        parts = rou.split(sep)
        if len(parts) != 2:
            break
        parts[0] += sep
        round_len = len(_tokenize(rou, tokenizer, has_image))
        instruction_len = len(_tokenize(parts[0], tokenizer, has_image)) - 2
        if i != 0 and not legacy:  # and IS_TOKENIZER_GREATER_THAN_0_14
            round_len -= 1
            instruction_len -= 1
        target[cur_len : cur_len + instruction_len] = [IGNORE_INDEX] * len(
            target[cur_len : cur_len + instruction_len]
        )
        cur_len += round_len
    target[cur_len:] = [IGNORE_INDEX] * len(target[cur_len:])
    mismatch = cur_len != total_len
    if mismatch:  # orig: "WARNING: tokenization mismatch ... (ignored)"
        target = [IGNORE_INDEX] * len(target)
    return input_ids, target, mismatch


def preprocess_llama_2(source, tokenizer, has_image, *, conv: Conv):
    """-> (input_ids, labels, mismatch)."""
    conversation = _prompt(source, conv)
    input_ids = _tokenize(conversation, tokenizer, has_image)
    target = list(input_ids)
    sep = "[/INST] "
    total_len = sum(1 for t in target if t != tokenizer.pad_token_id)
    rounds = conversation.split(conv.sep2)
    cur_len = 1
    target[:cur_len] = [IGNORE_INDEX] * cur_len
    for rou in rounds:
        if rou == "":
            break
        parts = rou.split(sep)
        if len(parts) != 2:
            break
        parts[0] += sep
        round_len = len(_tokenize(rou, tokenizer, has_image))
        instruction_len = len(_tokenize(parts[0], tokenizer, has_image)) - 2
        target[cur_len : cur_len + instruction_len] = [IGNORE_INDEX] * len(
            target[cur_len : cur_len + instruction_len]
        )
        cur_len += round_len
    target[cur_len:] = [IGNORE_INDEX] * len(target[cur_len:])
    mismatch = cur_len != total_len
    if mismatch:
        target = [IGNORE_INDEX] * len(target)
    return input_ids, target, mismatch


def preprocess_plain(source, tokenizer):
    """-> (input_ids, labels). `source` is changed as orig changes it (user text dropped)."""
    source = copy.deepcopy(source)
    assert len(source) == 2
    assert DEFAULT_IMAGE_TOKEN in source[0]["value"]
    source[0]["value"] = DEFAULT_IMAGE_TOKEN
    conversation = source[0]["value"] + source[1]["value"] + conv_llava_plain().sep
    input_ids = tokenizer_image_token(conversation, tokenizer)
    target = list(input_ids)
    tokenized_len = len(tokenizer_image_token(source[0]["value"], tokenizer))
    target[:tokenized_len] = [IGNORE_INDEX] * tokenized_len
    return input_ids, target


LLAMA3_SYSTEM = (
    "You are a helpful language and vision assistant. You are able to understand the visual "
    "content that the user provides, and assist the user with a variety of tasks using "
    "natural language."
)


def preprocess_llama3(source, tokenizer, has_image, system_message: str = LLAMA3_SYSTEM):
    """-> (input_ids, labels). `tokenizer` carries Llama-3-Instruct's chat template."""
    roles = {"human": "user", "gpt": "assistant"}
    tokenizer = copy.deepcopy(tokenizer)
    if has_image:
        tokenizer.add_tokens(["<image>"], special_tokens=True)
    image_token_index = tokenizer.convert_tokens_to_ids("<image>")
    unmask_tokens = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                     "<|eot_id|>", "\n\n"]  # fmt: skip
    unmask_tokens_idx = [tokenizer.convert_tokens_to_ids(tok) for tok in unmask_tokens]

    def template(messages):  # transformers 5 returns a dict unless told otherwise
        return list(tokenizer.apply_chat_template(messages, return_dict=False))

    if roles[source[0]["from"]] != roles["human"]:
        source = source[1:]
    input_id, target = [], []
    input_id += template([{"role": "system", "content": system_message}])
    target += [IGNORE_INDEX] * len(input_id)
    for conv in source:
        role = roles.get(conv["from"], conv["from"])
        encode_id = template([{"role": role, "content": conv["value"]}])[1:]
        input_id += encode_id
        if role in ["user", "system"]:
            target += [IGNORE_INDEX] * len(encode_id)
        else:
            target += encode_id
    assert len(input_id) == len(target)
    for idx, encode_id in enumerate(input_id):
        if encode_id in unmask_tokens_idx:
            target[idx] = encode_id
        if encode_id == image_token_index:
            input_id[idx] = IMAGE_TOKEN_INDEX
    return input_id, target
