"""Which of the processes holding a GPU's compute context are not the job's own.

The energy counter meters the whole GPU, so a process of another job on it (a leftover rank,
a notebook) puts its draw into the cell's energy. NVML lists the processes holding a compute
context on a GPU by PID; the job's own are its ranks on this node (each announces its PID in
its :class:`~llmenergy.handshake.RankDevice` file) and their children: Inductor's compile
workers, for one, are started by the rank and may hold a context of their own. A process is
the job's own when it is a rank or descends from one (its parents read from ``/proc``). The
CUDA MPS server, which holds the contexts of its clients, is no other job's process either.

Where no listed process can be traced to a rank (the ranks' PIDs are not known, or NVML
reports the PIDs of another PID namespace, as in a container), the rank is taken to be one of
them: the others are counted, as many as there are beyond one. A listed process that this
``/proc`` does not show is counted only if the listing before showed it too: one of the job's
children that exits between NVML's listing and the read of its parents is gone by the next
listing, while another user's process hidden by ``hidepid`` stays.
"""
from __future__ import annotations

import logging
from collections.abc import Collection, Hashable, Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

PROC = Path("/proc")
#: How far up the parents of a process are followed before it is taken as not the job's.
MAX_DEPTH = 64
#: ``/proc/<pid>/comm`` of the CUDA MPS server (the kernel keeps 15 bytes of the name).
MPS_SERVER_COMM = b"nvidia-cuda-mps"


def parent_pid(pid: int, proc: Path = PROC) -> int | None:
    """The parent of ``pid`` as ``proc`` shows it, or None (no such process, or unreadable)."""
    try:
        stat = (proc / str(pid) / "stat").read_bytes()  # the name may be cut mid-character: bytes
    except OSError:
        return None
    # "pid (comm) state ppid ...": comm may hold spaces and parentheses, so split after the last ')'
    fields = stat[stat.rfind(b")") + 1:].split()
    try:
        return int(fields[1])
    except (IndexError, ValueError):
        return None


def is_own(pid: int, own: Collection[int], proc: Path = PROC) -> bool:
    """Whether ``pid`` is one of ``own`` or descends from one."""
    current: int | None = pid
    for _ in range(MAX_DEPTH):
        if current is None:
            return False
        if current in own:  # before the guard below: in a container the rank may be PID 1
            return True
        if current <= 1:
            return False
        current = parent_pid(current, proc)
    return False


def _is_mps_server(pid: int, proc: Path) -> bool:
    try:
        return (proc / str(pid) / "comm").read_bytes().startswith(MPS_SERVER_COMM)
    except OSError:
        return False


def other_processes(pids: Sequence[int], own: Collection[int], proc: Path = PROC,
                    listed_before: Collection[int] = ()) -> int:
    """How many of ``pids`` (the processes holding a compute context on one GPU) are not the job's
    own: neither one of the ranks' PIDs ``own`` nor a descendant of one, nor the MPS server.
    Where none of them can be traced to a rank, the rank is taken to be one of them. A PID this
    ``proc`` does not show counts only when also in ``listed_before`` (the listing before)."""
    if not pids:
        return 0
    ours = [p for p in pids if own and is_own(p, own, proc)]
    rest = [p for p in pids if p not in ours and not _is_mps_server(p, proc)]
    if not ours:
        return max(len(rest) - 1, 0)
    return sum(1 for p in rest if (proc / str(p)).exists() or p in listed_before)


class OtherProcessCount:
    """:func:`other_processes` of each GPU from its successive listings, for a backend that lists
    them (``what`` names it in the log). A GPU whose listing is empty or absent gives None (while
    a rank holds a context there: another PID namespace, nothing to tell); one whose listing
    cannot be counted gives None too, logged once per GPU: a flag's input is never worth the
    collector."""

    def __init__(self, what: str, proc: Path = PROC) -> None:
        self.what = what
        self.proc = proc
        self._listed: dict[Hashable, list[int]] = {}  # each GPU's PIDs at its listing before
        self._failed: set[Hashable] = set()

    def count(self, gpu: Hashable, processes: Sequence[Any] | None, own: Collection[int]) -> int | None:
        """How many of ``processes`` (objects with a ``pid``: NVML's process records) holding a
        compute context on ``gpu`` are not the job's own (``own``: the ranks' PIDs)."""
        if not processes:
            return None
        try:
            pids = [int(p.pid) for p in processes]
            before, self._listed[gpu] = self._listed.get(gpu, []), pids
            return other_processes(pids, own, self.proc, listed_before=before)
        except Exception as exc:  # noqa: BLE001 - a flag's input, never worth the collector
            if gpu not in self._failed:
                self._failed.add(gpu)
                log.warning("%s: GPU %s: counting other processes failed (%s); reporting null",
                            self.what, gpu, exc)
            return None
