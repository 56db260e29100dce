"""Glue between the Snakemake rules and llmenergy.

Called at every parse of the Snakefile (the submit host's and every Slurm
job's), so it only validates the config and expands the matrix: no heavy
imports (no torch). The one filesystem pass, :meth:`Context.prepare`, runs on
the main process only and reads a few bytes per cell: it moves aside corrupt or
unfinished outputs (:meth:`Context.quarantine_corrupt`) and the outputs of
finished cells whose fingerprint no longer matches the config, or whose status changed
under newer metrics rules (:meth:`Context.supersede_changed`), and keeps each unfinished cell's last
record, so that a cell stopped at its time limit asks for more time.

Every job's resources come from :func:`llmenergy.planning.jobs.job_request`, the
same as ``llmenergy submit`` and ``llmenergy plan``: a group too long for its
partition runs as consecutive parts, each a job of its own (rule ``run_group``
with the part's id).
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from llmenergy import atomic
from llmenergy.cellfiles import Cell, accepted, output_problem, peek_record
from llmenergy.config import Config, from_dict
from llmenergy.errors import ConfigError
from llmenergy.layout import RunLayout
from llmenergy.planning import jobs
from llmenergy.planning.groups import resolve_packing
from llmenergy.planning.jobs import (
    History,
    Job,
    JobRequest,
    PartitionLimits,
    cell_jobs,
    group_jobs,
    job_request,
    read_history,
)
from llmenergy.planning.matrix import Plan, expand
from llmenergy.slurm import snakemake_resources, time_limit_signal

log = logging.getLogger(__name__)

RESOLVED_CONFIG = ".llmenergy/config.json"
#: A dry run moves nothing, so Snakemake would find the outputs of a job that is to rerun
#: (its config changed, its outputs corrupt, a group with an unfinished cell) and list
#: nothing. The dry run touches one empty file per such job in this folder of the output
#: directory and makes it the job's input, newer than its outputs, so that ``-n`` lists the
#: job and what follows it; a real run removes the folder.
WOULD_RERUN_DIR = ".llmenergy/would-rerun"

@dataclass
class Changed:
    """A finished cell whose recorded fingerprint differs from the current config's, or
    (``rules``) whose rows, computed again under this version's metrics rules, say another
    status than its record."""

    cell: Cell
    old: str
    new: str
    why: str
    rules: bool = False


@dataclass
class Context:
    cfg: Config
    plan: Plan
    config_arg: str
    #: ``group``: one job per group of cells sharing a model load (rule run_group), or per part
    #: of a group too long for its partition; ``cell``: one job per cell (rule run_cell).
    packing: str = "group"
    #: ``{job id: Snakemake resources of its first attempt}``, filled as asked.
    _base: dict[str, dict[str, Any]] = field(default_factory=dict, init=False, repr=False)
    #: ``{cell or group job id: its file under WOULD_RERUN_DIR}``, in a dry run only.
    _would_rerun: dict[str, str] = field(default_factory=dict, init=False, repr=False)
    #: The ids of :meth:`changed_cells` as :meth:`prepare` found them.
    _changed: set[str] | None = field(default=None, init=False, repr=False)

    @cached_property
    def limits(self) -> PartitionLimits:
        """The partitions' longest jobs, from Slurm (once per parse)."""
        return jobs.partition_limits()

    @cached_property
    def history(self) -> History:
        """Every cell's last record and the runtime factors learned from them."""
        return read_history(self.cfg, self.plan.cells)

    @cached_property
    def jobs(self) -> list[Job]:
        """The jobs of rule ``run_group``: groups, or their parts where too long for the partition."""
        return group_jobs(self.cfg, self.plan.cells, self.limits)

    @cached_property
    def _jobs(self) -> dict[str, Job]:
        return {j.id: j for j in self.jobs}

    @cached_property
    def _cell_jobs(self) -> dict[str, Job]:
        return {j.id: j for j in cell_jobs(self.cfg, self.plan.cells, self.limits)}

    @cached_property
    def switches_note(self) -> str | None:
        """The compiled engine's switches set here, if a cell runs it (:func:`planning.plan.switches_note`)."""
        from llmenergy.planning.plan import switches_note

        return switches_note(c.engine for c in self.plan.cells)

    @property
    def job_ids(self) -> list[str]:
        """The ``group`` wildcards of rule ``run_group``, in plan order."""
        return [j.id for j in self.jobs]

    def done_marker(self, job_id: str) -> str:
        from llmenergy.orchestrate.launch import done_path

        return str(done_path(self.output_dir, job_id))

    def targets(self) -> list[str]:
        """What the analysis needs: every cell's metrics (``packing: cell``) or every group
        job's done marker (``packing: group``; a group's cells' files are not declared outputs,
        so that a failed cell never takes its finished neighbours with it)."""
        if self.packing == "group":
            return [self.done_marker(jid) for jid in self.job_ids]
        return [str(c.files(self.output_dir).metrics) for c in self.plan.cells]

    def _job(self, job_id: str) -> Job:
        job = self._jobs.get(job_id) or self._cell_jobs.get(job_id)
        if job is None:
            raise ConfigError(f"{self.cfg.source}: job {job_id!r} is not in the plan (see `llmenergy plan`)")
        return job

    def unfinished(self, job_id: str) -> list[Cell]:
        """The job's cells it would run now (all of them when every one is finished: a forced
        rerun sizes its job for the whole group)."""
        return self.history.unfinished(self._job(job_id).cells)

    def request(self, job_id: str, attempt: int = 1) -> JobRequest:
        """The job's request (:func:`llmenergy.planning.jobs.job_request`) for Snakemake's ``attempt``."""
        job = self._job(job_id)
        return job_request(self.cfg, job.cells, attempt=attempt, history=self.history,
                           max_time_min=job.max_time_min)

    def time_limit_min(self, job_id: str, attempt: int = 1) -> int:
        """The job's ``--time``: the learned estimate of its unfinished cells with the margins
        of every job; × the attempt; at least double after a record ``incomplete``; never
        more than the partition accepts."""
        return self.request(job_id, attempt).resources.time_limit_min

    def resources_of(self, job_id: str) -> dict[str, Any]:
        """The Snakemake resources of a job (a cell's under rule ``run_cell``), first attempt."""
        if job_id not in self._base:
            res = snakemake_resources(self.request(job_id).resources)
            # Optional sbatch options go through slurm_extra: every job must have the same
            # resource keys, and the plugin turns an empty constraint/qos into `-C ''`.
            extra = [f"--{k}={res.pop(k)}" for k in ("constraint", "qos") if k in res]
            res["slurm_extra"] = " ".join([*extra, f"--signal={time_limit_signal()}"])
            self._base[job_id] = res
        return self._base[job_id]

    def _rule_resources(self, ids: Sequence[str], wildcard: str) -> dict[str, Callable[..., Any]]:
        keys = sorted({k for jid in ids for k in self.resources_of(jid)})

        def getter(key: str) -> Callable[..., Any]:
            if key == "runtime":  # the plugin's name for --time
                return lambda wildcards, attempt=1: self.time_limit_min(getattr(wildcards, wildcard), attempt)
            return lambda wildcards: self.resources_of(getattr(wildcards, wildcard)).get(key, "")

        return {k: getter(k) for k in keys}

    def rule_group_resources(self) -> dict[str, Callable[..., Any]]:
        """Resource callables for rule ``run_group``: the layout of the job's cells (the same
        for all), the time of its unfinished ones, growing with Snakemake's ``attempt``."""
        return self._rule_resources(self.job_ids, "group")

    def rule_resources(self) -> dict[str, Callable[..., Any]]:
        """Resource callables for rule ``run_cell`` (``packing: cell``: one Slurm job per
        cell); ``runtime`` grows with Snakemake's ``attempt`` (``retries`` in the profile)."""
        return self._rule_resources(self.cell_ids, "cell")

    def stale_groups(self, *, dry_run: bool = False, derived: Sequence[str | Path] = ()) -> list[str]:
        """Group jobs whose done marker exists though a cell of theirs is not finished (set aside,
        superseded, removed by hand); unless ``dry_run``, the marker and the ``derived`` files
        (summary, report: Snakemake does not redo a missing intermediate file whose consumers
        are up to date) are removed, so the job reruns."""
        stale = []
        for job in self.jobs:
            marker = Path(self.done_marker(job.id))
            if marker.exists() and not all(self.history.finished(c) for c in job.cells):
                stale.append(job.id)
                if not dry_run:
                    marker.unlink(missing_ok=True)
        if stale and not dry_run:
            for path in derived:
                Path(path).unlink(missing_ok=True)
        return stale

    def group_lines(self) -> list[str]:
        """One line per group job: cells to run, nodes × GPUs, partition, time limit (for ``-n``)."""
        out = []
        changed = self._changed or set()
        for job in self.jobs:
            req = self.request(job.id)
            res = req.resources
            todo = sum(not self.history.finished(c) or c.id in changed for c in job.cells)
            n = len(job.cells)
            cells = f"{todo} of {n} cells to run" if todo else ("all " if n > 1 else "") + f"{n} cell(s) finished"
            line = (f"{job.id}: {cells}, {res.nodes}×{res.gpus_per_node} GPUs, "
                    f"partition {res.partition or '-'}, --time {res.time_limit_min} min")
            if job.parts > 1:
                line += f" (part {job.part}/{job.parts} of {job.group_id}: longest job {job.max_time_min} min)"
            elif req.clipped:
                line += f" (cut to the partition's {job.max_time_min} min)"
            out.append(line)
        return out

    @property
    def output_dir(self) -> str:
        return self.cfg.output_dir

    @property
    def cell_ids(self) -> list[str]:
        return [c.id for c in self.plan.cells]

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

    def _keep_history(self, before: History) -> None:
        """Read the records again after the moves, keeping the last unfinished record of a
        cell whose files were set aside (its ``incomplete`` still asks for more time)."""
        after = read_history(self.cfg, self.plan.cells)
        kept = {cid: h for cid, h in before.cells.items() if not h.finished and cid not in after.cells}
        self.history = History({**after.cells, **kept}, after.factors)
        self._base.clear()

    def changed_cells(self) -> list[Changed]:
        """Finished cells whose recorded fingerprint is not the current config's (a record
        without a fingerprint is one of them: nothing unchecked passes for current), then
        those of :meth:`rules_changed_cells`."""
        from llmenergy.orchestrate.fingerprint import (
            changes,
            checkpoint_files,
            definition,
            fingerprint_of,
        )
        from llmenergy.orchestrate.launch import cell_spec

        stats: dict[str, list[list[Any]]] = {}  # one stat pass per checkpoint
        out: list[Changed] = []
        for cell in self.plan.cells:
            path = cell.files(self.output_dir).record
            data = peek_record(path)
            if data is None or not accepted(str(data.get("status")), self.cfg.policies):
                continue  # absent, corrupt or unfinished: quarantine_corrupt's business
            old = data.get("fingerprint")
            spec = cell_spec(self.cfg, cell, resolve_device=False)
            if spec.weights not in stats:
                stats[spec.weights] = checkpoint_files(spec.weights)
            defn = definition(spec, checkpoint=stats[spec.weights])
            new = fingerprint_of(defn)
            if new != old:
                why = changes(data.get("definition"), defn) if old else "recorded without a fingerprint"
                out.append(Changed(cell, str(old or ""), new, why))
        seen = {c.cell.id for c in out}
        return out + [c for c in self.rules_changed_cells() if c.cell.id not in seen]

    def rules_changed_cells(self) -> list[Changed]:
        """Finished cells whose status the last ``aggregate`` found changed under this
        version's metrics rules (``aggregate_problems.json`` ``status_changed``: its energy
        now incomplete, say), while their ``cell.json`` is still the one it read (its
        SHA-256): the record says ``ok`` and would keep the cell from rerunning."""
        from llmenergy.analysis.remeter import status_changed_since

        cells = {c.id: c for c in self.plan.cells}
        records = {cid: c.files(self.output_dir).record for cid, c in cells.items()}
        out: list[Changed] = []
        for cid, why in status_changed_since(RunLayout(Path(self.output_dir)).problems, records):
            data = peek_record(records[cid])
            if data is None or not accepted(str(data.get("status")), self.cfg.policies):
                continue  # unfinished anyway: it reruns
            fp = str(data.get("fingerprint") or "")
            out.append(Changed(cells[cid], fp, fp, why, rules=True))
        return out

    def supersede_changed(self, changed: list[Changed], *, dry_run: bool = False,
                          derived: Sequence[str | Path] = ()) -> None:
        """Move the outputs of ``changed`` cells aside (``cells/{id}/superseded/{old}/``)
        and remove the ``derived`` files, so that Snakemake reruns exactly those cells.
        Under ``policies.on_config_change: error``, raise one error listing them."""
        if not changed:
            return
        config = [c for c in changed if not c.rules]
        if self.cfg.policies.on_config_change == "error" and config:
            listed = "; ".join(f"{c.cell.id} ({c.why})" for c in config)
            raise ConfigError(f"{self.cfg.source}: policies.on_config_change: error: the config changed "
                              f"for {len(config)} finished cell(s): {listed}")
        from llmenergy.orchestrate.fingerprint import supersede

        for c in changed:
            log.warning("llmenergy: %s: %s (%s); %s", c.cell.id,
                        "status changed under newer rules" if c.rules else "config changed", c.why,
                        "would rerun (dry run)" if dry_run else "rerunning")
            if not dry_run:
                supersede(c.cell.files(self.output_dir), c.old)
        if not dry_run:
            for path in derived:
                Path(path).unlink(missing_ok=True)

    def prepare(self, *, dry_run: bool = False, derived: Sequence[str | Path] = ()) -> list[str]:
        """The main process's pass before anything runs; returns the cells to rerun."""
        changed = self.changed_cells()
        self._changed = {c.cell.id for c in changed}
        if self.cfg.policies.on_config_change == "error" and any(not c.rules for c in changed):
            self.supersede_changed(changed, dry_run=dry_run, derived=derived)  # raises
        before = read_history(self.cfg, self.plan.cells)
        bad = self.quarantine_corrupt(dry_run=dry_run, derived=derived)
        self.supersede_changed(changed, dry_run=dry_run, derived=derived)
        if not dry_run and any(not c.files(self.output_dir).record.exists() for c in self.plan.cells):
            # a partial report of a failed run whose cells all failed is older than nothing:
            # without removing it Snakemake would not reach back to the cells without outputs
            for path in derived:
                Path(path).unlink(missing_ok=True)
        self._keep_history(before)
        stale = self.stale_groups(dry_run=dry_run, derived=derived) if self.packing == "group" else []
        for jid in stale:
            log.warning("llmenergy: group job %s: a cell is not finished; the job %s", jid,
                        "would rerun (dry run)" if dry_run else "reruns (its finished cells are kept)")
        rerun = bad + [c.cell.id for c in changed]
        if dry_run:
            self._mark_would_rerun(rerun, stale)
        else:
            shutil.rmtree(Path(self.output_dir) / WOULD_RERUN_DIR, ignore_errors=True)
        return rerun

    def progress_line(self) -> str:
        """Where the results stand, as ``llmenergy plan``'s ``results:`` line (for ``-n``:
        after a real :meth:`prepare` the changed cells' files are already set aside)."""
        from llmenergy.planning.plan import plan_rows, progress, progress_text

        changed = self._changed if self._changed is not None else {c.cell.id for c in self.changed_cells()}
        done = progress(self.cfg, plan_rows(self.cfg)[0], changed, self.history)
        return " ".join(" ".join(progress_text(done)).split())

    def _mark_would_rerun(self, cells: Sequence[str], stale_jobs: Sequence[str]) -> None:
        """Touch the :data:`WOULD_RERUN_DIR` file of each job that reruns ``cells`` (their
        own ``run_cell`` jobs, or the group jobs holding them) and of ``stale_jobs``."""
        keys, rerun = set(stale_jobs), set(cells)
        if self.packing == "group":
            keys |= {j.id for j in self.jobs if any(c.id in rerun for c in j.cells)}
        else:
            keys |= rerun
        for key in sorted(keys):
            path = Path(self.output_dir) / WOULD_RERUN_DIR / key
            path.parent.mkdir(parents=True, exist_ok=True)
            path.touch()
            self._would_rerun[key] = str(path)

    def would_rerun_input(self, wildcard: str) -> Callable[[Any], list[str]]:
        """Input function of rule ``run_cell`` (``wildcard`` ``cell``) or ``run_group``
        (``group``): the job's :data:`WOULD_RERUN_DIR` file in a dry run that would rerun it,
        else nothing."""
        def inputs(wildcards: Any) -> list[str]:
            path = self._would_rerun.get(getattr(wildcards, wildcard))
            return [path] if path else []

        return inputs

    def _backdate(self, derived: Sequence[Path]) -> None:
        """Make the partial report's files older than every cell output. Snakemake does
        not redo a missing cell whose consumers are up to date; outdated by mtime
        (``rerun-triggers: mtime``), they make the next run (and ``-n``) reach back to
        exactly the cells without outputs."""
        stamps = [p.stat().st_mtime for c in self.plan.cells
                  for p in (c.files(self.output_dir).metrics,) if p.exists()]
        stamps += [p.stat().st_mtime for jid in self.job_ids
                   for p in (Path(self.done_marker(jid)),) if p.exists()]
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


def changed_cell_ids(cfg: Config, packing: str) -> set[str]:
    """The finished cells the next run measures again (:meth:`Context.changed_cells`): ``llmenergy
    plan`` counts them as left to run and ``llmenergy submit`` submits their groups."""
    ctx = Context(cfg=cfg, plan=expand(cfg), config_arg=str(cfg.source), packing=packing)
    return {c.cell.id for c in ctx.changed_cells()}


def load(config: dict[str, Any], configfiles: Sequence[str | Path] = ()) -> Context:
    """Validate Snakemake's merged ``config`` and expand the matrix.

    ``packing`` comes from the config, else :data:`llmenergy.planning.groups.DEFAULT_PACKING`
    (``group``, as every route).

    The merged config is stored as ``{output_dir}/.llmenergy/config.json`` (only
    rewritten when it changes) so that each job's ``llmenergy run-cell`` sees
    exactly what Snakemake saw, including ``--config`` overrides.
    """
    config = dict(config)
    cfg = from_dict(config, source=Path(_source(configfiles)).name)
    packing = resolve_packing(cfg)
    plan = expand(cfg)
    resolved = Path(cfg.output_dir) / RESOLVED_CONFIG
    text = json.dumps(dict(config), indent=2, sort_keys=True, default=str) + "\n"
    if not resolved.exists() or resolved.read_text() != text:
        atomic.write_text(resolved, text)
    return Context(cfg=cfg, plan=plan, config_arg=str(resolved), packing=packing)
