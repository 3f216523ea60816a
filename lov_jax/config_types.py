"""The JSON types of the config.json fields the readers use (lov_jax/architectures.py,
lov_jax/models/families.py), checked before any is read: a wrong type is one error
naming the file and the field (`text_config.hidden_size`), never a TypeError from deep
inside the readers or a string carried into a model size.

Fields not listed are not read (or are checked by their reader, e.g. pinpoints); a null
text_config field means the family's default (families._decoder_from_hf).
"""

from __future__ import annotations

from typing import Any

INT, FLOAT, BOOL, STR, DICT, LIST = "int", "number", "bool", "string", "object", "list"

_VISION = {
    "model_type": STR, "hidden_size": INT, "intermediate_size": INT, "num_hidden_layers": INT,
    "num_attention_heads": INT, "patch_size": INT, "image_size": INT, "num_channels": INT,
    "layer_norm_eps": FLOAT, "hidden_act": STR,
}  # fmt: skip
_TEXT = {
    "model_type": STR, "vocab_size": INT, "hidden_size": INT, "intermediate_size": INT,
    "num_hidden_layers": INT, "num_attention_heads": INT, "num_key_value_heads": INT,
    "head_dim": INT, "rms_norm_eps": FLOAT, "max_position_embeddings": INT,
    "rope_theta": FLOAT, "rope_parameters": DICT, "rope_scaling": DICT,
    "tie_word_embeddings": BOOL, "sliding_window": INT, "use_sliding_window": BOOL,
    "attention_bias": BOOL, "mlp_bias": BOOL, "hidden_act": STR, "pretraining_tp": INT,
    "layer_types": LIST,
}  # fmt: skip
_TOP = {
    "model_type": STR, "architectures": LIST, "vision_config": DICT, "text_config": DICT,
    "vision_feature_select_strategy": STR, "vision_aspect_ratio": STR,
    "image_aspect_ratio": STR, "use_image_newline_parameter": BOOL,
    "tie_word_embeddings": BOOL, "mm_projector_type": STR, "projector_hidden_act": STR,
    "multimodal_projector_bias": BOOL, "mm_vision_tower": STR,
    "mm_vision_select_feature": STR, "mm_patch_merge_type": STR,
}  # fmt: skip


def _is(value: Any, kind: str) -> bool:
    if kind == INT:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == FLOAT:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if kind == BOOL:
        return isinstance(value, bool)
    if kind == STR:
        return isinstance(value, str)
    if kind == DICT:
        return isinstance(value, dict)
    return isinstance(value, list)


def _check(d: dict, table: dict[str, str], prefix: str, source: str, nullable: bool) -> None:
    for name, kind in table.items():
        if name not in d or (d[name] is None and nullable):
            continue
        if not _is(d[name], kind):
            got = "null" if d[name] is None else type(d[name]).__name__
            raise ValueError(
                f"{source}: {prefix}{name} = {d[name]!r}: expected a JSON {kind}, got {got}"
            )


def check_config_json(hf: dict, source: str = "config.json") -> None:
    """Raise a ValueError naming `source` and the field when a read field has the wrong
    JSON type. An original LLaVA config (flat LLM fields + `mm_*`) is checked as both."""
    _check(hf, _TOP, "", source, nullable=True)
    if "text_config" not in hf:  # the original flat layout: the LLM's fields at the top
        _check(hf, _TEXT, "", source, nullable=True)
    for key, table, nullable in (("vision_config", _VISION, False), ("text_config", _TEXT, True)):
        if isinstance(hf.get(key), dict):
            _check(hf[key], table, f"{key}.", source, nullable)
