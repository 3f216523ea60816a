"""A checkpoint's own jinja chat template, rendered as HF renders it; the inference prompt.

`load_chat_template(ckpt_dir)` finds the template where transformers 5 finds it, first
hit wins (`ProcessorMixin.get_processor_dict`, then `PreTrainedTokenizerBase.from_pretrained`
for checkpoints whose processor has none):

  processor_config.json  `chat_template` (a string)
  chat_template.json     `chat_template` (the legacy processor file; HF prefers it to .jinja)
  chat_template.jinja    the whole file
  tokenizer_config.json  `chat_template`: a string, or a list of {name, template} (HF
                         takes the one named "default", as `get_chat_template`)

`render_chat_template` is `transformers.utils.chat_template_utils.render_jinja_template`
without transformers: the same sandboxed environment (trim_blocks, lstrip_blocks,
loopcontrols, `tojson` without HTML escaping, `raise_exception`, `strftime_now`, `dict`,
a namespace that refuses underscore names) and message keys whose value is None dropped.
`{% generation %}` renders its body unchanged (HF only records where it was). Messages
and variables reach the template as plain JSON-like data, as in HF.
`template_special_tokens(ckpt_dir)` is what HF passes beside the messages: the
tokenizer's named special tokens (`special_tokens_map`: bos/eos/unk/sep/pad/cls/mask
and `extra_special_tokens` such as `image_token`).

`render_prompt` is the one prompt renderer of inference: the jinja template when the
checkpoint has one, else a LLaVA-NeXT conversation template by name (data_pipelines/chat.py)
in generation mode.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import numpy as np
from jinja2.sandbox import ImmutableSandboxedEnvironment

from data_pipelines import chat

# HF's `SPECIAL_TOKENS_ATTRIBUTES`, the named tokens a template sees as variables.
SPECIAL_TOKEN_NAMES = (
    "bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token",
)  # fmt: skip


class ChatTemplateError(ValueError):
    """A chat template file or field that cannot be read."""


# ---- finding the template -------------------------------------------------------------


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ChatTemplateError(f"{path}: not readable JSON: {err}") from err
    if not isinstance(data, dict):
        raise ChatTemplateError(f"{path}: a JSON object expected, got {type(data).__name__}")
    return data


def _template_field(value: Any, where: str) -> str:
    """A `chat_template` value: a string, or HF's list of {name, template} ("default")."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        named = {}
        for k, entry in enumerate(value):
            if not (isinstance(entry, dict) and isinstance(entry.get("name"), str)
                    and isinstance(entry.get("template"), str)):  # fmt: skip
                raise ChatTemplateError(f"{where}[{k}]: expected {{name, template}} strings")
            named[entry["name"]] = entry["template"]
        if "default" not in named:
            raise ChatTemplateError(
                f"{where}: several templates {sorted(named)} and none named 'default'"
            )
        return named["default"]
    raise ChatTemplateError(f"{where}: a string or a list of {{name, template}}, "
                            f"got {type(value).__name__}")  # fmt: skip


def load_chat_template(ckpt_dir: str | os.PathLike) -> str | None:
    """The checkpoint's jinja chat template (the order in the module docstring), or None."""
    root = Path(ckpt_dir)
    proc = root / "processor_config.json"
    if proc.is_file() and _read_json(proc).get("chat_template") is not None:
        return _template_field(_read_json(proc)["chat_template"], f"{proc}: `chat_template`")
    legacy = root / "chat_template.json"
    if legacy.is_file():
        data = _read_json(legacy)
        if "chat_template" not in data:
            raise ChatTemplateError(f"{legacy}: no `chat_template` field")
        return _template_field(data["chat_template"], f"{legacy}: `chat_template`")
    jinja_file = root / "chat_template.jinja"
    if jinja_file.is_file():
        try:
            return jinja_file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise ChatTemplateError(f"{jinja_file}: not readable: {err}") from err
    tok_cfg = root / "tokenizer_config.json"
    if tok_cfg.is_file():
        value = _read_json(tok_cfg).get("chat_template")
        if value is not None:
            return _template_field(value, f"{tok_cfg}: `chat_template`")
    return None


def template_special_tokens(ckpt_dir: str | os.PathLike) -> dict[str, str]:
    """{bos_token: "<s>", ...}: the named special tokens of tokenizer_config.json (values
    are strings or AddedToken dicts) and its `extra_special_tokens`, as HF's
    `special_tokens_map` hands them to the template. A legacy config without
    `added_tokens_decoder` takes special_tokens_map.json's entries over its own (as HF)."""
    path = Path(ckpt_dir) / "tokenizer_config.json"
    if not path.is_file():
        return {}
    cfg = _read_json(path)
    legacy = path.with_name("special_tokens_map.json")
    if "added_tokens_decoder" not in cfg and legacy.is_file():
        path, cfg = legacy, {**cfg, **_read_json(legacy)}

    def text(value: Any, field: str) -> str:
        if isinstance(value, dict) and isinstance(value.get("content"), str):
            return value["content"]
        if isinstance(value, str):
            return value
        raise ChatTemplateError(f"{path}: `{field}` is a {type(value).__name__}, not a token")

    out = {n: text(cfg[n], n) for n in SPECIAL_TOKEN_NAMES if cfg.get(n) is not None}
    extra = cfg.get("extra_special_tokens")
    if isinstance(extra, dict):
        out.update({k: text(v, f"extra_special_tokens.{k}") for k, v in extra.items()})
    return out


# ---- rendering ------------------------------------------------------------------------


class _Generation(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (HF's assistant-mask tag): the body as is."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.CallBlock:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller) -> str:
        return caller()


class _Namespace(jinja2.utils.Namespace):
    """HF's `TemplateNamespace`: no underscore attributes (no reach into CPython internals)."""

    def __init__(*args, **kwargs):  # noqa: N805 - jinja's Namespace signature trick
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(
                f"chat templates cannot store underscore-prefixed attributes, got {name!r}"
            )


class _Dict:
    """HF's `TemplateDict`: `dict(...)` / `dict.fromkeys(...)` without the type itself."""

    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # HF overrides jinja's tojson, which escapes HTML characters.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)  # fmt: skip


def _strftime_now(fmt):
    return datetime.now().strftime(fmt)


@functools.lru_cache(maxsize=16)
def compile_chat_template(template: str) -> jinja2.Template:
    """The template compiled in HF's environment (`_compile_jinja_template`), cached."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_Generation, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now,
                       dict=_Dict(), namespace=_Namespace)  # fmt: skip
    return env.from_string(template)


def _plain(value: Any) -> Any:
    """HF's `_plain_template_data`: the template sees JSON-like data only; any other object
    (a decoded image, an array) becomes an inert "<TypeName>" string, so the sandbox never
    holds an object whose public methods could write files."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    if isinstance(value, np.generic):
        return _plain(value.item())
    return f"<{type(value).__name__}>"


def render_chat_template(
    template: str,
    messages: Sequence[Mapping[str, Any]],
    *,
    add_generation_prompt: bool = True,
    **kwargs: Any,
) -> str:
    """HF `apply_chat_template(..., tokenize=False)` on one conversation.

    messages: [{"role", "content": str | [{"type": "text", "text"} | {"type": "image"} |
    {"type": "video"}]}]; kwargs: template variables (the special tokens of
    `template_special_tokens`, `tools`, ...). A `raise_exception` in the template raises
    `jinja2.exceptions.TemplateError`, as in HF.
    """
    if not messages:
        raise ValueError("cannot render an empty conversation")
    # HF drops keys whose value is None (OpenAI clients send content=None, tool_calls=None).
    msgs = [{k: v for k, v in dict(m).items() if v is not None} for m in messages]
    kwargs.setdefault("tools", None)
    kwargs.setdefault("documents", None)
    return compile_chat_template(template).render(
        messages=_plain(msgs), add_generation_prompt=add_generation_prompt, **_plain(kwargs)
    )


# ---- the inference prompt -------------------------------------------------------------


def _with_system(messages: Sequence[Mapping[str, Any]], system: str | None) -> list[dict]:
    msgs = [dict(m) for m in messages]
    if not system:
        return msgs
    if msgs and msgs[0].get("role") == "system":
        raise ValueError("a system prompt is given twice: in `system` and as the first message")
    # Same content form as the rest: llava-hf templates iterate over content items.
    structured = any(isinstance(m.get("content"), list) for m in msgs)
    content = [{"type": "text", "text": system}] if structured else system
    return [{"role": "system", "content": content}, *msgs]


def render_prompt(
    messages: Sequence[Mapping[str, Any]],
    *,
    chat_template: str | None,
    conv_template: str | None,
    system: str | None = None,
    special_tokens: Mapping[str, str] | None = None,
) -> str:
    """The generation prompt of a conversation ending with a user turn.

    chat_template: the checkpoint's jinja (`load_chat_template`), used when given, with
    `special_tokens` (`template_special_tokens`) as its variables. conv_template: a
    LLaVA-NeXT template name (`chat.TEMPLATES`), used when there is no jinja.
    system: None = the template's own choice (jinja: no system message added; named: its
    LLaVA-NeXT system prompt), "" = none, else that system prompt.
    """
    if chat_template is not None:
        return render_chat_template(
            chat_template, _with_system(messages, system), add_generation_prompt=True,
            **dict(special_tokens or {}),
        )  # fmt: skip
    if conv_template is not None:
        turns = chat.message_turns(messages)
        if system is not None:
            if turns and turns[0][0] == "system":
                raise ValueError("a system prompt is given twice: in `system` and as a message")
            turns = [("system", system), *turns]
        return chat.render_generation_prompt(turns, conv_template)
    raise ValueError(
        "the checkpoint has no chat template (no chat_template.jinja, chat_template.json or "
        "`chat_template` in tokenizer_config.json / processor_config.json); add one, or "
        f"name a conversation template with --conv-template NAME, one of {sorted(chat.TEMPLATES)}"
    )
