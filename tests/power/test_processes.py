"""Which processes on a GPU are the job's own: real processes, their parents read from /proc."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from llmenergy.power.processes import is_own, other_processes, parent_pid


def _start(*code: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-c", ";".join(code)], stdout=subprocess.PIPE)


def test_a_child_and_a_grandchild_of_a_rank_are_its_own_and_init_is_not() -> None:
    # this test process plays the rank; its child starts a grandchild and prints its PID
    child = _start("import subprocess, sys, time",
                   "g = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(30)'])",
                   "print(g.pid, flush=True)", "time.sleep(30)")
    try:
        grandchild = int(child.stdout.readline())
        assert parent_pid(grandchild) == child.pid and parent_pid(child.pid) == os.getpid()
        rank = {os.getpid()}
        assert is_own(child.pid, rank) and is_own(grandchild, rank) and is_own(os.getpid(), rank)
        assert not is_own(1, rank) and not is_own(os.getppid(), rank)  # the rank's parent is not the job's
        # the rank, its compile worker (a grandchild) and one process of someone else's
        assert other_processes([os.getpid(), grandchild, os.getppid()], rank) == 1
        assert other_processes([os.getpid(), child.pid, grandchild], rank) == 0
    finally:
        child.kill()
        child.wait()
    assert parent_pid(child.pid) is None  # gone: no parent to read


def test_without_a_traceable_rank_the_rank_is_taken_to_be_one_of_them(tmp_path: Path) -> None:
    # NVML's PIDs from another PID namespace (a container): none is in this /proc
    assert other_processes([4_000_001, 4_000_002], {os.getpid()}) == 1
    assert other_processes([os.getpid(), 1], set()) == 1  # the ranks' PIDs not known
    assert other_processes([], {os.getpid()}) == 0
    # a command name with spaces and parentheses does not shift the fields after it
    (tmp_path / "42").mkdir()
    (tmp_path / "42" / "stat").write_text("42 (a (b) c) S 7 42 42 0 -1\n")
    assert parent_pid(42, tmp_path) == 7 and parent_pid(43, tmp_path) is None
