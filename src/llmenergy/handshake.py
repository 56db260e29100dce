"""The ``.run/`` handshake: the records a job's ranks, node agents and launcher exchange.

Each is a typed, versioned JSON record (read as :mod:`llmenergy.cellfiles` reads a
cell's records; another ``schema_version``, or a file that is not one, raises
:class:`~llmenergy.errors.RecordError` naming the file). Their paths are
:class:`~llmenergy.layout.CellFiles`'.

* rank 0 → launcher: :class:`WorkerStatus` (``worker_status.json``), :class:`CellBegin`
  (``begin.json``), :class:`ClockOffsets` (``clocks.json``);
* every rank → launcher: :class:`RankOutcome` (``ranks/{rank}.json``);
* a rank → its node's agents: :class:`RankDevice` (``CellFiles.rank_devices``);
* a node's collector → rank 0 and the launcher: :class:`CollectorReady` (``ready/``,
  :func:`read_ready`, :func:`collector_problem`);
* a node's power-cap guard → the ranks: :class:`CapReady` (``CellFiles.cap_ready``).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Self

from llmenergy import atomic
from llmenergy.cellfiles import SCHEMA_VERSION, read_record, record_fields
from llmenergy.errors import RecordError


class _Handshake:
    """A versioned JSON record of the ``.run/`` handshake (the subclasses are dataclasses)."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)  # type: ignore[call-overload]

    def write(self, path: Path) -> None:
        atomic.write_json(path, {"schema_version": SCHEMA_VERSION, **self.to_dict()})

    @classmethod
    def read(cls, path: Path) -> Self:
        return cls(**record_fields(cls, read_record(path), str(path)))


# --------------------------------------------------------------------------- #
# Ranks → launcher
# --------------------------------------------------------------------------- #

@dataclass(frozen=True)
class WorkerStatus(_Handshake):
    """Rank 0's outcome (``.run/worker_status.json``)."""

    status: str
    reason: str | None = None
    load: dict[str, Any] | None = None  # weights.LoadInfo of an ok run
    fidelity: dict[str, Any] | None = None  # cellfiles.Fidelity of an ok run (int8, fp8, bf16)


@dataclass(frozen=True)
class CellBegin(_Handshake):
    """Rank 0 → launcher (``.run/begin.json``): a cell of the job has started."""

    cell_id: str
    position: int
    started_ns: int


@dataclass(frozen=True)
class ClockOffsets(_Handshake):
    """Rank 0 → launcher (the job's ``.run/clocks.json``): each node's wall clock minus
    rank 0's, measured once per job by timed round trips over the process group
    (:func:`llmenergy.inference.rank.measure_clock_offsets`). ``rtt_ns`` is the round
    trip of the sample each offset comes from; its half bounds the offset's error."""

    offsets_ns: dict[str, int]
    rtt_ns: dict[str, int]
    measured_ns: int = 0


@dataclass(frozen=True)
class RankOutcome(_Handshake):
    """One rank's end of a cell (``.run/ranks/{rank}.json``): what it saw, when, and
    ``left`` once it leaves the job because the ranks are out of step."""

    rank: int
    status: str
    reason: str | None = None
    at_ns: int = 0
    left: bool = False


# --------------------------------------------------------------------------- #
# Ranks ↔ node agents
# --------------------------------------------------------------------------- #

@dataclass(frozen=True)
class RankDevice(_Handshake):
    """A rank → its node's agents (``CellFiles.rank_devices``, one file a rank): the device it runs on."""

    node: str = ""
    rank: int = -1
    uuid: str = ""  # "GPU-…", or "cpu"
    name: str = ""
    index: int = -1
    pid: int = -1  # the rank's process on its node: its children are the job's too (power.processes)

    @classmethod
    def read(cls, path: Path) -> Self:
        """As the other records, except that a file without ``schema_version`` or without
        the descriptive fields is read too (a stand-in rank announcing only its ``uuid``);
        one without ``uuid`` is not one."""
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, ValueError) as exc:
            raise RecordError(f"{path}: unreadable ({exc})") from None
        if not isinstance(data, dict) or not data.get("uuid"):
            raise RecordError(f"{path}: not a device record (no uuid)")
        if data.get("schema_version", SCHEMA_VERSION) != SCHEMA_VERSION:
            raise RecordError(f"{path}: schema_version {data['schema_version']!r}, this llmenergy reads "
                              f"{SCHEMA_VERSION}")
        return cls(**record_fields(cls, data, str(path)))


@dataclass(frozen=True)
class CollectorReady(_Handshake):
    """A node's collector → rank 0 and the launcher (``.run/ready/{node}.json``); ``backend``
    None with the one-line ``error`` when no backend could be built. Rewritten with an
    ``error`` when the collector fails later (it, or its node agent when it dies):
    :func:`collector_problem` then fails the job."""

    node: str
    backend: str | None
    devices: list[dict[str, Any]] = field(default_factory=list)
    interval_ms: int | None = None
    error: str | None = None


def read_ready(directory: Path) -> list[CollectorReady]:
    """The :class:`CollectorReady` records of a ``ready/`` folder (a torn one is skipped: the
    next poll reads it whole)."""
    out = []
    for path in sorted(directory.glob("*.json")) if directory.is_dir() else []:
        try:
            out.append(CollectorReady.read(path))
        except RecordError:
            continue
    return out


def collector_problem(records: list[CollectorReady]) -> str | None:
    """Why a job's collectors cannot meter it, in one line naming the node, or None.

    A collector that reported an error (no backend, or it failed later) fails the job;
    so do collectors that resolved to different backends (``auto`` on unlike nodes):
    one backend per cell. The first node in name order sets the backend the others
    are compared with.
    """
    ordered = sorted(records, key=lambda r: r.node)
    for rec in ordered:
        if rec.error:
            return f"collector on node {rec.node} failed: {rec.error}"
    if ordered:
        first = ordered[0]
        for rec in ordered[1:]:
            if rec.backend != first.backend:
                return (f"collector backend differs on node {rec.node}: {rec.backend} "
                        f"(node {first.node}: {first.backend}); one backend per cell: set collector.backend")
    return None


@dataclass(frozen=True)
class CapReady(_Handshake):
    """A node's power-cap guard → the ranks (``CellFiles.cap_ready``, one file a node)."""

    node: str
    status: str  # "applied" | "denied" | "error"
    reason: str | None = None
    backend: str | None = None
    requested_w: float | None = None
    on_denied: str | None = None
    gpus: list[dict[str, Any]] = field(default_factory=list)  # uuid, previous_w, requested_w, enforced_w
