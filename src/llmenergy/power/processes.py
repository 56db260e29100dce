"""Which of the processes holding a GPU's compute context are not the job's own.

The energy counter meters the whole GPU, so a process of another job on it (a leftover rank,
a notebook) puts its draw into the cell's energy. NVML lists the processes holding a compute
context on a GPU by PID; the job's own are its ranks on this node (each announces its PID in
its :class:`~llmenergy.handshake.RankDevice` file) and their children: Inductor's compile
workers, for one, are started by the rank and may hold a context of their own. A process is
the job's own when it is a rank or descends from one (its parents read from ``/proc``).

Where no listed process can be traced to a rank (the ranks' PIDs are not known, or NVML
reports the PIDs of another PID namespace, as in a container), the rank is taken to be one of
them: the others are counted, as many as there are beyond one.
"""
from __future__ import annotations

import logging
from collections.abc import Collection, Sequence
from pathlib import Path

log = logging.getLogger(__name__)

PROC = Path("/proc")
#: How far up the parents of a process are followed before it is taken as not the job's.
MAX_DEPTH = 64


def parent_pid(pid: int, proc: Path = PROC) -> int | None:
    """The parent of ``pid`` as ``proc`` shows it, or None (no such process, or unreadable)."""
    try:
        stat = (proc / str(pid) / "stat").read_text()
    except OSError:
        return None
    # "pid (comm) state ppid ...": comm may hold spaces and parentheses, so split after the last ')'
    fields = stat[stat.rfind(")") + 1:].split()
    try:
        return int(fields[1])
    except (IndexError, ValueError):
        return None


def is_own(pid: int, own: Collection[int], proc: Path = PROC) -> bool:
    """Whether ``pid`` is one of ``own`` or descends from one."""
    seen = 0
    current: int | None = pid
    while current is not None and current > 1 and seen < MAX_DEPTH:
        if current in own:
            return True
        current = parent_pid(current, proc)
        seen += 1
    return False


def other_processes(pids: Sequence[int], own: Collection[int], proc: Path = PROC) -> int:
    """How many of ``pids`` (the processes holding a compute context on one GPU) are not the job's
    own: neither one of the ranks' PIDs ``own`` nor a descendant of one. Where none of them can
    be traced to a rank, the rank is taken to be one of them (``len(pids) - 1``)."""
    if not pids:
        return 0
    ours = sum(is_own(p, own, proc) for p in pids) if own else 0
    if ours == 0:
        return len(pids) - 1
    return len(pids) - ours
