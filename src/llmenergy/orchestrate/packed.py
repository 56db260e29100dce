"""Run a packed group (``llmenergy run-group``): one job, one model load, the group's cells in order.

The launcher of :mod:`.launch`, once for the whole group: it skips the group's
finished cells (``launch._finished``: accepted, current fingerprint), writes each
remaining cell's ``spec.json`` and the group's ``groups/{id}/group.json``
(:class:`~llmenergy.cellfiles.GroupSpec`), starts one node agent per node
(collector, and the power-cap guard of a capped group: the cap is set once and
restored at the end, on every exit path) and the ranks
(:mod:`llmenergy.inference.packed`), all with their logs in ``groups/{id}/logs/``.

While the ranks go on with the next cell, the launcher finalises each cell whose
``worker_status.json`` appeared, as ``run-cell`` does (:func:`.launch.finalize`):
its ``power.parquet`` is the group collectors' samples over the cell's own window
(its first event to its last, ± :data:`WINDOW_MARGIN_S`), taken once the
collectors' part files cover it. A job that ends early (a stop signal, the time
limit, a node failure) finalises the cell it was in (``incomplete`` or ``failed``);
cells never started get no record, so the next run runs exactly them.

``groups/{id}/done.json`` is written when every cell of the group is finished:
it is the Snakemake rule's output. The exit code is 0 only then.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any

from llmenergy import atomic, entrypoints
from llmenergy.cellfiles import (
    GROUP_DONE,
    GROUP_SPEC,
    Cell,
    CellFiles,
    CellRecord,
    CellSpec,
    GroupSpec,
    accepted,
)
from llmenergy.config import Config
from llmenergy.errors import RecordError
from llmenergy.inference.packed import BEGIN
from llmenergy.orchestrate import launch
from llmenergy.planning.groups import Group

log = logging.getLogger(__name__)

#: Power samples kept on each side of a cell's window (the counter is interpolated at its edges).
WINDOW_MARGIN_S = 2.0
#: How long the launcher waits for the collectors' parts to cover a finished cell's window.
COVER_TIMEOUT_S = 15.0


def group_dir(output_dir: str | Path, gid: str) -> Path:
    return Path(output_dir) / "groups" / gid


def done_path(output_dir: str | Path, gid: str) -> Path:
    """The group's done marker: written once every cell of the group is finished."""
    return group_dir(output_dir, gid) / GROUP_DONE


def _read_power(directory: Path) -> Any:
    """The group collectors' samples so far (final files and parts), or None while they are rotating."""
    import pyarrow as pa

    from llmenergy.power.collector import merge_node_files

    quiet = logging.getLogger("llmenergy.power.collector")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # mid-run, every node "has no final file" yet: that is expected
    try:
        return merge_node_files(directory)
    except (OSError, pa.ArrowException) as exc:  # a part renamed or removed while read
        log.debug("power files changing (%s); retrying", exc)
        return None
    finally:
        quiet.setLevel(level)


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


class _Cells:
    """The group's cells as they finish: finalised one by one while the ranks go on."""

    def __init__(self, cfg: Config, group: Group, todo: list[Cell], specs: dict[str, CellSpec],
                 gfiles: CellFiles, launcher: str) -> None:
        self.cfg, self.group, self.gfiles, self.launcher = cfg, group, gfiles, launcher
        self.pending = list(todo)
        self.specs = specs
        self.codes: dict[str, int] = {}
        self.measured = {c.id: launch.measurement(cfg, c) for c in todo}
        self.loaded_by: str | None = None
        self._last_try: dict[str, float] = {}

    def _begin(self, files: CellFiles) -> dict[str, Any] | None:
        try:
            return json.loads((files.run / BEGIN).read_text())
        except (OSError, ValueError):
            return None

    def tick(self, *, final: bool = False, codes: list[int] | None = None, signum: int | None = None) -> None:
        """Finalise the finished cells, in order; ``final``: the ranks are gone, finalise what started."""
        while self.pending:
            cell = self.pending[0]
            files = cell.files(self.cfg.output_dir)
            begin = self._begin(files)
            done = files.worker_status.exists()
            if not final and not done:
                return
            if begin is None:  # never started: no record, the next run runs it
                log.info("%s: not started in this job; left for the next run", cell.id)
                shutil.rmtree(files.run, ignore_errors=True)
                self.pending.pop(0)
                continue
            if not final:
                now = time.monotonic()
                if now - self._last_try.get(cell.id, 0.0) < 1.0:
                    return
                self._last_try[cell.id] = now
            if not self._finalize(cell, files, begin, final=final, codes=[0] if done else (codes or []),
                                  signum=None if done else signum):
                return
            self.pending.pop(0)

    def _finalize(self, cell: Cell, files: CellFiles, begin: dict[str, Any], *, final: bool, codes: list[int],
                  signum: int | None) -> bool:
        start_ns, end_ns = _window(files, int(begin.get("started_ns") or time.time_ns()))
        margin = int(WINDOW_MARGIN_S * 1e9)
        power = _read_power(self.gfiles.run / "power")
        if power is None and not final:
            return False
        if not final and power is not None:
            covered = [max(t) for t in _by_node(power).values()]
            waited = time.time_ns() - end_ns
            if (not covered or min(covered) < end_ns + margin) and waited < COVER_TIMEOUT_S * 1e9:
                return False
        if power is None:
            from llmenergy.cellfiles import POWER_SCHEMA

            power = POWER_SCHEMA.empty_table()
        power = _slice(power, start_ns - margin, end_ns + margin)
        for sub in ("uuids", "ready"):  # the provenance of the group's ranks and collectors
            (files.run / sub).mkdir(parents=True, exist_ok=True)
            for src in (self.gfiles.run / sub).glob("*.json"):
                shutil.copyfile(src, files.run / sub / src.name)
        position = self.group.cell_ids.index(cell.id)
        loaded_here = self.loaded_by is None
        self.loaded_by = self.loaded_by or cell.id
        group = {"group_id": self.group.id, "position": position, "cells": self.group.cell_ids,
                 "model_loaded_here": loaded_here, "logs": str(self.gfiles.logs)}
        self.codes[cell.id] = launch.finalize(
            self.cfg, cell, self.specs[cell.id], files, codes=codes, signum=signum,
            started=int(begin.get("started_ns") or time.time_ns()) / 1e9, launcher=self.launcher, power=power,
            recovered=[], measured=self.measured[cell.id], powercap_dir=self.gfiles.powercap, group=group,
            wall_s=(end_ns - start_ns) / 1e9)
        return True


def _by_node(power: Any) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for node, ts in zip(power["node"].to_pylist(), power["timestamp_ns"].to_pylist(), strict=True):
        out.setdefault(node, []).append(ts)
    return out


def _prepare_group(gfiles: CellFiles) -> None:
    shutil.rmtree(gfiles.powercap, ignore_errors=True)
    shutil.rmtree(gfiles.run, ignore_errors=True)
    (gfiles.root / GROUP_DONE).unlink(missing_ok=True)
    for d in ("uuids", "ready", "capready", "power"):
        (gfiles.run / d).mkdir(parents=True, exist_ok=True)
    gfiles.logs.mkdir(parents=True, exist_ok=True)


def _write_done(cfg: Config, group: Group) -> None:
    statuses = {}
    for cell in group.cells:
        try:
            statuses[cell.id] = CellRecord.read(cell.files(cfg.output_dir).record).status
        except RecordError:
            statuses[cell.id] = None
    atomic.write_json(done_path(cfg.output_dir, group.id), {"group_id": group.id, "cells": statuses})


def run_group(cfg: Config, group: Group, *, launcher: str = "auto", force: bool = False) -> int:
    """Run ``group``'s unfinished cells in one job with one model load; returns the exit code."""
    out = cfg.output_dir
    todo = [c for c in group.cells
            if force or launch._finished(cfg, c.files(out), launch.measurement(cfg, c)) is None]
    if not todo:
        log.info("%s: all %d cells already finished; nothing to run", group.id, len(group.cells))
        _write_done(cfg, group)
        return 0
    if launcher == "auto":
        launcher = "srun" if os.environ.get("SLURM_JOB_ID") and shutil.which("srun") else "local"
    gfiles = CellFiles(group_dir(out, group.id))
    _prepare_group(gfiles)
    specs: dict[str, CellSpec] = {}
    for cell in todo:
        files = cell.files(out)
        launch._prepare(files)
        specs[cell.id] = launch.cell_spec(cfg, cell)
        specs[cell.id].write(files.spec)
    first = specs[todo[0].id]
    first.write(gfiles.spec)  # the node agents' spec: collector, layout, power cap, policies
    group_spec = gfiles.root / GROUP_SPEC
    GroupSpec(group.id, [c.id for c in todo], str(Path(out).resolve() / "cells")).write(group_spec)
    log.info("%s: %d of %d cell(s) to run, one model load, %d rank(s) on %d node(s) via %s", group.id, len(todo),
             len(group.cells), todo[0].shards, first.nodes, launcher)
    cells = _Cells(cfg, group, todo, specs, gfiles, launcher)
    worker = [sys.executable, "-m", entrypoints.WORKER, "--group", str(group_spec)]
    fwd = launch._Forward(signal.SIGUSR2 if launcher == "srun" else None)
    try:
        if launcher == "srun":
            codes = launch._launch_srun(gfiles, fwd, cfg, todo[0], worker_args=worker, tick=cells.tick)
        else:
            codes = launch._launch_local(first, gfiles, fwd, worker_args=worker, tick=cells.tick)
    finally:
        fwd.restore()
    cells.tick(final=True, codes=codes, signum=fwd.signum)
    finished = [c for c in todo if cells.codes.get(c.id) == 0]
    log.info("%s: %d of %d cell(s) finished in this job (ranks exited %s)", group.id, len(finished), len(todo), codes)
    if len(finished) == len(todo):
        shutil.rmtree(gfiles.run, ignore_errors=True)
        _write_done(cfg, group)
        return 0
    return 1
