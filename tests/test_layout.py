"""The package is laid out by stage and its imports run one way (docs/internals.md).

Each module's ``llmenergy`` imports (top level and inside functions) may only
reach its own stage or an earlier one; two stages of the same rank (inference
and power) never import each other. The spawned entry points are importable and
have ``main``.
"""
from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

import llmenergy
from llmenergy import entrypoints

PKG = Path(llmenergy.__file__).resolve().parent

#: stage -> rank; a module may import stages of a lower rank, or its own stage.
STAGES = {
    "errors": 0,
    "atomic": 1, "entrypoints": 1, "slurm": 1, "arch": 1, "layout": 1,
    "checkpoints": 2,
    "data": 2,
    "config": 3,
    "cellfiles": 4,
    "planning": 5,
    "inference": 6, "power": 6,
    "analysis": 7,
    "orchestrate": 8,
    "cli": 9,
}


def _stage(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _imports(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), str(path))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "llmenergy":
                out += [(node.lineno, f"llmenergy.{a.name}") for a in node.names]
            elif node.module.startswith("llmenergy."):
                out.append((node.lineno, node.module))
        elif isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names if a.name.startswith("llmenergy.")]
    return out


def _modules() -> list[Path]:
    return sorted(p for p in PKG.rglob("*.py") if p.name != "__init__.py" or p.parent != PKG)


def test_every_module_belongs_to_a_stage() -> None:
    stray = [str(p.relative_to(PKG)) for p in _modules()
             if (p.relative_to(PKG).parts[0].removesuffix(".py")) not in STAGES]
    assert stray == []


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(PKG)))
def test_imports_run_one_way(path: Path) -> None:
    own = path.relative_to(PKG).parts[0].removesuffix(".py")
    bad = []
    for line, target in _imports(path):
        stage = _stage(target)
        if stage == "__version__" or stage == own:
            continue
        if STAGES[stage] >= STAGES[own]:
            bad.append(f"line {line}: {target} ({stage}) from {own}")
    assert bad == []


@pytest.mark.parametrize("name", sorted(entrypoints.ALL))
def test_entrypoints_have_main(name: str) -> None:
    module = importlib.import_module(entrypoints.ALL[name])
    assert callable(module.main)
