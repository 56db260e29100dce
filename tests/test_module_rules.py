"""Rules on how the package's modules use one another (issue 21).

* No module reaches into another's private names (``from llmenergy.x import _y``,
  or ``x._y`` on an imported ``llmenergy`` module): what is shared is public.
* Every path of a run comes from one place, ``llmenergy.layout`` (``CellFiles``,
  ``RunLayout``): no other module spells a run's file names.
* Every environment switch the engines read is in ``llmenergy.arch.ENGINE_SWITCHES``,
  so a cell's fingerprint follows it (a switch left out would let a cell measured with
  another kernel pass for current).
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

import llmenergy

PKG = Path(llmenergy.__file__).resolve().parent


def _modules() -> list[Path]:
    return sorted(PKG.rglob("*.py"))


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def private_uses(source: str) -> list[str]:
    """``line: what`` for each private name of another llmenergy module used in ``source``."""
    tree = ast.parse(source)
    aliases: set[str] = set()
    bad = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and (
                node.module == "llmenergy" or node.module.startswith("llmenergy.")):
            for a in node.names:
                if _private(a.name):
                    bad.append(f"{node.lineno}: from {node.module} import {a.name}")
                aliases.add(a.asname or a.name)
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("llmenergy.") or a.name == "llmenergy":
                    aliases.add(a.asname or a.name.split(".")[0])
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _private(node.attr) and isinstance(node.value, ast.Name) \
                and node.value.id in aliases:
            bad.append(f"{node.lineno}: {node.value.id}.{node.attr}")
    return bad


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(PKG)))
def test_no_module_uses_another_modules_private_names(path: Path) -> None:
    assert private_uses(path.read_text()) == []


def test_the_rule_sees_both_forms() -> None:
    src = "from llmenergy.orchestrate import launch\nfrom llmenergy.x import _y, z\nlaunch._prepare(1)\nz.ok()\n"
    assert private_uses(src) == ["2: from llmenergy.x import _y", "3: launch._prepare"]


#: The module that owns every path of a run.
LAYOUT = PKG / "layout.py"
#: File and folder names of a run (its cells, groups, summary, report and the ``.run/`` handshake).
RUN_FILE_NAMES = frozenset({
    "uuids", "ready", "capready", "ranks", ".run",
    "spec.json", "cell.json", "worker_status.json", "begin.json", "group.json", "done.json",
    "events.parquet", "responses.parquet", "power.parquet", "metrics.parquet",
    "summary.parquet", "summary_stats.parquet", "aggregate_problems.json", "report.html",
})


def spelled_names(source: str) -> list[str]:
    """``line: literal`` for each string literal (docstrings aside) that is, or has a path
    segment that is, one of :data:`RUN_FILE_NAMES`."""
    tree = ast.parse(source)
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                  and node.body and isinstance(node.body[0], ast.Expr)
                  and isinstance(node.body[0].value, ast.Constant)}
    bad = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            if node.value in RUN_FILE_NAMES or any(seg in RUN_FILE_NAMES for seg in node.value.split("/")):
                bad.append(f"{node.lineno}: {node.value!r}")
    return bad


@pytest.mark.parametrize("path", [p for p in _modules() if p != LAYOUT], ids=lambda p: str(p.relative_to(PKG)))
def test_no_module_but_the_layout_spells_a_run_file_name(path: Path) -> None:
    assert spelled_names(path.read_text()) == []


def test_the_file_name_rule_sees_literals_and_path_segments_not_docstrings() -> None:
    src = '''"""Writes ``cell.json``."""\nA = "uuids"\nB = f"{x}/.run/begin.json"\nC = "ok"\n'''
    assert spelled_names(src) == ["2: 'uuids'", "3: '/.run/begin.json'"]


#: ``LLMENERGY_*`` names the inference package reads that do not change a measurement
NOT_SWITCHES = frozenset({"LLMENERGY_CACHE"})  # the tokenizer's download cache


def env_names(source: str) -> set[str]:
    """The string literals of ``source`` that are a whole ``LLMENERGY_*`` variable name."""
    return {node.value for node in ast.walk(ast.parse(source))
            if isinstance(node, ast.Constant) and isinstance(node.value, str)
            and node.value.startswith("LLMENERGY_") and node.value.replace("_", "").isalnum()
            and node.value.isupper()}


def test_every_engine_switch_is_part_of_a_cells_definition() -> None:
    from llmenergy.arch import ENGINE_SWITCHES

    read = set().union(*(env_names(p.read_text()) for p in sorted((PKG / "inference").glob("*.py"))))
    assert read - NOT_SWITCHES == set(ENGINE_SWITCHES)
    assert env_names('A = "LLMENERGY_X_Y"\nB = "llmenergy_x"\nC = "LLMENERGY_X is on"\n') == {"LLMENERGY_X_Y"}
