"""Cells metered under older rules, computed again from their raw files.

A ``metrics.parquet`` carries the version of the rules that computed it
(:data:`~llmenergy.analysis.metrics.RULES_VERSION`). One written under older rules does not
pass for current: :func:`remeter` computes its rows again from the cell's raw files, as
``finalize`` would now, and leaves the file as it is. It does so only when every raw input the
old rows were computed from is there and reads whole; otherwise the old rows are kept and the
cell is named with why, since a number computed from fewer inputs than the first time would be
wrong, not newer. A cell whose new rows say another status than its old ones (its energy now
incomplete, say) is named with its ``cell.json``'s SHA-256: that record still says what the cell
did and decides what reruns, so the workflow's next parse (:func:`status_changed_since`) sets
the cell's files aside and measures it again, as for a changed config.
"""
from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from llmenergy.analysis.metrics import RULES_VERSION, cell_metrics, read_records
from llmenergy.atomic import file_sha256
from llmenergy.cellfiles import METRICS_SCHEMA, CellRecord, CellSpec
from llmenergy.layout import CellFiles

log = logging.getLogger(__name__)


@dataclass
class Remetered:
    """What :func:`remeter` did, as ``aggregate_problems.json`` records it."""

    table: pa.Table
    #: cells whose rows were computed again
    done: list[str] = field(default_factory=list)
    #: ``{"cell_id", "status", "why"}`` of cells that keep their older rows
    kept: list[dict[str, str]] = field(default_factory=list)
    #: ``{"cell_id", "was", "now", "why", "rules", "record_sha256"}`` of recomputed cells whose
    #: status changed
    status_changed: list[dict[str, str]] = field(default_factory=list)


def _unreadable(path: Path) -> str | None:
    try:
        pq.read_table(path)
    except (OSError, pa.ArrowException) as exc:
        return f"{path.name} does not read ({str(exc).splitlines()[0]})"
    return None


#: Columns whose values come from the power samples: old rows with any of them set were metered.
METERED_COLUMNS = ("energy_j", "energy_instant_j", "cpu_energy_j", "idle_power_w")


def _any_set(table: pa.Table, *columns: str) -> bool:
    return any(table.column(c).null_count < table.num_rows for c in columns if c in table.column_names)


def measured(old: pa.Table) -> bool:
    """Whether the old rows hold measured numbers (a failed cell's placeholder rows do not)."""
    return _any_set(old, "duration_s")


def missing_inputs(cell_dir: Path, old: pa.Table, record: CellRecord | None, spec: CellSpec | None) -> str | None:
    """Why the cell's rows cannot be computed again as they were first (a raw input the old
    rows ``old`` were computed from is absent or does not read; ``record`` and ``spec`` as read
    from the cell), or None when all are there."""
    files = CellFiles(cell_dir)
    if record is None:
        return "no readable cell.json (its status would be guessed)"
    if spec is None:
        return "no readable spec.json"
    need = [files.events]
    sources = {str(s) for s in old.column("power_source").to_pylist() if s is not None}
    # GPU or CPU (RAPL) samples (a CPU cell's power_source says none), or a collector that was to write them
    if (sources - {"none", ""} or _any_set(old, *METERED_COLUMNS) or files.power.exists()
            or spec.collector.backend != "none"):
        need.append(files.power)
    if any(v is not None for v in old.column("responses").to_pylist()) or files.responses.exists():
        need.append(files.responses)
    for path in need:
        if not path.exists():
            return f"no {path.name}"
        if (why := _unreadable(path)) is not None:
            return why
    return None


def _statuses(table: pa.Table) -> str:
    return "+".join(sorted({str(s) for s in table.column("status").to_pylist()}))


def remeter(table: pa.Table, stale: list[Path]) -> Remetered:
    """``table`` with the rows of the ``stale`` cells (metrics computed under older rules)
    computed again from their raw files where all of them are there (:func:`missing_inputs`);
    any failure keeps the cell's older rows (logged, and named with why)."""
    out = Remetered(table)
    olds = {d: table.filter(pc.equal(table["cell_id"], d.name)) for d in stale}
    stale = [d for d in stale if measured(olds[d])]
    if not stale:  # a failed cell's rows: no numbers that other rules would change
        return out
    log.warning("%d cell(s) were metered under older rules than this version's (%d): their rows are "
                "computed again from their raw files", len(stale), RULES_VERSION)
    fresh: list[pa.Table] = []
    for i, cell_dir in enumerate(stale, 1):
        old = olds[cell_dir]
        try:
            record, spec = read_records(cell_dir)
            why = missing_inputs(cell_dir, old, record, spec)
            if why is None:
                new, _ = cell_metrics(cell_dir, record=record, spec=spec)
        except Exception as exc:  # noqa: BLE001 - one cell's failure keeps its rows, not the aggregate
            why = f"computing it again failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        if why is not None:
            log.warning("%s: not computed again (%s): its rows are kept as they were", cell_dir, why)
            out.kept.append({"cell_id": cell_dir.name, "status": _statuses(old), "why": why})
            continue
        fresh.append(new.cast(METRICS_SCHEMA))
        out.done.append(cell_dir.name)
        if (was := _statuses(old)) != (now := _statuses(new)):
            reasons = [str(r) for r in new.column("reason").to_pylist() if r]
            out.status_changed.append({"cell_id": cell_dir.name, "was": was, "now": now,
                                       "why": reasons[0] if reasons else "", "rules": str(RULES_VERSION),
                                       "record_sha256": file_sha256(CellFiles(cell_dir).record)})
        if i % 50 == 0:
            log.info("computed %d of %d cell(s) again", i, len(stale))
    if out.kept:
        log.warning("%d cell(s) keep rows computed under older rules: %s", len(out.kept),
                    ", ".join(k["cell_id"] for k in out.kept))
    for c in out.status_changed:
        log.warning("%s: %s under older rules, %s now (%s); the next run measures it again if it is planned",
                    c["cell_id"], c["was"], c["now"], c["why"])
    if out.done:
        rest = table.filter(pc.invert(pc.is_in(table["cell_id"], value_set=pa.array(out.done))))
        out.table = pa.concat_tables([rest, *fresh])
    return out


def kept_entries(found: dict[str, Any] | None) -> list[dict[str, str]]:
    """``older_rules_kept`` of an ``aggregate_problems.json``: names alone in files written
    before it said why."""
    return [{"status": "", "why": "", **k} if isinstance(k, dict) else {"cell_id": str(k), "status": "", "why": ""}
            for k in (found or {}).get("older_rules_kept", [])]


def status_changed_since(problems: Path, records: Mapping[str, Path]) -> list[tuple[str, str]]:
    """``(cell id, why)`` of the ``status_changed`` cells of the ``aggregate_problems.json``
    ``problems`` that are in ``records`` (``{cell id: its cell.json}``) with the same
    ``cell.json`` the aggregate read (a cell measured again since is not one of them), judged
    under this version's rules (an entry of other rules waits for the next aggregate)."""
    try:
        found = json.loads(problems.read_text())
    except (OSError, ValueError):
        return []  # none yet, or unreadable (the report says so)
    out: list[tuple[str, str]] = []
    for entry in found.get("status_changed") or [] if isinstance(found, dict) else []:
        if not isinstance(entry, dict) or (path := records.get(str(entry.get("cell_id")))) is None:
            continue
        if str(entry.get("rules")) != str(RULES_VERSION):
            continue
        try:
            same = entry.get("record_sha256") == file_sha256(path)
        except OSError:
            same = False
        if same:
            out.append((str(entry["cell_id"]), f"under metrics rules {entry.get('rules', '?')} its rows say "
                        f"{entry.get('now')}, its cell.json {entry.get('was')}: {entry.get('why') or 'no reason given'}"))
    return out
