"""Test tiers: ``unit`` (one process, no cluster) and ``system`` (everything else).

The rule (applied by ``conftest.py`` to every collected test, never by hand):

- a test under ``tests/integration/`` or ``tests/slurm/``, or marked ``slurm``, is ``system``;
- a test whose code *reaches* a process starter is ``system``. Reach is read from
  the source: the test function, the fixtures it uses (from ``tests/``), and,
  transitively, the functions and classes of ``tests/`` they name (same module, or
  imported from a helper module such as ``launch_helpers``). The starters are
  :data:`STARTERS` (module names) and :data:`OS_STARTERS` (``os`` functions), plus
  the ``llmenergy`` functions in :data:`SPAWNING_CALLS` that start processes
  themselves and the keyword arguments in :data:`SPAWNING_KEYWORDS` that make a
  call start them (``compile=True``), each with its reason;
- every other test is ``unit``.

A reading of the source can miss a process started indirectly, so the rule is
backed by a guard: while a ``unit`` test sets up and runs, starting a process
(``subprocess``, ``os.fork``/``posix_spawn``/``system``, a ``multiprocessing``
process) raises :class:`ProcessInUnitTest`, which names the test and how to
classify it. A test is never silently counted as unit while it starts processes.
"""
from __future__ import annotations

import ast
import functools
import inspect
import multiprocessing.process
import os
import subprocess
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

TESTS = Path(__file__).resolve().parent
SYSTEM_DIRS = ("integration", "slurm")  # whole directories: snakemake and sbatch runs on the test cluster

#: module names whose use starts a process
STARTERS = {
    "subprocess": "runs a command in a child process",
    "multiprocessing": "starts Python processes",
    "torch.multiprocessing": "starts Python processes",
}
#: ``os`` functions that start a process
OS_STARTERS = ("fork", "forkpty", "system", "popen", "posix_spawn", "posix_spawnp", "execv", "execve",
               "execvp", "execvpe", "spawnv", "spawnve", "spawnvp", "spawnvpe")
#: llmenergy names that start processes themselves: name -> why
SPAWNING_CALLS: dict[str, str] = {
    "llmenergy.orchestrate.submit.submit_jobs": "submitit runs each job as a child process or through sbatch",
    "llmenergy.planning.jobs.partition_limits": "asks Slurm's sinfo for the partitions' limits",
    "llmenergy.orchestrate.provenance.git_commit": "runs git to read the checkout's commit",
    "llmenergy.orchestrate.provenance.collect_provenance": "runs git to read the checkout's commit",
}
#: keyword arguments whose call starts processes: (keyword, value) -> why
SPAWNING_KEYWORDS: dict[tuple[str, object], str] = {
    ("compile", True): "torch.compile's Inductor runs the C++ compiler in child processes on CPU",
    ("workers", 2): "make_figures draws the figures in forked processes",
}


class ProcessInUnitTest(RuntimeError):
    """A test classified ``unit`` started a process."""


@functools.cache
def _module_info(path: Path) -> tuple[dict[str, ast.AST], dict[str, tuple[str, str | None]]]:
    """(top-level defs by name, imported local name -> (module, attribute or None)) of a file."""
    tree = ast.parse(path.read_text(), str(path))
    defs: dict[str, ast.AST] = {}
    imports: dict[str, tuple[str, str | None]] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                imports[a.asname or a.name.split(".")[0]] = (a.name if a.asname else a.name.split(".")[0], None)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for a in node.names:
                imports[a.asname or a.name] = (node.module, a.name)
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            defs[node.name] = node
    return defs, imports


class _Names(ast.NodeVisitor):
    """Names and ``os.<attr>`` uses in code, annotations left out (they start nothing)."""

    def __init__(self) -> None:
        self.names: set[str] = set()
        self.os_attrs: set[str] = set()
        self.keywords: set[tuple[str, object]] = set()

    def visit_keyword(self, node: ast.keyword) -> None:
        if node.arg is not None and isinstance(node.value, ast.Constant):
            self.keywords.add((node.arg, node.value.value))
        self.generic_visit(node)

    def visit_Name(self, node: ast.Name) -> None:
        self.names.add(node.id)

    def visit_Attribute(self, node: ast.Attribute) -> None:
        if isinstance(node.value, ast.Name) and node.value.id == "os":
            self.os_attrs.add(node.attr)
        self.generic_visit(node)

    def visit_arg(self, node: ast.arg) -> None:
        pass

    def _function(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        for d in node.decorator_list:
            self.visit(d)
        for default in [*node.args.defaults, *node.args.kw_defaults]:
            if default is not None:
                self.visit(default)
        for stmt in node.body:
            self.visit(stmt)

    visit_FunctionDef = _function
    visit_AsyncFunctionDef = _function

    def visit_AnnAssign(self, node: ast.AnnAssign) -> None:
        self.visit(node.target)
        if node.value is not None:
            self.visit(node.value)


def _starter(module: str, attr: str | None) -> str | None:
    full = module if attr is None else f"{module}.{attr}"
    for name, why in STARTERS.items():
        if full == name or full.startswith(name + ".") or module == name or module.startswith(name + "."):
            return f"{full}: {why}"
    if module.startswith("llmenergy"):
        for name, why in SPAWNING_CALLS.items():
            if full == name or name.startswith(full + "."):
                return f"{name}: {why}"
    if module == "os" and attr in OS_STARTERS:
        return f"os.{attr}: starts a process"
    return None


def _reaches(path: Path, node: ast.AST, seen: set[tuple[Path, str]]) -> str | None:
    """Why the code of ``node`` (in ``path``) reaches a process starter, or None."""
    visitor = _Names()
    visitor.visit(node)
    for attr in sorted(visitor.os_attrs & set(OS_STARTERS)):
        return f"{path.name}: os.{attr}: starts a process"
    for key, why in SPAWNING_KEYWORDS.items():
        if key in visitor.keywords:
            return f"{path.name}: {key[0]}={key[1]!r}: {why}"
    defs, imports = _module_info(path)
    for name in sorted(visitor.names):
        if name in imports:
            module, attr = imports[name]
            why = _starter(module, attr)
            if why is not None:
                return f"{path.name}: {why}"
            helper = TESTS.joinpath(*module.split(".")).with_suffix(".py")
            if attr is None or not helper.is_file():
                helper = path.parent / (module.split(".")[-1] + ".py")
            if attr is not None and helper.is_file() and (helper, attr) not in seen:
                seen.add((helper, attr))
                target = _module_info(helper)[0].get(attr)
                if target is not None and (why := _reaches(helper, target, seen)):
                    return why
        elif name in defs and (path, name) not in seen:
            seen.add((path, name))
            if why := _reaches(path, defs[name], seen):
                return why
    return None


def _definition(func: Callable[..., Any]) -> tuple[Path, ast.AST] | None:
    """The file and AST node of a function of ``tests/`` (its outermost enclosing def)."""
    func = inspect.unwrap(func)
    try:
        path = Path(inspect.getsourcefile(func) or "").resolve()
    except TypeError:
        return None
    if TESTS not in path.parents:
        return None
    defs, _ = _module_info(path)
    parts = func.__qualname__.split(".")
    node = defs.get(parts[0])
    for part in parts[1:]:
        if part == "<locals>" or node is None:
            break
        node = next((n for n in getattr(node, "body", []) if getattr(n, "name", None) == part), node)
    return (path, node) if node is not None else None


def system_reason(item: Any) -> str | None:
    """Why the pytest item is a ``system`` test, or None for ``unit``."""
    path = Path(str(item.fspath)).resolve()
    rel = path.relative_to(TESTS) if TESTS in path.parents else None
    if rel is not None and rel.parts[0] in SYSTEM_DIRS:
        return f"under tests/{rel.parts[0]}/"
    if item.get_closest_marker("slurm") is not None:
        return "marked slurm"
    funcs = [getattr(item, "function", None)]
    for defs in getattr(getattr(item, "_fixtureinfo", None), "name2fixturedefs", {}).values():
        funcs += [d.func for d in defs]
    seen: set[tuple[Path, str]] = set()
    for func in funcs:
        found = _definition(func) if func is not None else None
        if found is not None and (why := _reaches(*found, seen)):
            return why
    return None


def _refuse(what: str, nodeid: str) -> Callable[..., Any]:
    def refuse(*_args: Any, **_kwargs: Any) -> Any:
        raise ProcessInUnitTest(
            f"{nodeid} is a unit test but started a process ({what}); the unit tier runs in one "
            f"process. Make the test start none, or let tests/tiers.py see that it does "
            f"(name the starting llmenergy function in SPAWNING_CALLS).")
    return refuse


@contextmanager
def no_processes(nodeid: str) -> Iterator[None]:
    """Within the block, starting a process raises :class:`ProcessInUnitTest`."""
    patches: list[tuple[Any, str, Any]] = [
        (subprocess.Popen, "_execute_child", _refuse("subprocess", nodeid)),
        (multiprocessing.process.BaseProcess, "start", _refuse("multiprocessing", nodeid)),
    ]
    patches += [(os, name, _refuse(f"os.{name}", nodeid)) for name in OS_STARTERS if hasattr(os, name)]
    saved = [(owner, name, getattr(owner, name)) for owner, name, _ in patches]
    try:
        for owner, name, value in patches:
            setattr(owner, name, value)
        yield
    finally:
        for owner, name, value in saved:
            setattr(owner, name, value)
