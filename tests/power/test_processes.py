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


def test_without_a_traceable_rank_the_rank_is_taken_to_be_one_of_them() -> None:
    # NVML's PIDs from another PID namespace (a container): none is in this /proc
    assert other_processes([4_000_001, 4_000_002], {os.getpid()}) == 1
    assert other_processes([os.getpid(), 1], set()) == 1  # the ranks' PIDs not known
    assert other_processes([], {os.getpid()}) == 0


def _proc(root: Path, pid: int, ppid: int, comm: bytes = b"python") -> None:
    (root / str(pid)).mkdir()
    (root / str(pid) / "stat").write_bytes(b"%d (%s) S %d 1 1 0 -1\n" % (pid, comm, ppid))
    (root / str(pid) / "comm").write_bytes(comm + b"\n")


def test_proc_entries_as_the_kernel_writes_them(tmp_path: Path) -> None:
    """A /proc of the rank as PID 1 of its container with a compile worker, the MPS server, a
    process whose name was cut mid-character, another user's hidden process, and one of the
    rank's children that has just exited."""
    _proc(tmp_path, 1, 0, b"python")  # the rank, PID 1 of its namespace
    _proc(tmp_path, 40, 1, b"a (b) c")  # its compile worker: a name with spaces and parentheses
    _proc(tmp_path, 41, 0, b"nvidia-cuda-mps")  # nvidia-cuda-mps-server, cut to 15 bytes
    _proc(tmp_path, 42, 0, "jupyter-é".encode()[:-1])  # cut inside 'é': not UTF-8
    assert parent_pid(40, tmp_path) == 1 and parent_pid(42, tmp_path) == 0 and parent_pid(43, tmp_path) is None
    assert is_own(1, {1}, tmp_path) and is_own(40, {1}, tmp_path) and not is_own(42, {1}, tmp_path)
    assert other_processes([1, 40, 41], {1}, tmp_path) == 0  # the rank, its worker, the MPS server
    assert other_processes([1, 42], {1}, tmp_path) == 1  # a notebook
    # 43 is not in this /proc: a child that exited between listing and reading (gone from the
    # next listing), or a hidden process of another user (listed again): counted the second time
    assert other_processes([1, 43], {1}, tmp_path) == 0
    assert other_processes([1, 43], {1}, tmp_path, listed_before=[1, 43]) == 1
