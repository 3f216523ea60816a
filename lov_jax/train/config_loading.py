"""`--config configs/<stage>.py:<preset>` plus `--config.a.b=value` overrides.

The same convention as ml_collections' `config_flags` (which needs absl flags
parsing of the whole command line); here it is a plain function so `lov-jax`
keeps argparse.
"""

from __future__ import annotations

import ast
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
        for p in parents:
            if p not in node:
                raise KeyError(f"unknown config field {key!r}")
            node = node[p]
        if leaf not in node:
            raise KeyError(f"unknown config field {key!r}")
        node[leaf] = _parse_like(node[leaf], raw, key)
    return config


def _parse_like(current, raw: str, key: str):
    if isinstance(current, str):
        return raw
    if isinstance(current, bool) and raw.lower() in ("true", "false"):
        return raw.lower() == "true"
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError) as err:
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
