"""Glue between the Snakemake rules and llmenergy.

Called at every parse of the Snakefile (the submit host's and every Slurm
job's), so it only validates the config and expands the matrix: no heavy
imports (no torch). The one filesystem pass, :meth:`Context.prepare`, runs on
the main process only and reads a few bytes per cell: it moves aside corrupt or
unfinished outputs (:meth:`Context.quarantine_corrupt`) and the outputs of
finished cells whose fingerprint no longer matches the config
(:meth:`Context.supersede_changed`), and notes each unfinished cell's last
record, so that a cell stopped at its time limit asks for more time.
"""
from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from llmenergy import atomic
from llmenergy.cellfiles import Cell, RunLayout, accepted
from llmenergy.config import Config, from_dict
from llmenergy.errors import ConfigError
from llmenergy.planning.groups import (
    Group,
    correction_factors,
    group_runtime_s,
    make_groups,
    resolve_packing,
)
from llmenergy.planning.matrix import Plan, expand, time_limit_min
from llmenergy.slurm import time_limit_signal

log = logging.getLogger(__name__)

RESOLVED_CONFIG = ".llmenergy/config.json"

PARQUET_MAGIC = b"PAR1"


def output_problem(path: Path, accept: Callable[[str], bool] | None = None) -> str | None:
    """Why an existing cell output is unusable, else None.

    Cheap: a Parquet file must start and end with ``PAR1`` (else truncated or
    corrupt); ``cell.json`` must parse as a JSON object whose ``status`` passes
    ``accept``: a cell recorded ``incomplete`` or ``failed`` is not finished,
    even where its job's end raced Snakemake's cleanup of failed outputs.
    """
    try:
        if path.suffix == ".parquet":
            size = path.stat().st_size
            if size < 12:
                return f"{size} bytes, too short for Parquet"
            with open(path, "rb") as f:
                head = f.read(4)
                f.seek(-4, 2)
                tail = f.read(4)
            if head != PARQUET_MAGIC or tail != PARQUET_MAGIC:
                return "not a Parquet file (bad magic bytes)"
            return None
        data = json.loads(path.read_text())
        if not isinstance(data, dict):
            return "not a JSON object"
        status = str(data.get("status"))
        return None if accept is None or accept(status) else f"status {status}, not finished"
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        return f"unreadable: {exc}"


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    return data if isinstance(data, dict) else None


@dataclass
class Changed:
    """A finished cell whose recorded fingerprint differs from the current config's."""

    cell: Cell
    old: str
    new: str
    why: str


@dataclass
class Context:
    cfg: Config
    plan: Plan
    config_arg: str
    #: ``{cell id: (status, time limit in minutes)}`` of unfinished cells' last records.
    previous: dict[str, tuple[str, int | None]] = field(default_factory=dict)
    #: ``group``: one job per group of cells sharing a model load (rule run_group); ``cell``: rule run_cell.
    packing: str = "cell"

    @cached_property
    def groups(self) -> list[Group]:
        return make_groups(self.plan.cells)

    @property
    def group_ids(self) -> list[str]:
        return [g.id for g in self.groups]

    @cached_property
    def _groups(self) -> dict[str, Group]:
        return {g.id: g for g in self.groups}

    def done_marker(self, gid: str) -> str:
        from llmenergy.orchestrate.launch import done_path

        return str(done_path(self.output_dir, gid))

    def targets(self) -> list[str]:
        """What the analysis needs: every cell's metrics (``packing: cell``) or every group's
        done marker (``packing: group``; a group's cells' files are not declared outputs, so
        that a failed cell never takes its finished neighbours with it)."""
        if self.packing == "group":
            return [self.done_marker(gid) for gid in self.group_ids]
        return [str(c.files(self.output_dir).metrics) for c in self.plan.cells]

    def _record(self, cell: Cell) -> dict[str, Any] | None:
        path = cell.files(self.output_dir).record
        return _read_json(path) if path.exists() else None

    def _is_finished(self, cell: Cell) -> bool:
        data = self._record(cell)
        return data is not None and accepted(str(data.get("status")), self.cfg.policies)

    @cached_property
    def factors(self) -> dict[tuple[str, str], float]:
        """Learned runtime corrections per (model, gpu), from finished cells' measured wall time."""
        measured = []
        for cell in self.plan.cells:
            data = self._record(cell)
            if data is not None and accepted(str(data.get("status")), self.cfg.policies):
                wall = (data.get("provenance") or {}).get("wall_s")
                if isinstance(wall, (int, float)):
                    measured.append((cell, float(wall)))
        return correction_factors(self.cfg, measured)

    def unfinished(self, gid: str) -> list[Cell]:
        """The group's cells a job would run now (all of them when every one is finished:
        a forced rerun sizes its job for the whole group)."""
        group = self._groups[gid]
        todo = [c for c in group.cells if not self._is_finished(c)]
        return todo or list(group.cells)

    @cached_property
    def _group_base(self) -> dict[str, dict[str, Any]]:
        return {gid: self._resources_of(g.first.id) for gid, g in self._groups.items()}

    def group_runtime_min(self, gid: str, attempt: int = 1) -> int:
        """The group job's time limit: the margins of a cell's over the sum of its unfinished
        cells' learned estimates; more for a retry and after a record ``incomplete``."""
        from llmenergy.orchestrate.launch import retry_runtime_min

        todo = self.unfinished(gid)
        base = time_limit_min(group_runtime_s(self.cfg, todo, self.factors))
        prev = [self.previous[c.id] for c in todo if c.id in self.previous]
        status = "incomplete" if any(st == "incomplete" for st, _ in prev) else None
        limits = [lim for st, lim in prev if st == "incomplete" and lim]
        return retry_runtime_min(base, attempt, previous_status=status,
                                 previous_limit_min=max(limits) if limits else None)

    def rule_group_resources(self) -> dict[str, Callable[..., Any]]:
        """Resource callables for ``rule run_group``: the layout of the group's cells (the
        same for all), the time of its unfinished cells (:meth:`group_runtime_min`)."""
        keys = sorted({k for gid in self.group_ids for k in self._group_base[gid]})

        def getter(key: str) -> Callable[..., Any]:
            if key == "runtime":
                return lambda wildcards, attempt=1: self.group_runtime_min(wildcards.group, attempt)
            return lambda wildcards: self._group_base[wildcards.group].get(key, "")

        return {k: getter(k) for k in keys}

    def stale_groups(self, *, dry_run: bool = False) -> list[str]:
        """Groups whose done marker exists though a cell of theirs is not finished (set aside,
        superseded, removed by hand); unless ``dry_run``, the marker is removed so the group reruns."""
        stale = []
        for gid in self.group_ids:
            marker = Path(self.done_marker(gid))
            if marker.exists() and not all(self._is_finished(c) for c in self._groups[gid].cells):
                stale.append(gid)
                if not dry_run:
                    marker.unlink(missing_ok=True)
        return stale

    def group_lines(self) -> list[str]:
        """One line per group job: cells, nodes × GPUs, partition, time limit (for ``-n``)."""
        out = []
        for gid in self.group_ids:
            base, todo = self._group_base[gid], self.unfinished(gid)
            per_node = str(base["gres"]).split(":")[-1]
            out.append(f"{gid}: {len(todo)}/{len(self._groups[gid].cells)} cells, {base['nodes']}×{per_node} GPUs, "
                       f"partition {base.get('slurm_partition', '-')}, --time {self.group_runtime_min(gid)} min")
        return out

    @property
    def output_dir(self) -> str:
        return self.cfg.output_dir

    @property
    def cell_ids(self) -> list[str]:
        return [c.id for c in self.plan.cells]

    @cached_property
    def _cells(self) -> dict[str, Cell]:
        return self.plan.by_id()

    @cached_property
    def _resources(self) -> dict[str, dict[str, Any]]:
        return {cid: self._resources_of(cid) for cid in self.cell_ids}

    def resources_of(self, cell_id: str) -> dict[str, Any]:
        """The cell's Slurm resources, computed once per parse."""
        return self._resources[cell_id]

    def runtime_min(self, cell_id: str, attempt: int = 1) -> int:
        """The cell's time limit for Snakemake's ``attempt``: more for a retry, and at
        least double after a record ``incomplete`` (see ``launch.retry_runtime_min``)."""
        from llmenergy.orchestrate.launch import retry_runtime_min

        status, limit = self.previous.get(cell_id, (None, None))
        return retry_runtime_min(int(self.resources_of(cell_id)["runtime"]), attempt,
                                 previous_status=status, previous_limit_min=limit)

    def _resources_of(self, cell_id: str) -> dict[str, Any]:
        from llmenergy.orchestrate.launch import cell_resources

        res = dict(cell_resources(self.cfg, self._cells[cell_id]))
        # Optional sbatch options go through slurm_extra: every cell must have the same
        # resource keys, and the plugin turns an empty constraint/qos into `-C ''`.
        extra = [f"--{k}={res.pop(k)}" for k in ("constraint", "qos") if k in res]
        res["slurm_extra"] = " ".join([*extra, f"--signal={time_limit_signal()}"])
        return res

    def quarantine_corrupt(self, *, dry_run: bool = False, derived: Sequence[str | Path] = ()) -> list[str]:
        """Cells whose outputs exist but are corrupt or not finished (see
        :func:`output_problem`); unless ``dry_run``, their outputs are renamed to
        ``*.rejected`` and the ``derived`` files (summary, report) are removed, so
        that Snakemake reruns exactly those cells (and the analysis). Returns the
        cell ids."""
        bad: list[str] = []
        for cell in self.plan.cells:
            files = cell.files(self.output_dir)
            outputs = [files.metrics, files.record]
            problems = [(p, why) for p in outputs
                        if p.exists() and (why := output_problem(p, lambda st: accepted(st, self.cfg.policies)))]
            if not problems:
                continue
            bad.append(cell.id)
            for path, why in problems:
                log.warning("%s: %s; the cell will be rerun", path, why)
            if dry_run:
                continue
            for path in outputs:
                if path.exists():
                    path.replace(path.with_name(path.name + ".rejected"))
        if bad and not dry_run:
            # These were computed from the rejected outputs. Snakemake does not
            # redo a missing intermediate file whose consumers are up to date, so
            # without removing them it would not reach back to the cells.
            for path in derived:
                Path(path).unlink(missing_ok=True)
        return bad

    def note_previous(self) -> None:
        """Remember each unfinished cell's last record (``cell.json``, else
        ``failed/{cell}.json``): its status and its job's time limit."""
        for cell in self.plan.cells:
            files = cell.files(self.output_dir)
            for path in (files.record, files.failed_record()):
                data = _read_json(path) if path.exists() else None
                if data is None:
                    continue
                status = str(data.get("status"))
                if not accepted(status, self.cfg.policies):
                    limit = (data.get("provenance") or {}).get("slurm_time_limit_min")
                    self.previous[cell.id] = (status, int(limit) if isinstance(limit, int) else None)
                break

    def changed_cells(self) -> list[Changed]:
        """Finished cells whose recorded fingerprint is not the current config's.

        A record without a fingerprint (written before fingerprints existed) is
        kept, with one warning for all such cells.
        """
        from llmenergy.orchestrate.fingerprint import (
            changes,
            checkpoint_files,
            definition,
            fingerprint_of,
        )
        from llmenergy.orchestrate.launch import cell_spec

        stats: dict[str, list[list[Any]]] = {}  # one stat pass per checkpoint
        out: list[Changed] = []
        legacy = 0
        for cell in self.plan.cells:
            path = cell.files(self.output_dir).record
            data = _read_json(path) if path.exists() else None
            if data is None or not accepted(str(data.get("status")), self.cfg.policies):
                continue  # absent, corrupt or unfinished: quarantine_corrupt's business
            old = data.get("fingerprint")
            if not old:
                legacy += 1
                continue
            spec = cell_spec(self.cfg, cell, resolve_device=False)
            if spec.weights not in stats:
                stats[spec.weights] = checkpoint_files(spec.weights)
            defn = definition(spec, checkpoint=stats[spec.weights])
            new = fingerprint_of(defn)
            if new != old:
                out.append(Changed(cell, str(old), new, changes(data.get("definition"), defn)))
        if legacy:
            log.warning("llmenergy: %d finished cell(s) were recorded without a fingerprint (older "
                        "llmenergy); they are kept as they are, unchecked against the config", legacy)
        return out

    def supersede_changed(self, changed: list[Changed], *, dry_run: bool = False,
                          derived: Sequence[str | Path] = ()) -> None:
        """Move the outputs of ``changed`` cells aside (``cells/{id}/superseded/{old}/``)
        and remove the ``derived`` files, so that Snakemake reruns exactly those cells.
        Under ``policies.on_config_change: error``, raise one error listing them."""
        if not changed:
            return
        if self.cfg.policies.on_config_change == "error":
            listed = "; ".join(f"{c.cell.id} ({c.why})" for c in changed)
            raise ConfigError(f"{self.cfg.source}: policies.on_config_change: error: the config changed "
                              f"for {len(changed)} finished cell(s): {listed}")
        from llmenergy.orchestrate.fingerprint import supersede

        for c in changed:
            log.warning("llmenergy: %s: config changed (%s); %s", c.cell.id, c.why,
                        "would rerun (dry run)" if dry_run else "rerunning")
            if not dry_run:
                supersede(c.cell.files(self.output_dir), c.old)
        if not dry_run:
            for path in derived:
                Path(path).unlink(missing_ok=True)

    def prepare(self, *, dry_run: bool = False, derived: Sequence[str | Path] = ()) -> list[str]:
        """The main process's pass before anything runs; returns the cells to rerun."""
        changed = self.changed_cells()
        if self.cfg.policies.on_config_change == "error" and changed:
            self.supersede_changed(changed, dry_run=dry_run, derived=derived)  # raises
        self.note_previous()
        bad = self.quarantine_corrupt(dry_run=dry_run, derived=derived)
        self.supersede_changed(changed, dry_run=dry_run, derived=derived)
        if self.packing == "group":
            for gid in self.stale_groups(dry_run=dry_run):
                log.warning("llmenergy: group %s: a cell is not finished; the group %s", gid,
                            "would rerun (dry run)" if dry_run else "reruns (its finished cells are kept)")
        return bad + [c.cell.id for c in changed]

    def rule_resources(self) -> dict[str, Callable[..., Any]]:
        """Resource callables for ``rule run_cell`` (one Slurm job per cell); ``runtime``
        grows with Snakemake's ``attempt`` (``retries`` in the profile)."""
        keys = sorted({k for cid in self.cell_ids for k in self.resources_of(cid)})

        def getter(key: str) -> Callable[..., Any]:
            if key == "runtime":
                return lambda wildcards, attempt=1: self.runtime_min(wildcards.cell, attempt)
            return lambda wildcards: self.resources_of(wildcards.cell).get(key, "")

        return {k: getter(k) for k in keys}

    def _backdate(self, derived: Sequence[Path]) -> None:
        """Make the partial report's files older than every cell output. Snakemake does
        not redo a missing cell whose consumers are up to date; outdated by mtime
        (``rerun-triggers: mtime``), they make the next run (and ``-n``) reach back to
        exactly the cells without outputs."""
        stamps = [p.stat().st_mtime for c in self.plan.cells
                  for p in (c.files(self.output_dir).metrics,) if p.exists()]
        stamps += [p.stat().st_mtime for gid in self.group_ids
                   for p in (Path(self.done_marker(gid)),) if p.exists()]
        when = max(0.0, min(stamps, default=1.0) - 1.0)
        for path in derived:
            if Path(path).exists():
                os.utime(path, (when, when))

    def partial_report(self, report: str | Path) -> None:
        """After a failed run: aggregate and report whatever finished (Snakemake's
        ``onerror``). Cells that failed, are missing or still queued are listed in
        the report's "not measured" table; Snakemake still exits non-zero."""
        from llmenergy.analysis.aggregate import aggregate
        from llmenergy.analysis.report import render_report

        out = Path(self.output_dir)
        res = aggregate(out, grid_gco2_per_kwh=self.cfg.grid_gco2_per_kwh,
                        expected_cells=[c.identity() for c in self.plan.cells])
        path = render_report(out, out_path=Path(report))
        self._backdate([res.summary_path, res.stats_path, path, RunLayout(out).figures])
        log.warning("llmenergy: partial report of a failed run: %s (statuses %s)", path,
                    ", ".join(f"{k} {v}" for k, v in sorted(res.status_counts.items())))


DRY_RUN_FLAGS = ("-n", "--dry-run", "--dryrun", "--dry_run")


def dry_run_requested(argv: Sequence[str]) -> bool:
    """Whether Snakemake's command line asks for a dry run (``-n``, ``-np``, ``--dry-run``).

    At Snakefile parse ``workflow.dryrun`` is always False (Snakemake 9 sets up its
    executor after parsing), so the flag is read from the command line.
    """
    for arg in argv[1:]:
        if arg == "--":
            break
        if arg in DRY_RUN_FLAGS:
            return True
        short = arg[1:]
        if arg.startswith("-") and not arg.startswith("--") and short.isalpha() and "n" in short \
                and len(short) <= 4:
            return True
    return False


def _source(configfiles: Sequence[str | Path]) -> str:
    return str(configfiles[-1]) if configfiles else "config"


#: Set by a profile (``config: [packing_default=group]``): the packing when the config sets none.
PACKING_DEFAULT_KEY = "packing_default"


def load(config: dict[str, Any], configfiles: Sequence[str | Path] = ()) -> Context:
    """Validate Snakemake's merged ``config`` and expand the matrix.

    ``packing`` comes from the config, else from ``packing_default`` (set by
    ``profiles/slurm``), else ``cell``.

    The merged config is stored as ``{output_dir}/.llmenergy/config.json`` (only
    rewritten when it changes) so that each job's ``llmenergy run-cell`` sees
    exactly what Snakemake saw, including ``--config`` overrides.
    """
    config = dict(config)
    default = config.pop(PACKING_DEFAULT_KEY, None) or "cell"
    cfg = from_dict(config, source=Path(_source(configfiles)).name)
    packing = resolve_packing(cfg, str(default))
    plan = expand(cfg)
    resolved = Path(cfg.output_dir) / RESOLVED_CONFIG
    text = json.dumps(dict(config), indent=2, sort_keys=True, default=str) + "\n"
    if not resolved.exists() or resolved.read_text() != text:
        atomic.write_text(resolved, text)
    return Context(cfg=cfg, plan=plan, config_arg=str(resolved), packing=packing)
