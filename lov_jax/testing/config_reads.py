"""Which fields of an ml_collections config code reads (tests of "every config key is read
or rejected"), two ways:

- dynamic: `tracked(config)` is a copy whose every ConfigDict records the leaf fields read
  through attribute access, `[key]`, `.get(key)` or iterating `items()` / `values()`;
  whole-config copies (`to_dict`, `repr`, `==`, deepcopy) are not reads: saving or
  fingerprinting a config reads none of its fields. `reads(config)`: the dotted paths.
- static: `static_reads(files)` parses the code (comments and docstrings never count) and
  returns the (group, key) pairs it reads: `<...>.group.key`, `group.key` (a variable or
  parameter named after the group), `group.get("key")`, `group["key"]`, and the same
  through a local alias (`lc = config.loop; lc.rounds`).
"""

from __future__ import annotations

import ast
import contextlib
import copy
from collections.abc import Iterable
from pathlib import Path

import ml_collections

_PAUSED = [0]


@contextlib.contextmanager
def _paused():
    _PAUSED[0] += 1
    try:
        yield
    finally:
        _PAUSED[0] -= 1


class _Tracked(ml_collections.ConfigDict):
    """A ConfigDict that logs reads of its leaves into a set shared by the whole tree."""

    def __getitem__(self, key):
        value = super().__getitem__(key)
        if not _PAUSED[0] and isinstance(key, str) and not isinstance(value, _Tracked):
            log = self.__dict__["_lov_log"]
            log.add(f"{self.__dict__['_lov_prefix']}{key}")
        return value

    def to_dict(self, *args, **kwargs):
        with _paused():
            return super().to_dict(*args, **kwargs)

    def __eq__(self, other):
        with _paused():
            return super().__eq__(other)

    __hash__ = None

    def __repr__(self):
        with _paused():
            return super().__repr__()

    def __str__(self):
        with _paused():
            return super().__str__()

    def __deepcopy__(self, memo):
        with _paused():
            plain = ml_collections.ConfigDict(self.to_dict())
        out = _build(copy.deepcopy(plain, memo), self.__dict__["_lov_prefix"],
                     self.__dict__["_lov_log"])  # fmt: skip
        return out

    def copy_and_resolve_references(self, visit_map=None):
        with _paused():
            plain = ml_collections.ConfigDict(self.to_dict())
        return _build(plain, self.__dict__["_lov_prefix"], self.__dict__["_lov_log"])


def _build(config: ml_collections.ConfigDict, prefix: str, log: set[str]) -> _Tracked:
    out = _Tracked()
    out.__dict__["_lov_prefix"], out.__dict__["_lov_log"] = prefix, log
    for key in config.keys():
        value = config._fields[key]  # the stored value, without counting a read
        if isinstance(value, ml_collections.ConfigDict):
            value = _build(value, f"{prefix}{key}.", log)
        out[key] = value
    return out


def tracked(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """A copy of `config` that records its leaf reads (see `reads`)."""
    return _build(config, "", set())


def reads(config: ml_collections.ConfigDict) -> set[str]:
    """Dotted paths of the leaves read from a `tracked` config (and its copies)."""
    return set(config.__dict__["_lov_log"])


def leaf_paths(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
    """Every leaf field of a config, as dotted paths."""
    out = []
    for key in config.keys():
        value = config._fields[key]
        if isinstance(value, ml_collections.ConfigDict):
            out += leaf_paths(value, f"{prefix}{key}.")
        else:
            out.append(f"{prefix}{key}")
    return out


def _tail(node: ast.AST) -> str | None:
    """The last name of `a.b.group` / `group` (the group a read hangs off)."""
    if isinstance(node, ast.Attribute):
        return node.attr
    if isinstance(node, ast.Name):
        return node.id
    return None


def static_reads(files: Iterable[str | Path]) -> set[tuple[str, str]]:
    """(group, key) pairs read in these Python files (see the module doc)."""
    out: set[tuple[str, str]] = set()
    for file in files:
        tree = ast.parse(Path(file).read_text(), str(file))
        alias: dict[str, str] = {}
        pairs = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute):
                pairs.add((_tail(node.value), node.attr))
            elif isinstance(node, ast.Assign) and len(node.targets) == 1:
                target, tail = node.targets[0], _tail(node.value)
                if isinstance(target, ast.Name) and tail is not None and tail != target.id:
                    alias[target.id] = tail
            elif isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant):
                pairs.add((_tail(node.value), node.slice.value))
            elif (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == "get"
                and node.args
                and isinstance(node.args[0], ast.Constant)
            ):
                pairs.add((_tail(node.func.value), node.args[0].value))
        for group, key in pairs:
            if isinstance(group, str) and isinstance(key, str):
                out.add((group, key))
                if group in alias:
                    out.add((alias[group], key))
    return out
