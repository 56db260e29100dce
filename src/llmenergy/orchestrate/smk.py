"""Glue between the Snakemake rules and llmenergy.

Called at every parse of the Snakefile (the submit host's and every Slurm
job's), so it only validates the config and expands the matrix: no heavy
imports (no torch). The one filesystem pass, :meth:`Context.quarantine_corrupt`,
runs on the main process only and reads a few bytes per finished cell.
"""
from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from llmenergy import atomic
from llmenergy.cellfiles import Cell, accepted
from llmenergy.config import Config, from_dict
from llmenergy.planning.matrix import Plan, expand
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


@dataclass
class Context:
    cfg: Config
    plan: Plan
    config_arg: str

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
            cell_dir = cell.dir(self.output_dir)
            outputs = [cell_dir / "metrics.parquet", cell_dir / "cell.json"]
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

    def rule_resources(self) -> dict[str, Callable[..., Any]]:
        """Resource callables for ``rule run_cell`` (one Slurm job per cell)."""
        keys = sorted({k for cid in self.cell_ids for k in self.resources_of(cid)})

        def getter(key: str) -> Callable[..., Any]:
            return lambda wildcards: self.resources_of(wildcards.cell).get(key, "")

        return {k: getter(k) for k in keys}


def _source(configfiles: Sequence[str | Path]) -> str:
    return str(configfiles[-1]) if configfiles else "config"


def load(config: dict[str, Any], configfiles: Sequence[str | Path] = ()) -> Context:
    """Validate Snakemake's merged ``config`` and expand the matrix.

    The merged config is stored as ``{output_dir}/.llmenergy/config.json`` (only
    rewritten when it changes) so that each job's ``llmenergy run-cell`` sees
    exactly what Snakemake saw, including ``--config`` overrides.
    """
    cfg = from_dict(dict(config), source=Path(_source(configfiles)).name)
    plan = expand(cfg)
    resolved = Path(cfg.output_dir) / RESOLVED_CONFIG
    text = json.dumps(dict(config), indent=2, sort_keys=True, default=str) + "\n"
    if not resolved.exists() or resolved.read_text() != text:
        atomic.write_text(resolved, text)
    return Context(cfg=cfg, plan=plan, config_arg=str(resolved))
