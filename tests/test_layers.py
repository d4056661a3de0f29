"""The package's layering: no module uses another module's private names, and import-linter's contracts
(setup.cfg, [importlinter]) hold."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("genir_jax", "experiments")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> list[tuple[str, Path]]:
    found = []
    for package in PACKAGES:
        found += [(_module_name(path), path) for path in sorted((ROOT / package).rglob("*.py"))]
    return found


def _is_ours(module: str) -> bool:
    return module.split(".")[0] in PACKAGES


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _resolve(importer: str, is_package: bool, module: str | None, level: int) -> str:
    """The absolute module name of a (possibly relative) ``from`` import."""
    if level == 0:
        return module or ""
    base = importer.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([module] if module else []))


def _outside_private_module(importer: str, imported: str) -> bool:
    """Whether `importer` reaches into a private module (``pkg._helpers``) of a package it is not part of:
    a private module is shared by its package's modules only."""
    parts = imported.split(".")
    for index, part in enumerate(parts):
        if _private(part):
            return not importer.startswith(".".join(parts[:index]) + ".")
    return False


def private_imports(module: str, path: Path, source: str | None = None) -> list[str]:
    """Uses of another of our modules' private names in one module (its text: `source`, else the file):
    ``from X import _name`` and ``X._name`` where X is an imported module of ours other than `module`, and
    imports from a private module (``pkg._helpers``) outside its package."""
    tree = ast.parse(path.read_text() if source is None else source, filename=str(path))
    is_package = path.name == "__init__.py"
    aliases: dict[str, str] = {}   # local name -> module of ours it is bound to
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if _is_ours(alias.name) and _outside_private_module(module, alias.name):
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno}: import {alias.name}")
                if _is_ours(alias.name):
                    if alias.asname:
                        aliases[alias.asname] = alias.name
                    else:
                        aliases[alias.name.split(".")[0]] = alias.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom):
            source = _resolve(module, is_package, node.module, node.level)
            if not _is_ours(source):
                continue
            if _outside_private_module(module, source):
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}: from {source} import "
                             + ", ".join(alias.name for alias in node.names))
                continue
            for alias in node.names:
                submodule = f"{source}.{alias.name}"
                if _private(alias.name) and source != module:
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno}: from {source} import {alias.name}")
                elif (ROOT / Path(*submodule.split("."))).with_suffix(".py").exists() or (
                        ROOT / Path(*submodule.split(".")) / "__init__.py").exists():
                    aliases[alias.asname or alias.name] = submodule
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _private(node.attr):
            dotted = _dotted(node.value)
            if dotted is None or dotted.split(".")[0] not in aliases:
                continue
            head, *rest = dotted.split(".")
            target = ".".join([aliases[head], *rest])
            if target != module:
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {target}.{node.attr}")
    return found


def _dotted(node: ast.AST) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        inner = _dotted(node.value)
        return None if inner is None else f"{inner}.{node.attr}"
    return None


def test_the_checker_sees_both_kinds_of_private_use():
    source = ("from genir_jax.interp.patching import _hidden\nfrom genir_jax.interp import patching\n"
              "import genir_jax.plan.planning as planning\nfrom . import sweep\nfrom .sites import _own\n"
              "patching._x(); planning._y; sweep._z; sweep.public; _own\n")
    path = ROOT / "genir_jax" / "interp" / "probe.py"
    found = private_imports("genir_jax.interp.probe", path, source)
    assert sorted(hit.split(": ", 1)[1] for hit in found) == [
        "from genir_jax.interp.patching import _hidden", "from genir_jax.interp.sites import _own",
        "genir_jax.interp.patching._x", "genir_jax.interp.sweep._z", "genir_jax.plan.planning._y"]
    assert private_imports("genir_jax.interp.patching", path, "from genir_jax.interp.patching import _a\n") == []
    reaching = "from genir_jax.paper.experiments._common import STEP\nimport genir_jax.paper.experiments._common\n"
    report = ROOT / "genir_jax" / "paper" / "report.py"
    assert [hit.split(": ", 1)[1] for hit in private_imports("genir_jax.paper.report", report, reaching)] == [
        "from genir_jax.paper.experiments._common import STEP", "import genir_jax.paper.experiments._common"]
    sibling = ROOT / "genir_jax" / "paper" / "experiments" / "table1_retrieval.py"
    assert private_imports("genir_jax.paper.experiments.table1_retrieval", sibling,
                           "from genir_jax.paper.experiments._common import STEP\nfrom ._common import X\n") == []


def test_no_module_uses_another_modules_private_names():
    found = [hit for module, path in _modules() for hit in private_imports(module, path)]
    assert not found, "private names used across modules:\n" + "\n".join(found)


def test_import_linter_contracts_hold():
    import importlinter  # noqa: F401  (the `test` extra installs import-linter)

    command = Path(sys.executable).with_name("lint-imports")
    command = str(command) if command.exists() else shutil.which("lint-imports")
    assert command, "lint-imports is not installed (pip install 'import-linter>=2.1')"
    result = subprocess.run([command, "--no-cache"], cwd=ROOT, capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stdout + result.stderr
