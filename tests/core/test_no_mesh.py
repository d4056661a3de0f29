"""The core knows no mesh: no module of `genir_jax.core` imports `genir_jax.scale` (activations are constrained
by logical name under the caller's ``nn.logical_axis_rules`` and mesh), and `forward` takes no partitioner."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import genir_jax.core
from genir_jax.core import model


def _imports(path: Path) -> set[str]:
    """Every module a file imports, at any depth (function-level imports too)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_core_imports_nothing_from_scale():
    files = sorted(Path(genir_jax.core.__file__).parent.rglob("*.py"))
    assert files
    upward = {f"{path.name}: {name}" for path in files for name in _imports(path)
              if name == "genir_jax.scale" or name.startswith("genir_jax.scale.")}
    assert not upward, sorted(upward)


def test_forward_takes_no_partitioner():
    for function in (model.forward, model.forward_with_cache):
        assert "partitioner" not in inspect.signature(function).parameters, function.__name__
