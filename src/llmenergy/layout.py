"""Every path of a run, in one place: :class:`RunLayout` (the output directory) and
:class:`CellFiles` (a cell's directory, and a job's: a cell run alone is its own job,
a packed group's job is ``groups/{id}/``), with the ``.run/`` handshake between a
job's ranks, node agents and launcher (docs/internals.md, "Run layout").

No other module spells a file name of a run (``tests/test_module_rules.py`` checks
it); the records these files hold are in :mod:`llmenergy.cellfiles`.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar


@dataclass(frozen=True)
class CellFiles:
    """The files of one cell directory (docs/internals.md, "Cell directory"), and of a
    job's: a cell run alone is its own job; a packed group's job is ``groups/{id}/``."""

    root: Path

    spec = property(lambda self: self.root / "spec.json")
    record = property(lambda self: self.root / "cell.json")
    events = property(lambda self: self.root / "events.parquet")
    responses = property(lambda self: self.root / "responses.parquet")
    power = property(lambda self: self.root / "power.parquet")
    metrics = property(lambda self: self.root / "metrics.parquet")
    logs = property(lambda self: self.root / "logs")
    powercap = property(lambda self: self.root / "powercap")
    run = property(lambda self: self.root / ".run")
    worker_status = property(lambda self: self.root / ".run" / "worker_status.json")
    #: The job's handshake folders (a cell run alone, or a packed group's directory):
    #: the ranks' devices, the collectors' and the power-cap guards' ready files, the
    #: collectors' power files.
    rank_devices = property(lambda self: self.root / ".run" / "uuids")
    ready = property(lambda self: self.root / ".run" / "ready")
    cap_ready = property(lambda self: self.root / ".run" / "capready")
    power_parts = property(lambda self: self.root / ".run" / "power")
    #: Rank 0 → launcher: each node's clock offset to rank 0 (:class:`~llmenergy.handshake.ClockOffsets`).
    clocks = property(lambda self: self.root / ".run" / "clocks.json")
    #: Rank 0 → launcher: the cell has started (:class:`CellBegin`).
    begin = property(lambda self: self.root / ".run" / "begin.json")
    #: Every rank's outcome of the cell (:class:`RankOutcome`), ``{rank}.json``.
    outcomes = property(lambda self: self.root / ".run" / "ranks")
    #: A packed group's spec and done marker (``groups/{id}/``).
    group_spec = property(lambda self: self.root / "group.json")
    done = property(lambda self: self.root / "done.json")
    #: The group of one a cell run alone is (``run-cell``).
    own_group_spec = property(lambda self: self.root / ".run" / "group.json")
    #: The handshake folders made before a job starts.
    HANDSHAKE: ClassVar[tuple[str, ...]] = ("rank_devices", "ready", "cap_ready", "power_parts")

    def outcome(self, rank: int) -> Path:
        return self.outcomes / f"{rank}.json"

    def collector_log(self, node: str) -> Path:
        return self.logs / f"collector.{node}.log"

    def powercap_log(self, node: str) -> Path:
        return self.logs / f"powercap.{node}.log"

    def agent_log(self, node: str) -> Path:
        return self.logs / f"agent.{node}.log"

    def rank_log(self, rank: int | str) -> Path:
        """``rank{R}.log``; ``rank="%t"`` gives srun's per-task pattern."""
        return self.logs / f"rank{rank}.log"

    #: What a finished cell consists of; removed before a cell runs again.
    OUTPUTS: ClassVar[tuple[str, ...]] = ("cell.json", "metrics.parquet", "events.parquet",
                                          "responses.parquet", "power.parquet")

    def failed_record(self) -> Path:
        """``{output_dir}/failed/{cell}.json``: the last failure of a cell not yet finished."""
        return RunLayout.of_cell(self.root).failed_record(self.root.name)


def node_file(directory: Path, node: str) -> Path:
    """A node's file in a handshake folder (``ready/``, ``capready/``, the guard's state)."""
    return Path(directory) / f"{node}.json"


def rank_file(directory: Path, node: str, rank: int) -> Path:
    """A rank's file in ``uuids/``: ``{node}.{rank}.json``."""
    return Path(directory) / f"{node}.{rank}.json"


def rank_of_file(path: Path, node: str) -> int | None:
    """The rank of a ``uuids/`` file of ``node``, else None (another node's, or not one)."""
    name, prefix = path.name, f"{node}."
    if not (name.startswith(prefix) and name.endswith(".json")):
        return None
    rank = name[len(prefix):-len(".json")]
    return int(rank) if rank.isdigit() else None


@dataclass(frozen=True)
class RunLayout:
    """Every path of a run's output directory (``output_dir``)."""

    root: Path

    cells = property(lambda self: self.root / "cells")
    groups = property(lambda self: self.root / "groups")
    failed = property(lambda self: self.root / "failed")
    summary = property(lambda self: self.root / "summary.parquet")
    summary_stats = property(lambda self: self.root / "summary_stats.parquet")
    problems = property(lambda self: self.root / "aggregate_problems.json")
    report = property(lambda self: self.root / "report.html")
    figures = property(lambda self: self.root / "figures")
    logs = property(lambda self: self.root / "logs")
    #: Inductor's cache (compiled engine): repeats and later cells reuse it.
    inductor_cache = property(lambda self: self.root / ".cache" / "inductor")

    def cell(self, cell_id: str) -> CellFiles:
        return CellFiles(self.cells / cell_id)

    def group(self, group_id: str) -> CellFiles:
        return CellFiles(self.groups / group_id)

    def failed_record(self, cell_id: str) -> Path:
        return self.failed / f"{cell_id}.json"

    def rule_log(self, rule: str, name: str) -> Path:
        return self.logs / rule / f"{name}.log"

    @classmethod
    def of_cell(cls, cell_dir: Path) -> RunLayout:
        """The run a cell directory (``{output_dir}/cells/{id}``) belongs to."""
        return cls(Path(cell_dir).parent.parent)
