"""`--config configs/<stage>.py:<preset>` plus `--config.a.b=value` overrides.

The same convention as ml_collections' `config_flags` (which needs absl flags
parsing of the whole command line); here it is a plain function so `lov-jax`
keeps argparse.
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import sys
from pathlib import Path

import ml_collections


def load_config(spec: str) -> ml_collections.ConfigDict:
    """'path/to/stage.py[:arg]' -> the file's get_config(arg)."""
    path, _, arg = spec.partition(":")
    file = Path(path)
    if not file.exists():
        raise FileNotFoundError(f"config file not found: {file}")
    root = str(file.resolve().parent.parent)  # so `from configs.common import ...` works
    if root not in sys.path:
        sys.path.insert(0, root)
    module_spec = importlib.util.spec_from_file_location(f"_lov_config_{file.stem}", file)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()


def apply_overrides(config: ml_collections.ConfigDict, overrides: list[str]):
    """Apply ['--config.optim.lr=1e-4', ...]; the value is parsed like the field's type."""
    for item in overrides:
        if not item.startswith("--config."):
            raise ValueError(f"unrecognised argument {item!r} (expected --config.a.b=value)")
        key, sep, raw = item[len("--config.") :].partition("=")
        if not sep:
            raise ValueError(f"override {item!r} needs '=value'")
        *parents, leaf = key.split(".")
        node = config
        for depth, name in enumerate([*parents, leaf]):
            if not isinstance(node, ml_collections.ConfigDict) or name not in node:
                raise UnknownConfigField(key, config, ".".join(key.split(".")[:depth]))
            if depth < len(parents):
                node = node[name]
        node[leaf] = _parse_like(node[leaf], raw, key)
    return config


class UnknownConfigField(KeyError):
    """An override names a field the stage config does not have (a typo is an error, never
    a new field nothing reads)."""

    def __init__(self, key: str, config: ml_collections.ConfigDict, parent: str):
        fields = sorted(_leaf_paths(config))
        close = difflib.get_close_matches(key, fields, n=1, cutoff=0.8)
        node = config
        for name in parent.split(".") if parent else []:
            node = node[name]
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        if isinstance(node, ml_collections.ConfigDict):
            where = f"{parent or 'the config'} has: {', '.join(sorted(node.keys()))}"
        else:
            where = f"{parent} is a value, not a group"
        super().__init__(f"unknown config field {key!r}{hint}; {where}")

    def __str__(self) -> str:
        return self.args[0]


def _leaf_paths(config: ml_collections.ConfigDict, prefix: str = ""):
    for name, value in config.items():
        path = f"{prefix}{name}"
        if isinstance(value, ml_collections.ConfigDict):
            yield from _leaf_paths(value, path + ".")
        else:
            yield path


def _parse_like(current, raw: str, key: str):
    if isinstance(current, str):
        return raw
    if isinstance(current, bool) and raw.lower() in ("true", "false"):
        return raw.lower() == "true"
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError) as err:
        if isinstance(current, tuple):  # --config.optim.trainable=projector,llm
            return tuple(x.strip() for x in raw.split(",") if x.strip())
        raise ValueError(f"cannot parse {raw!r} for config field {key!r}") from err
    if isinstance(current, bool):
        if not isinstance(value, bool):
            raise ValueError(f"config field {key!r} wants true/false, got {raw!r}")
        return value
    if isinstance(current, float) and isinstance(value, int | float):
        return float(value)
    if isinstance(current, tuple) and isinstance(value, list | tuple | str):
        return tuple([value] if isinstance(value, str) else value)
    if type(value) is not type(current):
        raise ValueError(f"config field {key!r} is {type(current).__name__}, got {raw!r}")
    return value
