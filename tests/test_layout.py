"""The package is laid out by stage and its imports run one way (docs/internals.md).

Each module's ``llmenergy`` imports (top level and inside functions) may only
reach its own stage or an earlier one; two stages of the same rank (inference
and power) never import each other. The import graph has no cycles, a package's
``__init__.py`` counting as a module that every import of one of its modules
runs. No module imports another's private names (``from m import _x``, or
``m._x`` on an imported name). The spawned entry points are importable and have
``main``.
"""
from __future__ import annotations

import ast
import importlib
from collections.abc import Iterator
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
    "handshake": 5,
    "planning": 6,
    "inference": 7, "power": 7,
    "analysis": 8,
    "orchestrate": 9,
    "cli": 10,
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


def _module_name(path: Path) -> str:
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


ALL_MODULES = {_module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def _targets(path: Path) -> set[str]:
    """The llmenergy modules that importing ``path`` runs: each imported module, the packages
    enclosing it (their ``__init__`` runs first), and for ``from pkg import name`` both ``pkg``
    and ``pkg.name`` when that is a module."""
    named: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.split(".")[0] == "llmenergy":
                named.add(node.module)
                named |= {f"{node.module}.{a.name}" for a in node.names} & set(ALL_MODULES)
        elif isinstance(node, ast.Import):
            named |= {a.name for a in node.names if a.name.split(".")[0] == "llmenergy"}
    out = set()
    for name in named:
        parts = name.split(".")
        out |= {".".join(parts[:i]) for i in range(1, len(parts) + 1)}
    return (out & set(ALL_MODULES)) - {_module_name(path)}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[list[str]] = []

    def visit(v: str) -> Iterator[None]:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                yield from visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while not comp or comp[-1] != v:
                comp.append(stack.pop())
            if len(comp) > 1:
                out.append(sorted(comp))
        yield

    for v in sorted(graph):
        if v not in index:
            list(visit(v))
    return out


def test_import_graph_has_no_cycles() -> None:
    graph = {name: _targets(path) for name, path in ALL_MODULES.items()}
    assert _cycles(graph) == []


def test_cycle_finder_finds_a_package_cycle() -> None:
    """The example of issue 21: a package whose __init__ re-exports a module that imports it."""
    graph = {"p": {"p.a"}, "p.a": {"p", "p.b"}, "p.b": set(), "q": {"p.b"}}
    assert _cycles(graph) == [["p", "p.a"]]


def _private_uses(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), str(path))
    imported: set[str] = set()
    bad: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "llmenergy":
            for a in node.names:
                if a.name.startswith("_") and not a.name.startswith("__"):
                    bad.append((node.lineno, f"from {node.module} import {a.name}"))
                imported.add(a.asname or a.name)
        elif isinstance(node, ast.Import):
            imported |= {a.asname or a.name.split(".")[0] for a in node.names
                         if a.name.split(".")[0] == "llmenergy"}
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            base = node.value
            while isinstance(base, ast.Attribute):
                base = base.value
            if isinstance(base, ast.Name) and base.id in imported:
                bad.append((node.lineno, ast.unparse(node)))
    return [f"line {line}: {text}" for line, text in sorted(bad)]


@pytest.mark.parametrize("path", sorted(ALL_MODULES.values()), ids=lambda p: str(p.relative_to(PKG)))
def test_no_private_names_across_modules(path: Path) -> None:
    assert _private_uses(path) == []


def test_private_use_is_found(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text("from llmenergy.a import _x, y\nfrom llmenergy import b\n"
                      "import llmenergy.c\nb._f()\ny._g\nllmenergy.c._h\nself._ok\n")
    assert _private_uses(module) == ["line 1: from llmenergy.a import _x", "line 4: b._f",
                                     "line 5: y._g", "line 6: llmenergy.c._h"]


@pytest.mark.parametrize("name", sorted(entrypoints.ALL))
def test_entrypoints_have_main(name: str) -> None:
    module = importlib.import_module(entrypoints.ALL[name])
    assert callable(module.main)
