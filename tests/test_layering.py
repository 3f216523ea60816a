"""The package layering (docs/style.md 18): data never imports training, inference, eval,
planning or serving; models never import data; nothing below the entry points imports
the CLI or the demo. Every import counts, function-level ones included."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# (package directory, module prefixes it must never import)
FORBIDDEN = [
    ("data_pipelines", ("lov_jax.train", "lov_jax.inference", "lov_jax.eval", "lov_jax.plan",
                        "lov_jax.serve", "lov_jax.demo", "lov_jax.cli")),
    ("lov_jax/models", ("data_pipelines", "lov_jax.train", "lov_jax.inference", "lov_jax.eval",
                        "lov_jax.plan", "lov_jax.demo", "lov_jax.cli")),
    ("lov_jax/convert", ("lov_jax.train", "lov_jax.inference", "lov_jax.eval", "lov_jax.plan",
                         "lov_jax.demo", "lov_jax.cli")),
    ("lov_jax/train", ("lov_jax.inference", "lov_jax.eval", "lov_jax.demo", "lov_jax.cli")),
    ("lov_jax/inference", ("lov_jax.train", "lov_jax.demo", "lov_jax.cli")),
]  # fmt: skip


def imports(path: Path, package: str | None = None) -> list[tuple[int, str]]:
    """(line, module) of every import statement in a file (relative imports resolved
    against `package`, default: the file's own under ROOT)."""
    tree = ast.parse(path.read_text(), str(path))
    if package is None:
        package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parent, base] if base else parent)
            out += [(node.lineno, f"{base}.{a.name}") for a in node.names]
    return out


@pytest.mark.parametrize("folder,banned", FORBIDDEN, ids=[f for f, _ in FORBIDDEN])
def test_layering(folder, banned):
    bad = [
        f"{path.relative_to(ROOT)}:{line} imports {mod}"
        for path in sorted((ROOT / folder).rglob("*.py"))
        for line, mod in imports(path)
        if any(mod == b or mod.startswith(b + ".") for b in banned)
    ]
    assert not bad, "\n".join(bad)


def test_the_checker_sees_function_level_and_relative_imports(tmp_path):
    f = tmp_path / "probe.py"
    f.write_text("def f():\n    from lov_jax.train import loop\n    from ..inference import api\n")
    found = imports(f, package="data_pipelines.sub")
    assert (2, "lov_jax.train.loop") in found and (3, "data_pipelines.inference.api") in found
