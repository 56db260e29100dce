"""The tier rule of ``tests/tiers.py``: what it reads as starting processes, and its guard."""
from __future__ import annotations

import ast
import multiprocessing
import subprocess
import sys
from pathlib import Path

import pytest

import tiers


def _reason(tmp_path: Path, code: str, test: str = "test_x") -> str | None:
    path = tmp_path / "test_mod.py"
    path.write_text(code)
    tiers._module_info.cache_clear()
    node = tiers._module_info(path)[0][test]
    return tiers._reaches(path, node, set())


def test_starters_reached_through_module_functions(tmp_path: Path) -> None:
    code = ("import subprocess\nimport os\nfrom llmenergy.orchestrate.submit import submit_jobs\n"
            "def helper():\n    return subprocess.run(['true'])\n"
            "def indirect():\n    return helper()\n"
            "def test_x():\n    indirect()\n"
            "def test_fork():\n    os.fork()\n"
            "def test_submit():\n    submit_jobs([], [], None, 'local')\n"
            "def test_compile(e):\n    e.make(compile=True)\n"
            "def test_annotated(p: subprocess.Popen) -> subprocess.Popen:\n    return p\n"
            "def test_plain():\n    assert os.path.sep\n")
    assert "subprocess" in (_reason(tmp_path, code) or "")
    assert "os.fork" in (_reason(tmp_path, code, "test_fork") or "")
    assert "submit_jobs" in (_reason(tmp_path, code, "test_submit") or "")
    assert "compile=True" in (_reason(tmp_path, code, "test_compile") or "")
    assert _reason(tmp_path, code, "test_annotated") is None  # an annotation starts nothing
    assert _reason(tmp_path, code, "test_plain") is None


def test_helper_module_of_tests_is_followed() -> None:
    """``run_ranks`` lives in tests/inference/dist_helpers.py and starts one process per rank."""
    path = tiers.TESTS / "inference" / "test_model.py"
    tiers._module_info.cache_clear()
    tree = ast.parse("run_ranks(f, 2)")
    assert "multiprocessing" in (tiers._reaches(path, tree, set()) or "")


def test_guard_refuses_processes_then_restores() -> None:
    with tiers.no_processes("t::x"):
        with pytest.raises(tiers.ProcessInUnitTest, match=r"t::x is a unit test but started a process"):
            subprocess.run([sys.executable, "-c", "pass"], check=False)
        with pytest.raises(tiers.ProcessInUnitTest):
            multiprocessing.get_context("spawn").Process(target=print).start()
    assert subprocess.run([sys.executable, "-c", "pass"], check=False).returncode == 0


def test_every_test_has_one_tier(request: pytest.FixtureRequest) -> None:
    items = request.session.items
    tiers_of = [{m.name for m in item.iter_markers()} & {"unit", "system"} for item in items]
    assert all(len(t) == 1 for t in tiers_of)
    system = [item.nodeid for item in items if item.get_closest_marker("system")]
    assert all(not n.startswith(("tests/integration/", "tests/slurm/")) or n in system
               for n in (item.nodeid for item in items))
