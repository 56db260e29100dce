"""The launcher's second half: turn what a job's ranks and collectors left into each
cell's ``power.parquet``, ``metrics.parquet`` and, last, ``cell.json``.

A job runs one cell (``run-cell``) or a packed group's cells in order
(``run-group``). While the ranks go on with the next cell, :class:`CellsInFlight`
finalises each cell whose ``.run/worker_status.json`` appeared; the last cell, and
whatever cell the job ended in (a stop signal, the time limit, a rank failing alone,
a node failure), is finalised once the ranks are gone, with their exit codes. A
cell never started gets no record, so the next run runs exactly it.

Every node's power timestamps are moved onto rank 0's clock by the offset the ranks
measured at the job's handshake (``.run/clocks.json``; :func:`to_rank0_clock`), so
that they join rank 0's events. The power of a cell that had its job to itself is every sample of the job; in a
group it is the group collectors' samples over the cell's own window (its first
event to its last, ± :data:`WINDOW_MARGIN_S`), taken once the collectors' part
files cover it.

A cell that does not end accepted (:func:`llmenergy.cellfiles.accepted`), a
failure to compute its metrics included, keeps its raw data and ``.run/`` for
inspection, and leaves a copy of its record in ``failed/``.
"""
from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass
from typing import Any

from llmenergy import atomic
from llmenergy.cellfiles import POWER_SCHEMA, Cell, CellRecord, CellSpec, accepted
from llmenergy.config import Config
from llmenergy.errors import RecordError
from llmenergy.handshake import CellBegin, ClockOffsets, RankOutcome, WorkerStatus
from llmenergy.layout import CellFiles
from llmenergy.orchestrate.provenance import collect_provenance, worker_fidelity

log = logging.getLogger("llmenergy.orchestrate.launch")

#: Power samples kept on each side of a packed cell's window (the counter is interpolated at its edges).
WINDOW_MARGIN_S = 2.0
#: How long the launcher waits for the collectors' parts to cover a finished cell's window.
COVER_TIMEOUT_S = 15.0


def cell_status(files: CellFiles, codes: list[int], signum: int | None,
                error: str | None = None) -> tuple[str, str | None]:
    """The cell's status and reason: the job's collector ``error`` (failed), else rank 0's
    record, else the first rank that failed, else the exit codes; a stop signal received
    before the record is written (``signum``) makes an ``ok`` cell ``incomplete``."""
    if error is not None:
        return "failed", error
    status, reason = _ranks_status(files, codes, signum)
    if signum is not None and status == "ok":
        return "incomplete", f"interrupted by signal {signum} before the cell was recorded"
    return status, reason


def _ranks_status(files: CellFiles, codes: list[int], signum: int | None) -> tuple[str, str | None]:
    if files.worker_status.exists():
        try:
            st = WorkerStatus.read(files.worker_status)
        except RecordError as exc:
            return "failed", str(exc)
        if st.status != "ok" or all(c == 0 for c in codes):
            return st.status, st.reason
    failed = []
    for path in sorted(files.outcomes.glob("*.json")) if files.outcomes.is_dir() else []:
        try:
            outcome = RankOutcome.read(path)
        except RecordError:
            continue
        if outcome.status != "ok":
            failed.append(outcome)
    if failed:
        first = min(failed, key=lambda o: (o.at_ns, o.rank))
        return first.status, first.reason
    if signum is not None:
        return "incomplete", f"interrupted by signal {signum}"
    bad = [c for c in codes if c != 0]
    return ("failed", f"rank exited with code {bad[0]}; see logs/") if bad else ("ok", None)


def switches_differ(record: CellRecord) -> str | None:
    """Why a compiled cell is not what its definition says: its rank 0 ran under other
    engine switches (``provenance.load.engine_switches``) than the job's process that
    defined it (``definition.engine_switches``, absent when none is set). A launcher that
    does not pass the job's environment to its ranks would otherwise record one kernel
    and measure another. ``None`` when they agree or the rank recorded none."""
    load = record.provenance.load or {}
    if record.cell.engine != "compiled" or "engine_switches" not in load:
        return None
    ran, defined = load["engine_switches"], (record.definition or {}).get("engine_switches", {})
    if ran == defined:
        return None
    return (f"engine switches differ: the ranks ran with {ran or 'none'}, the job defined the cell with "
            f"{defined or 'none'}; the ranks must inherit the job's environment (srun --export=ALL)")


def finalize(cfg: Config, cell: Cell, spec: CellSpec, files: CellFiles, *, codes: list[int], signum: int | None,
             started: float, launcher: str, power: Any, recovered: list[str],
             measured: tuple[str, dict[str, Any]], powercap_dir: Any = None,
             group: dict[str, Any] | None = None, wall_s: float | None = None,
             error: str | None = None) -> int:
    """Write a cell's ``power.parquet``, ``metrics.parquet`` and, last, ``cell.json``
    (and ``failed/{cell}.json`` when not accepted); returns the cell's exit code.

    An ``ok`` cell whose energy is incomplete (a repeat's energy null while a collector
    was configured: :func:`llmenergy.analysis.metrics.energy_incomplete_reason`) is
    recorded ``incomplete`` with that reason, and reruns."""
    from llmenergy.analysis.metrics import cell_metrics
    from llmenergy.power.caps import read_cap_report

    status, reason = cell_status(files, codes, signum, error)
    if power.num_rows:
        atomic.write_parquet(files.power, power)
    record = CellRecord(cell=cell, status=status, reason=reason, repeats=cfg.repeats, launcher=launcher,
                        rank_exit_codes=codes, power_recovered_from_parts=recovered,
                        provenance=collect_provenance(files, started=started, power=power),
                        fingerprint=measured[0], definition=measured[1], fidelity=worker_fidelity(files))
    record.provenance.group = group
    why = switches_differ(record) if record.status == "ok" else None
    if why is not None:
        record.status, record.reason = "failed", why
    if wall_s is not None:  # a packed cell: its own window, not the job's
        record.provenance.wall_s = round(wall_s, 3)
    if cell.power_cap_w is not None:
        record.provenance.power_cap = read_cap_report(powercap_dir or files.powercap)
    try:
        metrics, why = cell_metrics(files.root, record=record, spec=spec)
        if why is not None:
            record.status, record.reason = "incomplete", why
        atomic.write_parquet(files.metrics, metrics)
    except Exception as exc:  # noqa: BLE001 - a metrics bug must not lose the run's raw data
        log.exception("%s: computing metrics failed", cell.id)
        record.status, record.reason = "failed", f"metrics: {type(exc).__name__}: {exc}"
    ok = accepted(record.status, cfg.policies)
    if ok:
        shutil.rmtree(files.run, ignore_errors=True)
    record.write(files.record)
    if not ok:
        record.write(files.failed_record())
        log.error("%s: %s (%s)", cell.id, record.status, record.reason)
        return 1
    files.failed_record().unlink(missing_ok=True)  # failed/ lists only cells not yet finished
    log.info("%s: %s in %.1f s", cell.id, record.status, time.time() - started)
    return 0


def to_rank0_clock(power: Any, offsets_ns: dict[str, int]) -> Any:
    """``power`` with each node's timestamps moved onto rank 0's clock (minus the node's
    offset, :class:`~llmenergy.handshake.ClockOffsets`); a node without one is left as is."""
    import numpy as np
    import pyarrow as pa

    if not power.num_rows or not any(offsets_ns.values()):
        return power
    shift = np.array([offsets_ns.get(n, 0) for n in power["node"].to_pylist()], dtype=np.int64)
    ts = power["timestamp_ns"].to_numpy(zero_copy_only=False).astype(np.int64) - shift
    i = power.schema.get_field_index("timestamp_ns")
    return power.set_column(i, power.schema.field(i), pa.array(ts, type=pa.int64()))


def read_offsets(job: CellFiles) -> dict[str, int]:
    """The job's clock offsets (``.run/clocks.json``), or none (not measured, or unreadable: logged)."""
    if not job.clocks.exists():
        return {}
    try:
        return ClockOffsets.read(job.clocks).offsets_ns
    except RecordError as exc:
        log.warning("%s: power timestamps left uncorrected", exc)
        return {}


def read_power(job: CellFiles, *, quiet: bool) -> Any:
    """The job collectors' samples so far (final files and parts), each node's on rank 0's
    clock (:func:`to_rank0_clock`), or None while they are rotating."""
    import pyarrow as pa

    from llmenergy.power.collector import merge_node_files

    logger = logging.getLogger("llmenergy.power.collector")
    level = logger.level
    if quiet:
        logger.setLevel(logging.ERROR)  # mid-run, every node "has no final file" yet: that is expected
    try:
        return to_rank0_clock(merge_node_files(job.power_parts), read_offsets(job))
    except (OSError, pa.ArrowException) as exc:  # a part renamed or removed while read
        log.debug("power files changing (%s); retrying", exc)
        return None
    finally:
        logger.setLevel(level)


def _window(files: CellFiles, begin_ns: int) -> tuple[int, int]:
    """The cell's first and last event instants (from ``events.parquet``), else begin → now."""
    import pyarrow.parquet as pq

    try:
        t = pq.read_table(files.events, columns=["start_ns", "end_ns"])
        if t.num_rows:
            return int(min(t["start_ns"].to_pylist())), int(max(t["end_ns"].to_pylist()))
    except (OSError, ValueError):
        pass
    return begin_ns, time.time_ns()


def _slice(power: Any, lo_ns: int, hi_ns: int) -> Any:
    import pyarrow.compute as pc

    ts = power["timestamp_ns"]
    table = power.filter(pc.and_(pc.greater_equal(ts, lo_ns), pc.less_equal(ts, hi_ns)))
    return table.replace_schema_metadata(None)


def _latest_by_node(power: Any) -> list[int]:
    out: dict[str, int] = {}
    for node, ts in zip(power["node"].to_pylist(), power["timestamp_ns"].to_pylist(), strict=True):
        out[node] = max(ts, out.get(node, ts))
    return list(out.values())


def job_progress_text(cfg: Config, done: list[Cell], left: list[Cell], elapsed_s: float) -> str:
    """``3 of 12 cell(s) done, 9 left: about 4.5 h more (estimate)``: the planner's estimate of
    the cells left, scaled by this job's pace so far (its time over the estimate of those done)."""
    from llmenergy.planning.jobs import runtime_s

    pace = elapsed_s / max(runtime_s(cfg, done), 1e-9)
    more_s = pace * runtime_s(cfg, left)
    more = f"{more_s / 3600:.1f} h" if more_s >= 5400 else f"{max(1, round(more_s / 60))} min"
    return (f"{len(done)} of {len(done) + len(left)} cell(s) done, {len(left)} left: about {more} more "
            "(estimate: the plan's, scaled by this job's pace so far)")


@dataclass
class JobOf:
    """The job the cells run in: its directory, its group (None: a cell run alone), its launcher."""

    files: CellFiles
    group_id: str | None
    group_cells: list[str]
    launcher: str
    started: float


class CellsInFlight:
    """A job's cells as they finish: finalised one by one, in order, while the ranks go on."""

    def __init__(self, cfg: Config, job: JobOf, todo: list[Cell], specs: dict[str, CellSpec],
                 measured: dict[str, tuple[str, dict[str, Any]]]) -> None:
        self.cfg, self.job = cfg, job
        self.pending = list(todo)
        self.finished: list[Cell] = []  # finalised in this job, in order
        self.specs, self.measured = specs, measured
        self.codes: dict[str, int] = {}
        self.loaded_by: str | None = None
        self._last_try: dict[str, float] = {}

    def tick(self, *, final: bool = False, codes: list[int] | None = None, signum: int | None = None,
             error: str | None = None) -> None:
        """Finalise the finished cells, in order; ``final``: the ranks are gone, finalise what started.
        The last cell waits for the ranks' exit codes (those of a cell run alone). ``signum``: a stop
        signal the launcher received so far (every cell recorded after it is ``incomplete``);
        ``error``: the collectors' problem the job ended on (the cell it ended in is ``failed``)."""
        while self.pending:
            cell = self.pending[0]
            files = cell.files(self.cfg.output_dir)
            done = files.worker_status.exists()
            if not final and (not done or len(self.pending) == 1):
                return
            try:
                begin: CellBegin | None = CellBegin.read(files.begin)
            except RecordError:
                begin = None
            if begin is None and not (final and self.job.group_id is None):
                log.info("%s: not started in this job; left for the next run", cell.id)
                shutil.rmtree(files.run, ignore_errors=True)
                self.pending.pop(0)
                continue
            if not final:
                now = time.monotonic()
                if now - self._last_try.get(cell.id, 0.0) < 1.0:
                    return
                self._last_try[cell.id] = now
            if not self._finalize(cell, files, begin, final=final,
                                  codes=(codes or []) if final else [0], signum=signum,
                                  error=error if final else None):
                return
            self.finished.append(self.pending.pop(0))
            if self.job.group_id is not None and self.pending and not final:
                log.info("%s: %s", self.job.group_id, job_progress_text(self.cfg, self.finished, self.pending,
                                                                    time.time() - self.job.started))

    def _finalize(self, cell: Cell, files: CellFiles, begin: CellBegin | None, *, final: bool,
                  codes: list[int], signum: int | None, error: str | None = None) -> bool:
        from llmenergy.power.collector import recovered_nodes

        job = self.job
        power = read_power(job.files, quiet=not final)
        if power is None and not final:
            return False
        if power is None:
            power = POWER_SCHEMA.empty_table()
        group, wall_s, started = None, None, job.started
        if job.group_id is not None:
            begin_ns = begin.started_ns if begin is not None else time.time_ns()
            start_ns, end_ns = _window(files, begin_ns)
            margin = int(WINDOW_MARGIN_S * 1e9)
            if not final:
                covered = _latest_by_node(power)
                waited = time.time_ns() - end_ns
                if (not covered or min(covered) < end_ns + margin) and waited < COVER_TIMEOUT_S * 1e9:
                    return False
            power = _slice(power, start_ns - margin, end_ns + margin)
            # the provenance of the group's ranks and collectors
            for src_dir, dst in ((job.files.rank_devices, files.rank_devices), (job.files.ready, files.ready)):
                dst.mkdir(parents=True, exist_ok=True)
                for src in src_dir.glob("*.json"):
                    shutil.copyfile(src, dst / src.name)
            if job.files.clocks.exists():
                shutil.copyfile(job.files.clocks, files.clocks)
            loaded_here = self.loaded_by is None
            self.loaded_by = self.loaded_by or cell.id
            group = {"group_id": job.group_id, "position": job.group_cells.index(cell.id),
                     "cells": job.group_cells, "model_loaded_here": loaded_here, "logs": str(job.files.logs)}
            started, wall_s = begin_ns / 1e9, (end_ns - start_ns) / 1e9
        recovered = recovered_nodes(power) if final and job.group_id is None else []
        self.codes[cell.id] = finalize(
            self.cfg, cell, self.specs[cell.id], files, codes=codes, signum=signum, started=started,
            launcher=job.launcher, power=power, recovered=recovered, measured=self.measured[cell.id],
            powercap_dir=job.files.powercap, group=group, wall_s=wall_s, error=error)
        return True
